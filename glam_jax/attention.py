"""Causal multi-head attention with GLaM's per-layer T5 relative-position bias.

Two kernels compute the same function: XLA einsums (everywhere) and cuDNN flash attention
(`jax.nn.dot_product_attention(implementation='cudnn')`, GPU only), which also returns the
bias gradient. The bias is never a gather of S^2 entries from the bucket table: that
gather's backward is a scatter-add of S^2 updates into 32 buckets, which made a GPU train step
far slower (docs/moe_reference.md section 6). It is built as a Toeplitz matrix from one value
per offset instead (`relative_bias`), whose gradient is a sum along diagonals.

cuDNN takes a document (segment) mask only folded into the bias, which makes the bias and
its gradient per row, [B, H, S, S]; `document_mask=False` skips the mask where rows hold one
document each (or where attending across documents is wanted).

With `decode=True` the layer keeps a key/value cache in the flax `cache` collection (lm1b/T5X
style): each call writes its tokens at `cache_index` and attends over every cached slot, so
prefill (many tokens) and one-token steps are the same code. Inside the layer scan the cache
gets the leading `layers` axis like the parameters.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glam_jax.layers import Dtype, constrain, param_with_axes

ATTENTION_IMPLS = ("auto", "xla", "cudnn")
POSITIONS = ("relative_bias", "rope", "none")
# model.qk_norm: RMSNorm of queries and keys before RoPE. 'head': over each head's head_dim
# (Qwen3-MoE, a [head_dim] scale); 'projection': over the whole q (or k) projection, every
# head at once (OLMoE, a [heads, head_dim] scale).
QK_NORMS = ("none", "head", "projection")


def relative_position_buckets(
    length: int, num_buckets: int, max_distance: int, bidirectional: bool = False
) -> np.ndarray:
    """T5 buckets [q, k] of the offset k - q; exact below num_buckets/2, log-spaced after.

    Static numpy: it depends only on the sequence length, so XLA sees a constant.
    """
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]  # [q, k] = k - q
    return offset_buckets(rel, num_buckets, max_distance, bidirectional)


def offset_buckets(
    rel: np.ndarray, num_buckets: int, max_distance: int, bidirectional: bool = False
) -> np.ndarray:
    """T5 bucket of each offset k - q (any shape), in numpy float64 so buckets never differ."""
    n = -rel
    ret = np.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(np.int64) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    with np.errstate(divide="ignore"):
        large = max_exact + (
            np.log(np.maximum(n, 1) / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (ret + np.where(is_small, n, large)).astype(np.int32)


def relative_bias(table_hb: jax.Array, length: int, max_distance: int) -> jax.Array:
    """[heads, q, k] bias table[h, bucket(k - q)], built without an S^2 gather.

    The bias depends only on the offset k - q, so it is a Toeplitz matrix: first one value per
    offset (2S-1 of them, a one-hot matmul: exact, and its gradient a small reduction), then
    row q is the window [S-1-q, 2S-1-q) of that vector, cut out of a tiled copy by a reshape.
    The backward pass is then a sum along diagonals, a plain reduction; the [S, S, buckets]
    one-hot this replaces cost twice the time and its gradient a K=S^2 matmul.
    """
    h, buckets = table_hb.shape
    s = length
    offsets = np.arange(-(s - 1), s)  # k - q, ascending
    onehot_ob = jax.nn.one_hot(offset_buckets(offsets, buckets, max_distance), buckets)
    # float32 inside, so the gradient's sums along diagonals (up to S terms) are not rounded
    # to bfloat16 on the way; the values themselves are exact either way.
    per_offset_ho = jnp.einsum(
        "ob,hb->ho", onehot_ob, table_hb.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    if s == 1:
        return per_offset_ho[:, :, None].astype(table_hb.dtype)
    # Row q of a [S, 2S-2] view of the tiled vector, read from index S-1, starts at offset
    # index (S-1 - q) mod (2S-1) = S-1-q: exactly the row of keys 0..S-1 for query q.
    tiled = jnp.tile(per_offset_ho, (1, s + 1))[:, s - 1 : s - 1 + s * (2 * s - 2)]
    return tiled.reshape(h, s, 2 * s - 2)[:, :, :s].astype(table_hb.dtype)


def rope(x_bthd: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (half-split layout, as in Mistral/Llama)."""
    d = x_bthd.shape[-1]
    freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [d/2]
    ang_btf = positions_bt[..., None].astype(jnp.float32) * freq
    sin, cos = jnp.sin(ang_btf)[:, :, None, :], jnp.cos(ang_btf)[:, :, None, :]
    x1, x2 = jnp.split(x_bthd.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bthd.dtype)


def attention_mask(
    segment_ids_bt: jax.Array | None, length: int, sliding_window: int = 0
) -> jax.Array:
    """[batch or 1, 1, q, k] bool: causal, and no attention across packed documents.

    With a sliding window, query q also sees only keys k > q - window (Mistral's rule).
    """
    causal_qk = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
    if sliding_window > 0:
        causal_qk = causal_qk & ~jnp.tril(causal_qk, -sliding_window)
    mask = causal_qk[None, None]
    if segment_ids_bt is not None:
        same_bqk = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
        mask = mask & same_bqk[:, None]
    return mask


def cached_attention_mask(
    q_slot_t: jax.Array, segment_q_bt: jax.Array, segment_k_bs: jax.Array, sliding_window: int
) -> jax.Array:
    """[batch, 1, q, cache] bool for queries at cache slots q_slot over every cache slot.

    Causal in slot order, same segment (0 marks left padding), and the sliding window.
    """
    k_slot_s = jnp.arange(segment_k_bs.shape[1])
    visible_ts = k_slot_s[None, :] <= q_slot_t[:, None]
    if sliding_window > 0:
        visible_ts = visible_ts & (k_slot_s[None, :] > q_slot_t[:, None] - sliding_window)
    same_bts = segment_q_bt[:, :, None] == segment_k_bs[:, None, :]
    return (visible_ts[None] & same_bts)[:, None]


class QKNorm(nn.Module):
    """RMSNorm of queries or keys [B, T, heads, D], computed in float32 (see QK_NORMS)."""

    over: str  # 'head' | 'projection'
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bthd: jax.Array) -> jax.Array:
        """x [B, T, heads, D] normalised over D ('head') or over heads and D ('projection')."""
        heads, d = x_bthd.shape[-2:]
        if self.over == "head":
            reduce, shape, axes = (-1,), (d,), ("kv",)
        elif self.over == "projection":
            reduce, shape, axes = (-2, -1), (heads, d), ("heads", "kv")
        else:
            raise ValueError(f"model.qk_norm={self.over!r} is not valid; valid: {QK_NORMS}.")
        x = x_bthd.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=reduce, keepdims=True) + self.eps)
        scale = param_with_axes(self, "scale", nn.initializers.ones, shape, self.param_dtype, axes)
        return (x * scale.astype(jnp.float32)).astype(self.dtype)


def xla_attention(q_bthd, k_bsgd, v_bsgd, bias_hts, mask_b1ts, scale: float) -> jax.Array:
    """Reference attention in plain einsums; grouped-query heads share k/v; softmax in f32."""
    b, t, h, d = q_bthd.shape
    g = k_bsgd.shape[2]
    q_btgrd = q_bthd.reshape(b, t, g, h // g, d)
    logits_bgrts = jnp.einsum("btgrd,bsgd->bgrts", q_btgrd, k_bsgd).astype(jnp.float32) * scale
    if bias_hts is not None:
        logits_bgrts = logits_bgrts + bias_hts.reshape(g, h // g, t, -1)[None].astype(jnp.float32)
    logits_bgrts = jnp.where(mask_b1ts[:, :, None], logits_bgrts, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits_bgrts, axis=-1).astype(v_bsgd.dtype)
    out_btgrd = jnp.einsum("bgrts,bsgd->btgrd", probs, v_bsgd)
    return out_btgrd.reshape(b, t, h, d)


def cudnn_attention(
    q_bthd, k_bsgd, v_bsgd, bias_hts, segment_ids_bt, scale: float, sliding_window: int = 0
) -> jax.Array:
    """cuDNN flash attention (GPU); causal via is_causal, documents via a mask if packed.

    A sliding window goes in as local_window_size=(window - 1, 0): q sees k in [q-window+1, q].
    """
    bias = None if bias_hts is None else bias_hts[None].astype(q_bthd.dtype)
    mask = None
    if segment_ids_bt is not None:
        mask = (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])[:, None]
    window = (sliding_window - 1, 0) if sliding_window > 0 else None
    return jax.nn.dot_product_attention(
        q_bthd,
        k_bsgd,
        v_bsgd,
        bias=bias,
        mask=mask,
        scale=scale,
        is_causal=True,
        local_window_size=window,
        implementation="cudnn",
    )


def resolve_impl(impl: str, dtype: Dtype | None = None) -> str:
    """'auto' picks cuDNN on a GPU backend for half-precision activations and XLA elsewhere
    (cuDNN flash attention takes only fp16/bf16, so float32 models use XLA on GPUs too)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl={impl!r} is not valid; valid: {ATTENTION_IMPLS}.")
    if impl == "auto":
        half = dtype is None or jnp.dtype(dtype) in (
            jnp.dtype(jnp.bfloat16),
            jnp.dtype(jnp.float16),
        )
        return "cudnn" if jax.default_backend() == "gpu" and half else "xla"
    return impl


class Attention(nn.Module):
    """Pre-projected causal self-attention; bias or RoPE positions; GQA when kv heads < heads;
    optional q/k/v biases (Qwen2-MoE) and q/k RMSNorm (OLMoE, Qwen3-MoE)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    position: str = "relative_bias"  # 'relative_bias' | 'rope' | 'none'
    rel_buckets: int = 32
    rel_max_distance: int = 128
    rope_theta: float = 10_000.0
    sliding_window: int = 0  # 0 = full causal attention
    scale: float = 0.0  # 0 = 1/sqrt(head_dim)
    impl: str = "auto"
    document_mask: bool = True  # keep attention inside a document of a packed row
    qk_norm: str = "none"  # a name in QK_NORMS
    qkv_bias: bool = False  # learned biases on the q/k/v projections (Qwen2-MoE)
    norm_eps: float = 1e-6  # epsilon of the q/k RMSNorm
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    decode: bool = False  # keep and use a key/value cache (generation)

    @nn.compact
    def __call__(
        self, x_btm: jax.Array, segment_ids_bt: jax.Array | None, positions_bt: jax.Array | None
    ) -> jax.Array:
        """x [B, T, M] -> attention output [B, T, M], causal within each document."""
        b, t, m = x_btm.shape
        h, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        init = nn.initializers.normal(self.init_std)

        def proj(name, heads):
            w_mhd = param_with_axes(
                self, name, init, (m, heads, d), self.param_dtype, ("embed", "heads", "kv")
            )
            y_bthd = jnp.einsum("btm,mhd->bthd", x_btm, w_mhd.astype(self.dtype))
            if self.qkv_bias:
                b_hd = param_with_axes(
                    self,
                    f"{name}_bias",
                    nn.initializers.zeros,
                    (heads, d),
                    self.param_dtype,
                    ("heads", "kv"),
                )
                y_bthd = y_bthd + b_hd.astype(self.dtype)
            return constrain(y_bthd, ("batch", "length", "heads", "kv"))

        q_bthd, k_bsgd, v_bsgd = proj("query", h), proj("key", g), proj("value", g)
        if self.qk_norm != "none":
            # Before RoPE and before the cache, so cached keys are the normalised ones.
            qk = dict(over=self.qk_norm, eps=self.norm_eps, dtype=self.dtype)
            q_bthd = QKNorm(name="query_norm", param_dtype=self.param_dtype, **qk)(q_bthd)
            k_bsgd = QKNorm(name="key_norm", param_dtype=self.param_dtype, **qk)(k_bsgd)
        table_hb = None
        if self.position == "relative_bias":
            table_hb = param_with_axes(
                self, "rel_bias", init, (h, self.rel_buckets), jnp.float32, ("heads", "rel_buckets")
            )
        elif self.position == "rope":
            pos = positions_bt if positions_bt is not None else jnp.arange(t)[None]
            q_bthd, k_bsgd = rope(q_bthd, pos, self.rope_theta), rope(k_bsgd, pos, self.rope_theta)
        elif self.position != "none":
            raise ValueError(f"model.position={self.position!r} is not valid; valid: {POSITIONS}.")
        scale = self.scale or 1.0 / math.sqrt(d)

        if self.decode and self.has_variable("cache", "cached_key"):
            out_bthd = self._cached(q_bthd, k_bsgd, v_bsgd, table_hb, segment_ids_bt, scale)
        else:
            if self.decode:  # first (abstract) call: create the cache, sized by this input
                self._cache_variables(b, t, g, d)
            bias_hts = None
            if table_hb is not None:
                bias_hts = relative_bias(table_hb.astype(self.dtype), t, self.rel_max_distance)
            if not self.document_mask:
                segment_ids_bt = None  # rows are one document each, or crossing is allowed
            if resolve_impl(self.impl, self.dtype) == "cudnn":
                out_bthd = cudnn_attention(
                    q_bthd, k_bsgd, v_bsgd, bias_hts, segment_ids_bt, scale, self.sliding_window
                )
            else:
                mask = attention_mask(segment_ids_bt, t, self.sliding_window)
                out_bthd = xla_attention(q_bthd, k_bsgd, v_bsgd, bias_hts, mask, scale)
        out_bthd = constrain(out_bthd, ("batch", "length", "heads", "kv"))
        wo_hdm = param_with_axes(
            self, "out", init, (h, d, m), self.param_dtype, ("heads", "kv", "embed")
        )
        y_btm = jnp.einsum("bthd,hdm->btm", out_bthd, wo_hdm.astype(self.dtype))
        return constrain(y_btm, ("batch", "length", "embed"))

    def _cache_variables(self, b: int, s: int, g: int, d: int):
        """Cache of s slots: keys/values [batch, slots, kv heads, head_dim], the segment id of
        each slot (0 = padding or empty) and the next slot to write."""

        kv_axes = ("batch", "length", "heads", "kv")
        specs = (
            ("cached_key", kv_axes, (b, s, g, d), self.dtype),
            ("cached_value", kv_axes, (b, s, g, d), self.dtype),
            ("cached_segment", ("batch", "length"), (b, s), jnp.int32),
            ("cache_index", (), (), jnp.int32),
        )
        return {
            name: self.variable(
                "cache", name, nn.with_logical_partitioning(jnp.zeros, axes), shape, dtype
            )
            for name, axes, shape, dtype in specs
        }

    def _cached(self, q_bthd, k_btgd, v_btgd, table_hb, segment_ids_bt, scale):
        """Writes this call's keys/values at cache_index and attends over the whole cache."""
        b, t = q_bthd.shape[:2]
        cache = self._cache_variables(b, 0, *k_btgd.shape[2:])  # existing: shapes unused
        idx = cache["cache_index"].value
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones((b, t), jnp.int32)
        kv_axes = ("batch", "length", "heads", "kv")
        for name, new in (("cached_key", k_btgd), ("cached_value", v_btgd)):
            var = cache[name]
            var.value = constrain(
                jax.lax.dynamic_update_slice(
                    var.value, new.astype(var.value.dtype), (0, idx, 0, 0)
                ),
                kv_axes,
            )
        seg = cache["cached_segment"]
        seg.value = jax.lax.dynamic_update_slice(
            seg.value, segment_ids_bt.astype(jnp.int32), (0, idx)
        )
        cache["cache_index"].value = idx + t
        k_bsgd = cache["cached_key"].value.astype(self.dtype)
        v_bsgd = cache["cached_value"].value.astype(self.dtype)
        s = k_bsgd.shape[1]
        q_slot_t = idx + jnp.arange(t)
        bias_hts = None
        if table_hb is not None:
            # The bucket of distance n = q - k >= 0 from a static table, so every bucket equals
            # the training bias of the same offset exactly (future slots are masked anyway).
            by_distance = offset_buckets(-np.arange(s), self.rel_buckets, self.rel_max_distance)
            distance_ts = jnp.clip(q_slot_t[:, None] - jnp.arange(s)[None, :], 0, s - 1)
            buckets_ts = jnp.asarray(by_distance)[distance_ts]
            bias_hts = jnp.take(table_hb.astype(self.dtype), buckets_ts, axis=1)
        mask = cached_attention_mask(q_slot_t, segment_ids_bt, seg.value, self.sliding_window)
        return xla_attention(q_bthd, k_bsgd, v_bsgd, bias_hts, mask, scale)
