"""One jitted forward+backward gives the same loss and gradients on 1 device and on 8."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam_jax import optim, sharding, steps
from glam_jax.model import frozen
from glam_jax.moe import MoE
from tests.helpers import random_batch, tiny_config

# --dist loadgroup (pyproject.toml) gives this module to one xdist worker: the cached 1-device
# steps serve two tests on one xdist worker.
pytestmark = pytest.mark.xdist_group("devices_agree")


@functools.cache
def _one_step_of(dispatch: str, mesh_shape):
    """Loss metrics and params after one step; cached, as the 1-device run serves two tests."""
    return _one_step(tiny_config(dispatch=dispatch), mesh_shape)


def _one_step(config, mesh_shape):
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    model = steps.build_model(config)
    tx = optim.make_optimizer(config.train)
    state, shardings = steps.create_train_state(config, model, tx, mesh)
    train_step = steps.make_train_step(config, model, tx, mesh, shardings)
    state, metrics = train_step(state, steps.global_batch(random_batch(config), mesh))
    return jax.device_get(metrics), jax.device_get(state.params)


@pytest.mark.parametrize("dispatch", ["einsum", "dropless"])
def test_loss_and_update_match_on_1_and_8_devices(dispatch):
    m1, p1 = _one_step_of(dispatch, (1, 1, 1))
    m8, p8 = _one_step_of(dispatch, (2, 4, 1))
    assert abs(float(m1["loss"]) - float(m8["loss"])) < 1e-5
    assert abs(float(m1["aux_loss"]) - float(m8["aux_loss"])) < 1e-5
    assert abs(float(m1["grad_norm"]) - float(m8["grad_norm"])) < 1e-4
    np.testing.assert_allclose(m1["dropped_fraction"], m8["dropped_fraction"], atol=1e-6)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["einsum", "dropless"])
def test_model_parallel_axis_gives_the_same_loss(dispatch):
    """Tensor parallelism over `model` (heads, mlp, vocab split) does not change the maths."""
    m1, _ = _one_step_of(dispatch, (1, 1, 1))
    m_tp, _ = _one_step_of(dispatch, (2, 2, 2))
    assert abs(float(m1["loss"]) - float(m_tp["loss"])) < 1e-5


def _all_gathers(config, mesh_shape) -> list[str]:
    """Result shapes of the all-gathers in the compiled train step on this mesh."""
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    model = steps.build_model(config)
    tx = optim.make_optimizer(config.train)
    state, shardings = steps.create_train_state(config, model, tx, mesh)
    train_step = steps.make_train_step(config, model, tx, mesh, shardings)
    hlo = train_step.lower(state, steps.global_batch(random_batch(config), mesh)).compile()
    return re.findall(r"= (\S+) all-gather(?:-start)?\(", hlo.as_text())


def test_dropless_routes_each_devices_tokens_on_that_device():
    """dropless on a mesh runs per device (sharding.per_shard_dropless): pure data parallelism
    gathers nothing, and with experts split over `expert` only their weights are gathered.
    (Left to XLA's partitioner, the global sort gathered every token's expert index and
    all-reduced [pairs, M] token rows onto every device.)"""
    config = tiny_config(dispatch="dropless")
    assert _all_gathers(config, (8, 1, 1)) == []
    e, m, h = config.moe.num_experts, config.model.embed_dim, config.model.mlp_dim
    weights = {f"f32[{e},{m},{h}]", f"f32[{e},{h},{m}]"}  # wi_0 / wi_1 and wo, whole
    gathered = _all_gathers(config, (2, 4, 1))
    assert gathered and set(g.split("{")[0] for g in gathered) <= weights, gathered


def test_expert_dropout_draws_its_own_mask_on_each_device():
    """Two devices holding identical rows (deterministic top-k routing) give identical
    dropless outputs without expert dropout, and different ones with it: inside
    per_shard_dropless each device salts the dropout key with its index (with one key for
    all, both would drop the same units)."""
    mesh = sharding.make_mesh((2, 1, 1), jax.devices()[:2])
    row = jax.random.normal(jax.random.PRNGKey(0), (1, 32, 32))
    x = jnp.concatenate([row, row])  # one routing group of 32 tokens per device

    def outputs(rate):
        config = tiny_config(router="topk_softmax", dispatch="dropless")
        config.moe.expert_dropout = rate
        module = MoE(frozen(config), train=True)
        rngs = {n: jax.random.PRNGKey(i) for i, n in enumerate(("params", "routing", "dropout"))}
        with sharding.use_mesh(mesh):
            params = jax.jit(module.init)(rngs, x)
            y, _ = jax.jit(module.apply)(params, x, rngs=rngs)
        return np.asarray(y)

    same = outputs(0.0)
    np.testing.assert_array_equal(same[0], same[1])
    dropped = outputs(0.5)
    assert np.max(np.abs(dropped[0] - dropped[1])) > 0.2 * np.max(np.abs(dropped))
