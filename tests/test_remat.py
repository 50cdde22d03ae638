"""Rematerialisation changes memory and speed, never the maths: same loss and gradients."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from glam_jax import steps
from tests.helpers import random_batch, tiny_config


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
