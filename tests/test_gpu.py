"""GPU-only code paths; run on a GPU host with `pytest -m gpu`. Skipped (with reason) elsewhere."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam_jax import attention as attn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (cuDNN attention)"),
]


@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_attention_equals_xla_with_bias_and_causal_mask(packed):
    b, s, h, d = 2, 512, 4, 64
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in keys[:3])
    buckets = attn.relative_position_buckets(s, 32, 128)
    table = jax.random.normal(keys[3], (h, 32), jnp.float32)
    bias = jnp.einsum("tsb,hb->hts", jax.nn.one_hot(buckets, 32), table).astype(jnp.bfloat16)
    seg = None
    if packed:
        seg = jnp.where(jnp.arange(s) < s // 3, 1, 2)[None].repeat(b, 0).astype(jnp.int32)
    scale = 1.0 / math.sqrt(d)

    def xla(q, k, v, bias):
        return attn.xla_attention(q, k, v, bias, attn.attention_mask(seg, s), scale)

    def cudnn(q, k, v, bias):
        return attn.cudnn_attention(q, k, v, bias, seg, scale)

    out_x, out_c = jax.jit(xla)(q, k, v, bias), jax.jit(cudnn)(q, k, v, bias)
    np.testing.assert_allclose(
        np.asarray(out_c, np.float32), np.asarray(out_x, np.float32), atol=2e-2, rtol=2e-2
    )
    gx = jax.jit(jax.grad(lambda *a: jnp.sum(xla(*a).astype(jnp.float32)), (0, 3)))(q, k, v, bias)
    gc = jax.jit(jax.grad(lambda *a: jnp.sum(cudnn(*a).astype(jnp.float32)), (0, 3)))(q, k, v, bias)
    for a, c in zip(gx, gc, strict=True):
        a, c = np.asarray(a, np.float32), np.asarray(c, np.float32)
        assert np.max(np.abs(a - c)) <= 0.05 * np.max(np.abs(a)) + 1e-2


def test_model_uses_cudnn_by_default_on_gpu():
    assert attn.resolve_impl("auto") == "cudnn"
