"""The cross-entropy's custom VJP gives autodiff's gradient of the plain float32 formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam_jax.losses import cross_entropy


def plain_cross_entropy(logits, targets, weights):
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (logz - target) * weights, logz


def total(fn, z_weight):
    def loss(logits, weights, targets):
        nll, logz = fn(logits, targets, weights)
        return jnp.sum(nll) / jnp.sum(weights) + z_weight * jnp.mean(jnp.square(logz) * weights)

    return loss


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_values_and_gradients_match_autodiff(dtype):
    rng = np.random.default_rng(0)
    b, t, v = 2, 5, 37
    logits = jnp.asarray(3 * rng.normal(size=(b, t, v)), dtype)
    targets = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    weights = jnp.asarray(rng.uniform(size=(b, t)) > 0.3, jnp.float32)
    for got, want in zip(
        cross_entropy(logits, targets, weights),
        plain_cross_entropy(logits, targets, weights),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for z_weight in (0.0, 1e-2):
        ours = jax.grad(total(cross_entropy, z_weight), argnums=(0, 1))(logits, weights, targets)
        ref = jax.grad(total(plain_cross_entropy, z_weight), argnums=(0, 1))(
            logits, weights, targets
        )
        assert ours[0].dtype == dtype
        tol = 1e-6 if dtype == jnp.float32 else 4e-3  # one bf16 rounding of each element
        for a, r in zip(ours, ref, strict=True):
            a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
            np.testing.assert_allclose(a, r, rtol=tol, atol=tol * np.abs(r).max())
    assert float(jnp.abs(ours[0]).max()) > 0  # a gradient that cannot pass by being zero
