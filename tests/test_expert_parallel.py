"""Dropless expert parallelism (moe.expert_exchange='all_to_all' / 'ragged_all_to_all' with
moe.dispatch='dropless'): tokens travel to the devices holding their experts and back.

On 8 fake CPU devices the layer must equal the single-device dropless layer and the
all-gather version ('gspmd'), in outputs and gradients, on data x expert and expert x model
meshes and with routing so unbalanced that one device receives every pair.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from glam_jax import config_checks, sharding
from glam_jax.errors import GlamError
from glam_jax.kernels import block_grouped_matmul as bg
from glam_jax.moe import dispatch
from glam_jax.presets import glam_tiny

G, T, M, H, E, K = 8, 16, 8, 12, 8, 2


def _inputs(skew: bool, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 7)
    x = jax.random.normal(keys[0], (G, T, M), jnp.float32)
    if skew:  # every choice on experts 0 and 1, which live on one device of the expert axis
        index = jnp.stack([jnp.zeros((G, T), jnp.int32), jnp.ones((G, T), jnp.int32)], -1)
    else:
        index = jax.random.randint(keys[1], (G, T, K), 0, E)
    weights = jax.random.uniform(keys[2], (G, T, K), jnp.float32)
    mask = jax.random.bernoulli(keys[3], 0.8, (G, T, K))  # GShard: some choices not sent
    w = [
        jax.random.normal(keys[4 + i], shape, jnp.float32) * 0.3
        for i, shape in enumerate([(E, M, H), (E, M, H), (E, H, M)])
    ]
    return x, index, weights, mask, w


def _layer(exchange: str, mesh_shape=None):
    """(y, dx, dweights) of the dropless layer, on one device or on `mesh_shape`."""

    def loss(x, w, index, weights, mask):
        experts = dispatch.Experts(wi_0=w[0], wi_1=w[1], wo=w[2], exchange=exchange)
        y = dispatch.dropless_dispatch(x, index, weights, mask, experts, "xla")
        return jnp.sum(jnp.sin(y)), y

    def run(args):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        (dx, dw), y = grad(*args)
        return np.asarray(y), np.asarray(dx), [np.asarray(d) for d in dw]

    def call(x, index, weights, mask, w):
        if mesh_shape is None:
            return run((x, w, index, weights, mask))
        mesh = sharding.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
        with sharding.use_mesh(mesh):
            group = NamedSharding(mesh, sharding.logical_to_spec(("group", None, None)))
            w_in = NamedSharding(mesh, sharding.logical_to_spec(("expert", "embed", "mlp")))
            w_out = NamedSharding(mesh, sharding.logical_to_spec(("expert", "mlp", "embed")))
            args = (
                jax.device_put(x, group),
                [
                    jax.device_put(w[0], w_in),
                    jax.device_put(w[1], w_in),
                    jax.device_put(w[2], w_out),
                ],
                *(jax.device_put(a, group) for a in (index, weights, mask)),
            )
            return run(args)

    return call


def _assert_same(a, b):
    ya, dxa, dwa = a
    yb, dxb, dwb = b
    np.testing.assert_allclose(ya, yb, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dxa, dxb, atol=1e-5, rtol=1e-5)
    for u, v in zip(dwa, dwb, strict=True):
        np.testing.assert_allclose(u, v, atol=1e-5, rtol=1e-5)


# Two meshes x two routings in two cases (each case compiles three layers): data x expert with
# random routing, expert x model (tensor-parallel experts) with every pair on one device.
@pytest.mark.parametrize(
    "mesh_shape, skew",
    [((2, 4, 1), False), ((1, 4, 2), True)],
    ids=["data_x_expert-random", "expert_x_model-all_on_one_device"],
)
def test_tokens_to_experts_equals_one_device_and_the_all_gather(mesh_shape, skew):
    args = _inputs(skew)
    single = _layer("gspmd")(*args)
    assert np.abs(single[0]).max() > 0.1  # the layer does something
    _assert_same(_layer("all_to_all", mesh_shape)(*args), single)
    _assert_same(_layer("gspmd", mesh_shape)(*args), single)


def _collectives(exchange: str, mesh_shape=(2, 4, 1)) -> str:
    x, index, weights, mask, w = _inputs(False)
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])

    def loss(x, w):
        experts = dispatch.Experts(wi_0=w[0], wi_1=w[1], wo=w[2], exchange=exchange)
        return jnp.sum(dispatch.dropless_dispatch(x, index, weights, mask, experts, "xla"))

    with sharding.use_mesh(mesh):
        group = NamedSharding(mesh, sharding.logical_to_spec(("group", None, None)))
        w_in = NamedSharding(mesh, sharding.logical_to_spec(("expert", "embed", "mlp")))
        w_out = NamedSharding(mesh, sharding.logical_to_spec(("expert", "mlp", "embed")))
        w = [jax.device_put(w[0], w_in), jax.device_put(w[1], w_in), jax.device_put(w[2], w_out)]
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(jax.device_put(x, group), w)
        if exchange == "ragged_all_to_all":  # XLA:CPU cannot compile it: read the HLO
            return lowered.as_text()
        return lowered.compile().as_text()


def test_the_exchange_sends_tokens_and_never_gathers_expert_weights():
    hlo = _collectives("all_to_all")
    assert "all-to-all" in hlo
    assert "all-gather" not in hlo  # the weights stay put ...
    gathered = _collectives("gspmd")
    assert "all-gather" in gathered  # ... where the per-device layer gathers them
    ragged = _collectives("ragged_all_to_all")
    assert "ragged_all_to_all" in ragged or "ragged-all-to-all" in ragged
    # Rows [*, M] move by gathers both ways, forward and backward: the only scatters left are
    # on 1-D integer bookkeeping, the group sizes' bincounts and inverse permutations (a
    # scatter-add of rows is atomics on a GPU).
    scatters = re.findall(r"= (\w+)\[([\d,]*)\]\{[^}]*\} scatter\(", hlo)
    assert scatters and all(dtype == "s32" and "," not in dims for dtype, dims in scatters)
    assert len(re.findall(r" gather\(", hlo)) >= 8


def test_pairs_not_dispatched_get_no_row_in_the_kernel_layout():
    expert_p = jnp.array([0, 1, 1, 2, 0, 2], jnp.int32)
    valid_p = jnp.array([True, False, True, False, True, True])
    layout = bg.block_layout(expert_p, 3, valid_p=valid_p)
    rows = layout.rows
    pair_row = np.asarray(layout.pair_row)
    assert pair_row[1] == rows and pair_row[3] == rows  # no row: gather_rows gives zeros
    np.testing.assert_array_equal(np.asarray(layout.padded_sizes), [bg.BLOCK_ROWS] * 3)
    assert int(layout.num_used_tiles) == 3
    kept = np.asarray(layout.row_pair)
    assert sorted(kept[kept < 6].tolist()) == [0, 2, 4, 5]


def test_ragged_exchange_is_refused_on_cpu_and_with_capacity_paths():
    config = glam_tiny.get_config()
    config.moe.dispatch = "dropless"
    config.moe.expert_exchange = "ragged_all_to_all"
    with pytest.raises(GlamError, match=r"XLA:CPU has no ragged all-to-all\); use .all_to_all."):
        config_checks.check_run(config, (1, 4, 1))
    config.moe.dispatch = "einsum"
    with pytest.raises(GlamError, match="only moe.dispatch='dropless' has"):
        config_checks.check_model(config)
