"""The layer stack is one scan: HLO size does not grow with depth and a while loop is present."""

import jax

from experiments.compile_probe import probe
from glam_jax import sharding
from tests.helpers import tiny_config


def test_hlo_size_flat_in_depth_and_loop_present():
    config = tiny_config()
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    shallow = probe(config, 4, mesh)
    deep = probe(config, 32, mesh)
    assert shallow["has_while_loop"] and deep["has_while_loop"]
    assert deep["hlo_ops"] <= 1.1 * shallow["hlo_ops"], (shallow, deep)


def test_unrolled_layers_compute_the_scanned_model():
    """model.scan_layers=False: blocks_i holds slice i of the scanned stack; same loss and
    gradients (evaluation mode, so no routing randomness differs)."""
    import flax.linen as nn
    import numpy as np

    from glam_jax import steps
    from tests.helpers import random_batch

    config = tiny_config()
    config.moe.capacity_factor_eval = float(config.moe.num_experts)
    batch = random_batch(config)
    scanned = steps.build_model(config)
    params = nn.unbox(scanned.init(jax.random.PRNGKey(0), batch["inputs"])["params"])
    num_blocks = config.model.num_layers // config.moe.every
    unrolled_params = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(num_blocks):
        unrolled_params[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
    config.model.scan_layers = False
    unrolled = steps.build_model(config)
    abstract = jax.eval_shape(unrolled.init, jax.random.PRNGKey(0), batch["inputs"])["params"]
    assert jax.tree.structure(nn.unbox(abstract)) == jax.tree.structure(unrolled_params)

    def loss_and_grads(model, p):
        fn = lambda p: steps.loss_and_metrics(p, batch, None, model, config, False)[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(fn))(p)

    loss_s, grads_s = loss_and_grads(scanned, params)
    loss_u, grads_u = loss_and_grads(unrolled, unrolled_params)
    np.testing.assert_allclose(float(loss_u), float(loss_s), rtol=1e-6)
    for i in range(num_blocks):
        for a, b in zip(
            jax.tree.leaves(grads_u[f"blocks_{i}"]),
            jax.tree.leaves(jax.tree.map(lambda x, i=i: x[i], grads_s["blocks"])),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(
        grads_u["embed"]["embedding"], grads_s["embed"]["embedding"], atol=1e-6
    )
