"""Token cross-entropy whose gradient is one pass over the logits, in their dtype.

Written out by autodiff, the loss casts the [B, T, V] logits to float32, can keep that copy
for the backward pass, and builds the gradient in float32 before it is cast back to bfloat16
for the output-projection matmuls. The custom VJP below keeps only the bfloat16 logits and
the float32 log-partition, and forms
d logits = softmax * (w * d_nll + d_logz) - onehot(target) * w * d_nll
in one fused element-wise pass, rounding once to the logits' dtype. On an H100 dense step
(B=8, V=32k) that is 133.3 ms against 134.1-134.8 ms, and 1 GiB less memory
(docs/performance.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def cross_entropy(
    logits_btv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(weighted per-token NLL, log-partition logz) in float32; logz feeds the logits z-loss."""
    return _forward(logits_btv, targets_bt, weights_bt)[0]


def _forward(logits_btv, targets_bt, weights_bt):
    logits = logits_btv.astype(jnp.float32)  # fused into the reductions, never stored
    logz_bt = jax.nn.logsumexp(logits, axis=-1)
    target_bt = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
    nll_bt = (logz_bt - target_bt) * weights_bt
    return (nll_bt, logz_bt), (logits_btv, targets_bt, weights_bt, logz_bt, target_bt)


def _backward(residuals, cotangents):
    logits_btv, targets_bt, weights_bt, logz_bt, target_bt = residuals
    d_nll_bt, d_logz_bt = cotangents
    on_target_bt = weights_bt * d_nll_bt
    softmax_btv = jnp.exp(logits_btv.astype(jnp.float32) - logz_bt[..., None])
    vocab_v = jnp.arange(logits_btv.shape[-1], dtype=targets_bt.dtype)
    onehot_btv = vocab_v == targets_bt[..., None]
    d_logits = softmax_btv * (on_target_bt + d_logz_bt)[..., None] - jnp.where(
        onehot_btv, on_target_bt[..., None], 0.0
    )
    d_weights_bt = (logz_bt - target_bt) * d_nll_bt
    return d_logits.astype(logits_btv.dtype), None, d_weights_bt


cross_entropy.defvjp(_forward, _backward)
