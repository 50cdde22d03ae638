"""One jitted forward+backward gives the same loss and gradients on 1 device and on 8."""

import jax
import numpy as np

from glam_jax import optim, sharding, steps
from tests.helpers import random_batch, tiny_config


def _one_step(config, mesh_shape):
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    model = steps.build_model(config)
    tx = optim.make_optimizer(config.train)
    state, shardings = steps.create_train_state(config, model, tx, mesh)
    train_step = steps.make_train_step(config, model, tx, mesh, shardings)
    state, metrics = train_step(state, steps.global_batch(random_batch(config), mesh))
    return jax.device_get(metrics), jax.device_get(state.params)


def test_loss_and_update_match_on_1_and_8_devices():
    config = tiny_config()
    m1, p1 = _one_step(config, (1, 1, 1))
    m8, p8 = _one_step(config, (2, 4, 1))
    assert abs(float(m1["loss"]) - float(m8["loss"])) < 1e-5
    assert abs(float(m1["aux_loss"]) - float(m8["aux_loss"])) < 1e-5
    assert abs(float(m1["grad_norm"]) - float(m8["grad_norm"])) < 1e-4
    np.testing.assert_allclose(m1["dropped_fraction"], m8["dropped_fraction"], atol=1e-6)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_model_parallel_axis_gives_the_same_loss():
    """Tensor parallelism over `model` (heads, mlp, vocab split) does not change the maths."""
    config = tiny_config()
    m1, _ = _one_step(config, (1, 1, 1))
    m_tp, _ = _one_step(config, (2, 2, 2))
    assert abs(float(m1["loss"]) - float(m_tp["loss"])) < 1e-5
