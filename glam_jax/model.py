"""The decoder-only (MoE) transformer LM.

The layer stack is ONE `nn.scan` over blocks of `moe.every` layers (GLaM: a dense layer and
an MoE layer). Parameters of the scanned block carry a leading `layers` axis that is never
sharded, so device d holds the same experts in every layer and XLA compiles one loop body
whatever the depth. `model.scan_layers=False` builds the blocks one by one instead (MaxText's
`scan_layers` switch): same maths and sharding, no slicing of stacked buffers in the step,
compile time growing with depth.

`decode=True` (generation, glam_jax/decode.py) adds a key/value cache per attention layer in
the `cache` collection, stacked by the same scan; the training path is unchanged.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from glam_jax.attention import Attention
from glam_jax.layers import Embed, GluFFN, Norm, constrain, dtype_of, param_with_axes
from glam_jax.moe import MoE

# Names accepted by model.remat_policy -> jax.checkpoint policy (None = save nothing).
REMAT_POLICIES = {
    "none": "no remat",
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}

# What model.remat_policy covers: the whole scan body, or only the FFN/MoE of each layer.
REMAT_SCOPES = ("block", "ffn")

# Per-layer MoE stats that are summed over layers into the loss.
LOSS_STATS = ("aux_loss", "z_loss", "importance_loss", "load_loss")


# Parameters the model reads only through `.astype(model.dtype)`, each once per layer: matmul
# weights and the relative-bias table. Casting them once per step, before the layer scan, gives
# the same numbers (a gradient in the compute dtype converted back, as inside the layer) but
# converts each weight once instead of in the forward loop and again in the rematerialised
# backward, and lets the scan stack weight gradients in the compute dtype. Left in float32: the
# router (routing is float32), norm scales (applied in float32) and the tied embedding (its two
# gradients are summed in float32).
COMPUTE_DTYPE_PARAMS = frozenset(
    {"query", "key", "value", "out", "rel_bias", "wi_0", "wi_1", "wo", "logits"}
)


def cast_for_compute(params: Any, dtype: Any) -> Any:
    """params with the COMPUTE_DTYPE_PARAMS leaves cast to the compute dtype (see above)."""

    def cast(path, leaf):
        name = getattr(path[-1], "key", None)
        if name in COMPUTE_DTYPE_PARAMS and jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.astype(dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(cast, params)


def frozen(config: ml_collections.ConfigDict | ml_collections.FrozenConfigDict):
    """Modules keep the config as a hashable FrozenConfigDict."""
    if isinstance(config, ml_collections.FrozenConfigDict):
        return config
    return ml_collections.FrozenConfigDict(config)


def num_kv_heads(mc) -> int:
    return mc.num_kv_heads or mc.num_heads


class DecoderLayer(nn.Module):
    """Pre-norm attention and pre-norm FFN (dense or MoE), each with a residual."""

    config: Any
    use_moe: bool
    train: bool = False
    decode: bool = False

    @nn.compact
    def __call__(self, x_btm, segment_ids_bt, positions_bt):
        mc = self.config.model
        dtype, pdtype = dtype_of(mc.dtype), dtype_of(mc.param_dtype)
        norm = dict(kind=mc.norm, eps=mc.norm_eps, dtype=dtype, param_dtype=pdtype)
        h_btm = Norm(name="pre_attention_norm", **norm)(x_btm)
        h_btm = Attention(
            num_heads=mc.num_heads,
            num_kv_heads=num_kv_heads(mc),
            head_dim=mc.head_dim,
            position=mc.position,
            rel_buckets=mc.rel_buckets,
            rel_max_distance=mc.rel_max_distance,
            rope_theta=mc.rope_theta,
            sliding_window=mc.sliding_window,
            scale=mc.attention_scale,
            impl=mc.attention_impl,
            document_mask=mc.document_mask,
            init_std=mc.init_std,
            dtype=dtype,
            param_dtype=pdtype,
            decode=self.decode,
            name="attention",
        )(h_btm, segment_ids_bt, positions_bt)
        h_btm = nn.Dropout(mc.dropout_rate)(h_btm, deterministic=not self.train)
        x_btm = x_btm + h_btm
        h_btm = Norm(name="pre_ffn_norm", **norm)(x_btm)
        stats = {}
        moe_cls, ffn_cls = MoE, GluFFN
        if mc.remat_policy != "none" and mc.remat_scope == "ffn" and not self.decode:
            # Only the FFN is recomputed in the backward pass; attention keeps its residuals,
            # so the cuDNN forward kernel is not run twice.
            policy = REMAT_POLICIES[mc.remat_policy]
            moe_cls = nn.remat(MoE, policy=policy, prevent_cse=False)
            ffn_cls = nn.remat(GluFFN, policy=policy, prevent_cse=False)
        if self.use_moe:
            h_btm, stats = moe_cls(self.config, train=self.train, name="moe")(h_btm)
        else:
            h_btm = ffn_cls(
                mlp_dim=mc.mlp_dim,
                activation=mc.ffn_activation,
                glu=mc.ffn_glu,
                init_std=mc.init_std,
                dropout_rate=mc.dropout_rate,
                deterministic=not self.train,
                dtype=dtype,
                param_dtype=pdtype,
                name="ffn",
            )(h_btm)
        h_btm = nn.Dropout(mc.dropout_rate)(h_btm, deterministic=not self.train)
        x_btm = constrain(x_btm + h_btm, ("batch", "length", "embed"))
        return x_btm, stats


class Block(nn.Module):
    """`moe.every` consecutive layers, the MoE one at `moe.moe_index_in_block`: the scan body."""

    config: Any
    train: bool = False
    decode: bool = False

    @nn.compact
    def __call__(self, x_btm, segment_ids_bt, positions_bt):
        moe = self.config.moe
        stats = {}
        for i in range(moe.every):
            use_moe = moe.num_experts > 0 and i == moe.moe_index_in_block
            x_btm, layer_stats = DecoderLayer(
                self.config,
                use_moe=use_moe,
                train=self.train,
                decode=self.decode,
                name=f"layer_{i}",
            )(x_btm, segment_ids_bt, positions_bt)
            stats.update(layer_stats)
        return x_btm, stats


class Transformer(nn.Module):
    """Token ids [batch, length] -> logits [batch, length, vocab] and summed MoE stats.

    decode: use/extend the key/value cache (apply with mutable=['cache']); last_logits_only:
    logits of the last position only ([batch, 1, vocab]), all that generation needs.
    """

    config: Any

    @nn.compact
    def __call__(
        self,
        inputs_bt: jax.Array,
        segment_ids_bt: jax.Array | None = None,
        positions_bt: jax.Array | None = None,
        *,
        train: bool = False,
        decode: bool = False,
        last_logits_only: bool = False,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        config = frozen(self.config)
        mc = config.model
        dtype, pdtype = dtype_of(mc.dtype), dtype_of(mc.param_dtype)
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(inputs_bt.shape[1]), inputs_bt.shape)
        embed = Embed(
            mc.vocab_size, mc.embed_dim, mc.init_std, dtype=dtype, param_dtype=pdtype, name="embed"
        )
        x_btm = embed(inputs_bt)

        block = Block
        if mc.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"model.remat_policy={mc.remat_policy!r} is not valid; "
                f"valid: {sorted(REMAT_POLICIES)}."
            )
        if mc.remat_policy != "none" and mc.remat_scope == "block" and not decode:
            block = nn.remat(block, policy=REMAT_POLICIES[mc.remat_policy], prevent_cse=False)
        num_blocks = mc.num_layers // config.moe.every
        if mc.scan_layers:
            scanned = nn.scan(
                block,
                # 'intermediates': MoE routing sown for glam_jax/analysis, stacked per block.
                variable_axes={"params": 0, "cache": 0, "intermediates": 0}
                if decode
                else {"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True, "routing": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=num_blocks,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_btm, stats = scanned(config, train=train, decode=decode, name="blocks")(
                x_btm, segment_ids_bt, positions_bt
            )
        else:
            # One module per block (params blocks_0, blocks_1, ...): no per-iteration slicing
            # of stacked weights and residuals, at a compile time that grows with depth.
            per_block = []
            for i in range(num_blocks):
                x_btm, block_stats = block(config, train=train, decode=decode, name=f"blocks_{i}")(
                    x_btm, segment_ids_bt, positions_bt
                )
                per_block.append(block_stats)
            stats = jax.tree.map(lambda *xs: jnp.stack(xs), *per_block)  # as the scan stacks
        if last_logits_only:
            x_btm = x_btm[:, -1:]
        x_btm = Norm(mc.norm, mc.norm_eps, dtype=dtype, param_dtype=pdtype, name="final_norm")(
            x_btm
        )
        if mc.tie_embeddings:
            scale = mc.embed_dim**-0.5 if mc.logits_via_embedding_scale else 1.0
            logits_btv = embed.attend(x_btm, scale)
        else:
            w_mv = param_with_axes(
                self,
                "logits",
                nn.initializers.normal(mc.init_std),
                (mc.embed_dim, mc.vocab_size),
                pdtype,
                ("embed", "vocab"),
            )
            logits_btv = jnp.einsum("btm,mv->btv", x_btm, w_mv.astype(dtype))
        logits_btv = constrain(logits_btv, ("batch", "length", "vocab"))
        return logits_btv, summarise_moe_stats(stats)


def summarise_moe_stats(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-block stacked stats -> losses summed over MoE layers plus per-layer metrics."""
    out = {name: jnp.zeros((), jnp.float32) for name in LOSS_STATS}
    if not stats:
        return out
    for name in LOSS_STATS:
        out[name] = jnp.sum(stats[name])
    out["expert_load"] = stats["expert_load"]  # [moe layers, E]
    out["dropped_fraction"] = stats["dropped_fraction"]  # [moe layers]
    out["router_entropy"] = stats["router_entropy"]  # [moe layers]
    top1 = stats["top1"]  # [moe layers, B, S]
    if top1.shape[0] > 1:
        out["top1_stability"] = jnp.mean((top1[1:] == top1[:-1]).astype(jnp.float32))
    return out
