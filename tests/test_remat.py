"""Rematerialisation changes memory and speed, never the maths: same loss and gradients."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from glam_jax import steps
from tests.helpers import random_batch, tiny_config

# --dist loadgroup (pyproject.toml) gives this module to one xdist worker: the cached no-remat
# reference serves every case on one xdist worker.
pytestmark = pytest.mark.xdist_group("remat")


@functools.cache
def _loss_and_grads(policy: str, scope: str):
    config = tiny_config()
    config.model.remat_policy = policy
    config.model.remat_scope = scope
    model = steps.build_model(config)
    batch = random_batch(config)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), batch["inputs"])["params"])
    grad_fn = jax.jit(
        jax.value_and_grad(
            lambda p: steps.loss_and_metrics(p, batch, jax.random.PRNGKey(1), model, config, True)[
                0
            ]
        )
    )
    return grad_fn(params)


@pytest.mark.parametrize(
    "policy, scope",
    [("full", "block"), ("dots_with_no_batch_dims_saveable", "block"), ("full", "ffn")],
)
def test_remat_matches_no_remat(policy, scope):
    loss_ref, grads_ref = _loss_and_grads("none", "block")
    loss, grads = _loss_and_grads(policy, scope)
    assert abs(float(loss) - float(loss_ref)) < 1e-6
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_casting_weights_before_the_scan_changes_no_number():
    """bfloat16 compute: weights cast once per step (steps.loss_and_metrics) give the same loss
    and gradients as casting inside every layer."""
    from glam_jax import model as model_lib

    config = tiny_config()
    config.model.dtype = "bfloat16"
    config.model.remat_policy = "dots"
    model = steps.build_model(config)
    batch = random_batch(config)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), batch["inputs"])["params"])

    def grads(cast: bool):
        original = model_lib.COMPUTE_DTYPE_PARAMS
        model_lib.COMPUTE_DTYPE_PARAMS = original if cast else frozenset()
        try:
            fn = jax.jit(
                jax.value_and_grad(
                    lambda p: steps.loss_and_metrics(
                        p, batch, jax.random.PRNGKey(1), model, config, True
                    )[0]
                )
            )
            return fn(params)
        finally:
            model_lib.COMPUTE_DTYPE_PARAMS = original

    (loss_a, grads_a), (loss_b, grads_b) = grads(True), grads(False)
    cast = model_lib.cast_for_compute(params, jax.numpy.bfloat16)
    n_cast = sum(leaf.dtype == jax.numpy.bfloat16 for leaf in jax.tree.leaves(cast))
    assert n_cast >= 9  # attention, dense FFN and expert weights, bias tables
    assert float(loss_a) == float(loss_b)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, b)
