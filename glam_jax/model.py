"""The decoder-only (MoE) transformer LM.

The layer stack is a list of segments, each a block pattern of FFN kinds (`FFN_KINDS`: dense,
moe) repeated some number of times (`segments`). Each segment is ONE `nn.scan` over its blocks
(GLaM: one segment of (dense, moe) blocks; "first k dense, then MoE": two segments).
Parameters of a scanned block carry a leading `layers` axis that is never sharded, so device d
holds the same experts in every layer and XLA compiles one loop body per segment whatever the
depth. `model.scan_layers=False` builds the blocks one by one instead (MaxText's `scan_layers`
switch): same maths and sharding, no slicing of stacked buffers in the step, compile time
growing with depth.

`decode=True` (generation, glam_jax/decode.py) adds a key/value cache per attention layer in
the `cache` collection, stacked by the same scan; the training path is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from glam_jax.attention import Attention
from glam_jax.errors import GlamError
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
LOSS_STATS = ("aux_loss", "z_loss", "importance_loss", "load_loss", "sequence_aux_loss")


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
    """Key/value heads (grouped-query attention); 0 in the config means one per query head."""
    return mc.num_kv_heads or mc.num_heads


class SegmentError(GlamError):
    """A `model.segments` string that does not describe the layer stack, in one sentence."""


@dataclasses.dataclass(frozen=True)
class Segment:
    """`repeats` consecutive blocks of the FFN kinds in `pattern`: one scan (one loop body)."""

    pattern: tuple[str, ...]  # FFN kind of each layer of one block, e.g. ('dense', 'moe')
    repeats: int

    @property
    def num_layers(self) -> int:
        """Layers in the whole segment."""
        return len(self.pattern) * self.repeats


_SEGMENT = re.compile(r"\(([^()]*)\)\s*\*\s*(\d+)")


def parse_segments(text: str) -> tuple[Segment, ...]:
    """'(dense)*2 (dense,moe)*3' -> two Segments; the FFN kinds are names of FFN_KINDS."""
    found = _SEGMENT.findall(text)
    if not found or _SEGMENT.sub("", text).strip(" ;,"):
        raise SegmentError(
            f"model.segments={text!r} is not a list of '(kind,kind,...)*repeats' "
            f"with kinds from {sorted(FFN_KINDS)}, e.g. '(dense)*2 (dense,moe)*3'."
        )
    out = []
    for pattern, repeats in found:
        kinds = tuple(k.strip() for k in pattern.split(","))
        bad = [k for k in kinds if k not in FFN_KINDS]
        if bad or int(repeats) < 1:
            raise SegmentError(
                f"model.segments={text!r}: each block needs FFN kinds from {sorted(FFN_KINDS)} "
                f"and repeats >= 1 (got {bad or repeats})."
            )
        out.append(Segment(kinds, int(repeats)))
    return tuple(out)


def segments(config) -> tuple[Segment, ...]:
    """The layer stack of a config: `model.segments` if set, else one segment of blocks of
    `moe.every` layers with the MoE FFN at `moe.moe_index_in_block` (all dense without experts)."""
    mc, moe = config.model, config.moe
    if mc.get("segments"):
        return parse_segments(mc.segments)
    pattern = tuple(
        "moe" if moe.num_experts > 0 and i == moe.moe_index_in_block else "dense"
        for i in range(moe.every)
    )
    return (Segment(pattern, mc.num_layers // moe.every),)


def _gated_ffn(config, train: bool, wrap, *, mlp_dim: int, name: str, output_gate="none"):
    """The dense gated FFN module (GluFFN) of width mlp_dim: the dense kind and shared experts."""
    mc = config.model
    return wrap(GluFFN)(
        mlp_dim=mlp_dim,
        activation=mc.ffn_activation,
        glu=mc.ffn_glu,
        init_std=mc.init_std,
        dropout_rate=mc.dropout_rate,
        deterministic=not train,
        output_gate=output_gate,
        dtype=dtype_of(mc.dtype),
        param_dtype=dtype_of(mc.param_dtype),
        name=name,
    )


def _dense_ffn(config, train: bool, wrap):
    """The dense gated FFN as an FFN kind: (y, no stats)."""
    ffn = _gated_ffn(config, train, wrap, mlp_dim=config.model.mlp_dim, name="ffn")
    return lambda h_btm: (ffn(h_btm), {})


def shared_expert_mlp_dim(config) -> int:
    """Width of the one dense FFN holding the shared experts: moe.shared_expert_mlp_dim, or
    num_shared_experts x the routed expert width (DeepSeek-V2/V3's moe_intermediate_size x
    n_shared_experts; Qwen2-MoE states its shared_expert_intermediate_size)."""
    moe = config.moe
    routed = moe.expert_mlp_dim or config.model.mlp_dim
    return moe.shared_expert_mlp_dim or moe.num_shared_experts * routed


def _moe_ffn(config, train: bool, wrap):
    """The MoE layer as an FFN kind: (y, routing stats). With moe.num_shared_experts, the dense
    kind's FFN (`shared_expert`, optionally sigmoid-gated) runs beside the routed experts on the
    same input and their outputs add (DeepSeekMoE, Qwen2-MoE)."""
    routed = wrap(MoE)(config, train=train, name="moe")
    moe = config.moe
    if not moe.num_shared_experts:
        return routed
    shared = _gated_ffn(
        config,
        train,
        wrap,
        mlp_dim=shared_expert_mlp_dim(config),
        name="shared_expert",
        output_gate=moe.shared_expert_gate,
    )

    def ffn(h_btm):
        y_btm, stats = routed(h_btm)
        return y_btm + shared(h_btm), stats

    return ffn


# FFN kind -> builder(config, train, wrap) of a callable h -> (y, stats), made inside the layer
# (wrap is the remat wrapper or the identity); the parameter scope is the builder's `name`.
FFN_KINDS = {"dense": _dense_ffn, "moe": _moe_ffn}


class DecoderLayer(nn.Module):
    """Pre-norm attention and pre-norm FFN (dense or MoE), each with a residual."""

    config: Any
    ffn: str  # a key of FFN_KINDS
    train: bool = False
    decode: bool = False

    @nn.compact
    def __call__(self, x_btm, segment_ids_bt, positions_bt):
        """x [B, S, M] -> (x [B, S, M], the FFN's stats)."""
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
            qk_norm=mc.qk_norm,
            qkv_bias=mc.qkv_bias,
            norm_eps=mc.norm_eps,
            init_std=mc.init_std,
            dtype=dtype,
            param_dtype=pdtype,
            decode=self.decode,
            name="attention",
        )(h_btm, segment_ids_bt, positions_bt)
        h_btm = nn.Dropout(mc.dropout_rate)(h_btm, deterministic=not self.train)
        x_btm = x_btm + h_btm
        h_btm = Norm(name="pre_ffn_norm", **norm)(x_btm)
        wrap = lambda cls: cls  # noqa: E731
        if mc.remat_policy != "none" and mc.remat_scope == "ffn" and not self.decode:
            # Only the FFN is recomputed in the backward pass; attention keeps its residuals,
            # so the cuDNN forward kernel is not run twice.
            policy = REMAT_POLICIES[mc.remat_policy]
            wrap = lambda cls: nn.remat(cls, policy=policy, prevent_cse=False)  # noqa: E731
        h_btm, stats = FFN_KINDS[self.ffn](self.config, self.train, wrap)(h_btm)
        h_btm = nn.Dropout(mc.dropout_rate)(h_btm, deterministic=not self.train)
        x_btm = constrain(x_btm + h_btm, ("batch", "length", "embed"))
        return x_btm, stats


class Block(nn.Module):
    """One layer per FFN kind of `pattern` (GLaM: dense then MoE): the scan body of a segment."""

    config: Any
    pattern: tuple[str, ...]
    train: bool = False
    decode: bool = False

    @nn.compact
    def __call__(self, x_btm, segment_ids_bt, positions_bt):
        """x [B, S, M] -> (x, stats stacked over the block's MoE layers [n, ...] or {})."""
        per_layer = []
        for i, ffn in enumerate(self.pattern):
            x_btm, layer_stats = DecoderLayer(
                self.config, ffn=ffn, train=self.train, decode=self.decode, name=f"layer_{i}"
            )(x_btm, segment_ids_bt, positions_bt)
            if layer_stats:
                per_layer.append(layer_stats)
        if not per_layer:
            return x_btm, {}
        return x_btm, jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)


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
        """Token ids [B, S] -> (logits [B, S or 1, V], MoE losses summed and per-layer metrics)."""
        config = frozen(self.config)
        mc = config.model
        dtype, pdtype = dtype_of(mc.dtype), dtype_of(mc.param_dtype)
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(inputs_bt.shape[1]), inputs_bt.shape)
        embed = Embed(
            mc.vocab_size, mc.embed_dim, mc.init_std, dtype=dtype, param_dtype=pdtype, name="embed"
        )
        x_btm = embed(inputs_bt)

        if mc.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"model.remat_policy={mc.remat_policy!r} is not valid; "
                f"valid: {sorted(REMAT_POLICIES)}."
            )
        stack = segments(config)
        per_segment = []
        for j, segment in enumerate(stack):
            name = "blocks" if len(stack) == 1 else f"segment_{j}"
            x_btm, seg_stats = self._segment(config, segment, name, train, decode)(
                x_btm, segment_ids_bt, positions_bt
            )
            per_segment.append(seg_stats)
        stats = {}
        if any(per_segment):  # [MoE layers, ...] in layer order
            stats = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[st for st in per_segment if st])
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

    def _segment(self, config, segment: Segment, name: str, train: bool, decode: bool):
        """The segment as one callable x -> (x, stats [MoE layers, ...]): one scan, or its
        blocks one by one (`model.scan_layers=False`: params name_0, name_1, ...)."""
        mc = config.model
        block_cls = Block
        if mc.remat_policy != "none" and mc.remat_scope == "block" and not decode:
            block_cls = nn.remat(Block, policy=REMAT_POLICIES[mc.remat_policy], prevent_cse=False)
        block = functools.partial(block_cls, config, segment.pattern, train=train, decode=decode)
        if mc.scan_layers:
            scanned = nn.scan(
                block_cls,
                # 'intermediates': MoE routing sown for glam_jax/analysis, stacked per block.
                # 'moe_state': the per-layer expert bias of auxiliary-loss-free balancing.
                variable_axes={"params": 0, "cache": 0, "intermediates": 0, "moe_state": 0}
                if decode
                else {"params": 0, "intermediates": 0, "moe_state": 0},
                split_rngs={"params": True, "dropout": True, "routing": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=segment.repeats,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(config, segment.pattern, train=train, decode=decode, name=name)

            def run(x_btm, segment_ids_bt, positions_bt):
                x_btm, stats = scanned(x_btm, segment_ids_bt, positions_bt)
                return x_btm, jax.tree.map(_merge_leading_axes, stats)

            return run

        def run_unrolled(x_btm, segment_ids_bt, positions_bt):
            # One module per block: no per-iteration slicing of stacked weights and residuals,
            # at a compile time that grows with depth.
            per_block = []
            for i in range(segment.repeats):
                x_btm, block_stats = block(name=f"{name}_{i}")(x_btm, segment_ids_bt, positions_bt)
                per_block.append(block_stats)
            if not per_block[0]:
                return x_btm, {}
            return x_btm, jax.tree.map(lambda *xs: jnp.concatenate(xs), *per_block)

        return run_unrolled


def _merge_leading_axes(x: jax.Array) -> jax.Array:
    """[blocks, MoE layers per block, ...] -> [MoE layers, ...] in layer order."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


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
    load = stats["expert_load"]
    out["expert_load_max_over_mean"] = jnp.max(load, -1) / jnp.mean(load, -1)  # [moe layers]
    if "expert_bias" in stats:  # auxiliary-loss-free balancing: the bias this step chose with
        out["expert_bias"] = stats["expert_bias"]  # [moe layers, E]
    top1 = stats["top1"]  # [moe layers, B, S]
    if top1.shape[0] > 1:
        out["top1_stability"] = jnp.mean((top1[1:] == top1[:-1]).astype(jnp.float32))
    return out
