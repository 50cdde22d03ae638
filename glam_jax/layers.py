"""Small building blocks shared by attention, FFN and MoE: norms, embedding, projections, FFN.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`), so
`glam_jax.sharding` alone decides where it lives. No biases anywhere (GLaM).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glam_jax import sharding

Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NORMS = ("rmsnorm", "layernorm")
OUTPUT_GATES = ("none", "sigmoid")  # GluFFN.output_gate (moe.shared_expert_gate)
ACTIVATIONS = {"gelu": lambda x: nn.gelu(x, approximate=True), "silu": nn.silu, "relu": nn.relu}


def dtype_of(name: str) -> jnp.dtype:
    """'bfloat16' -> jnp.bfloat16 with a clear error for anything else."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; valid: {sorted(DTYPES)}.")
    return DTYPES[name]


def param_with_axes(module: nn.Module, name: str, init, shape, dtype, axes: tuple[str, ...]):
    """Creates a parameter whose metadata carries its logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding hint on an activation, by logical names (a no-op outside a mesh).

    Flax replicates an axis whose name has no rule, so a misspelt name is refused here instead.
    """
    sharding.check_logical_axes(axes, where="constrain")
    return nn.with_logical_constraint(x, axes)


def activation_fn(name: str):
    """The FFN non-linearity by config name."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"model.ffn_activation={name!r} is not supported; valid: {sorted(ACTIVATIONS)}."
        )
    return ACTIVATIONS[name]


class Norm(nn.Module):
    """RMSNorm (scale only, GLaM/T5) or LayerNorm (scale only, no bias); computed in float32."""

    kind: str = "rmsnorm"
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btm: jax.Array) -> jax.Array:
        """x [..., M] normalised over M and scaled, in the module's dtype."""
        x = x_btm.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        elif self.kind != "rmsnorm":
            raise ValueError(f"model.norm={self.kind!r} is not supported; valid: {NORMS}.")
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        scale = param_with_axes(
            self, "scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype, ("embed",)
        )
        return (x * scale.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
    """Token embedding [vocab, embed]; `attend` reuses it as the output softmax (tied)."""

    vocab_size: int
    embed_dim: int
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        """Creates the [vocab, embed] table (shared by __call__ and attend)."""
        self.embedding = param_with_axes(
            self,
            "embedding",
            nn.initializers.normal(self.init_std),
            (self.vocab_size, self.embed_dim),
            self.param_dtype,
            ("vocab", "embed"),
        )

    def __call__(self, ids_bt: jax.Array) -> jax.Array:
        """Token ids [B, T] -> embeddings [B, T, M]."""
        # A one-hot matmul would shard the vocab cleanly, but a gather is cheaper at 32K vocab.
        x_btm = jnp.take(self.embedding, ids_bt, axis=0).astype(self.dtype)
        return constrain(x_btm, ("batch", "length", "embed"))

    def attend(self, x_btm: jax.Array, scale: float = 1.0) -> jax.Array:
        """Logits x @ embedding^T * scale. The scale multiplies the [V, M] table as it is cast,
        not the [B, T, V] logits, so no logits-sized element-wise op is left for XLA to place
        (on the H100 MoE step this measured within run-to-run spread, docs/performance.md)."""
        table_vm = self.embedding if scale == 1.0 else self.embedding * scale
        logits_btv = jnp.einsum("btm,vm->btv", x_btm, table_vm.astype(self.dtype))
        return constrain(logits_btv, ("batch", "length", "vocab"))


class GluFFN(nn.Module):
    """Gated FFN: act(x W0) * (x W1) W_out (GLaM gated GELU, Mixtral SwiGLU); or act(x W0) W_out."""

    mlp_dim: int
    activation: str = "gelu"
    glu: bool = True
    init_std: float = 0.02
    dropout_rate: float = 0.0
    deterministic: bool = True  # no dropout (evaluation); an attribute so remat needs no statics
    output_gate: str = "none"  # 'sigmoid': output times sigmoid(x w_gate [M, 1]) (Qwen2-MoE)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btm: jax.Array) -> jax.Array:
        """x [B, T, M] -> FFN output [B, T, M]."""
        if self.output_gate not in OUTPUT_GATES:
            raise ValueError(
                f"output gate {self.output_gate!r} is not valid; valid: {OUTPUT_GATES}."
            )
        m = x_btm.shape[-1]
        init = nn.initializers.normal(self.init_std)
        act = activation_fn(self.activation)
        wi0 = param_with_axes(
            self, "wi_0", init, (m, self.mlp_dim), self.param_dtype, ("embed", "mlp")
        )
        h_bth = act(jnp.einsum("btm,mh->bth", x_btm, wi0.astype(self.dtype)))
        if self.glu:
            wi1 = param_with_axes(
                self, "wi_1", init, (m, self.mlp_dim), self.param_dtype, ("embed", "mlp")
            )
            h_bth = h_bth * jnp.einsum("btm,mh->bth", x_btm, wi1.astype(self.dtype))
        h_bth = constrain(h_bth, ("batch", "length", "mlp"))
        h_bth = nn.Dropout(self.dropout_rate)(h_bth, deterministic=self.deterministic)
        wo = param_with_axes(
            self, "wo", init, (self.mlp_dim, m), self.param_dtype, ("mlp", "embed")
        )
        y_btm = jnp.einsum("bth,hm->btm", h_bth, wo.astype(self.dtype))
        if self.output_gate == "sigmoid":
            w_gate = param_with_axes(self, "gate", init, (m, 1), self.param_dtype, ("embed", None))
            gate_bt1 = jnp.einsum("btm,mo->bto", x_btm, w_gate.astype(self.dtype))
            y_btm = y_btm * jax.nn.sigmoid(gate_bt1)
        return constrain(y_btm, ("batch", "length", "embed"))
