"""Checks a run config before anything is built, so a bad value fails in one clear sentence."""

from __future__ import annotations

import ml_collections

from glam_jax.errors import GlamError
from glam_jax.layers import dtype_of
from glam_jax.model import REMAT_POLICIES, SegmentError, segments
from glam_jax.moe import capacity, dispatch, routers


class ConfigError(GlamError):
    """An invalid config value; the message names the field, the value and what is valid."""


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_model(config: ml_collections.ConfigDict) -> None:
    """Model/MoE fields that do not depend on the devices."""
    mc, moe = config.model, config.moe
    for name in ("vocab_size", "num_layers", "embed_dim", "mlp_dim", "num_heads", "head_dim"):
        _need(mc[name] >= 1, f"model.{name}={mc[name]} must be >= 1.")
    if mc.get("segments"):
        _check_segments(config)
    else:
        _check_block(config)
    kv = mc.num_kv_heads or mc.num_heads
    _need(
        mc.num_heads % kv == 0,
        f"model.num_heads={mc.num_heads} must be a multiple of model.num_kv_heads={kv}.",
    )
    for name in ("dtype", "param_dtype"):
        try:
            dtype_of(mc[name])
        except ValueError as err:
            raise ConfigError(f"model.{name}: {err}") from None
    _need(
        mc.remat_scope in ("block", "ffn"),
        f"model.remat_scope={mc.remat_scope!r} is not valid; valid: 'block', 'ffn'.",
    )
    _need(
        mc.remat_policy in REMAT_POLICIES,
        f"model.remat_policy={mc.remat_policy!r} is not valid; valid: {sorted(REMAT_POLICIES)}.",
    )
    _need(
        mc.position in ("relative_bias", "rope", "none"),
        f"model.position={mc.position!r} is not valid; valid: relative_bias, rope, none.",
    )
    _need(
        mc.position != "rope" or mc.head_dim % 2 == 0,
        f"model.head_dim={mc.head_dim} must be even for position='rope' (it rotates pairs).",
    )
    _need(
        mc.sliding_window >= 0,
        f"model.sliding_window={mc.sliding_window} must be >= 0 (0 = full causal attention).",
    )
    if moe.num_experts == 0:
        return
    _need(moe.num_experts >= 1, f"moe.num_experts={moe.num_experts} must be >= 0.")
    _need(
        moe.router in routers.ROUTERS,
        f"moe.router={moe.router!r} is not valid; valid: {tuple(routers.ROUTERS)}.",
    )
    spec = routers.ROUTERS[moe.router]
    _need(
        moe.dispatch in dispatch.DISPATCHES,
        f"moe.dispatch={moe.dispatch!r} is not valid; valid: {dispatch.DISPATCHES}.",
    )
    _need(
        moe.decode_dispatch in dispatch.DISPATCHES,
        f"moe.decode_dispatch={moe.decode_dispatch!r} is not valid; valid: {dispatch.DISPATCHES}.",
    )
    for name in ("capacity_factor_train", "capacity_factor_eval"):
        _need(
            moe[name] > 0, f"moe.{name}={moe[name]} must be > 0 (1.25 train / 2.0 eval are usual)."
        )
    _need(
        moe.capacity_convention in capacity.CAPACITY_CONVENTIONS,
        f"moe.capacity_convention={moe.capacity_convention!r} is not valid; "
        f"valid: {capacity.CAPACITY_CONVENTIONS}.",
    )
    fixed = spec.fixed_k
    _need(
        fixed is None or moe.num_selected == fixed,
        f"moe.router={moe.router!r} always picks {fixed} expert(s) per token, "
        f"but moe.num_selected={moe.num_selected}.",
    )
    _need(
        1 <= moe.num_selected <= moe.num_experts,
        f"moe.num_selected={moe.num_selected} must be in [1, moe.num_experts={moe.num_experts}].",
    )
    complaint = spec.check(moe)
    _need(complaint is None, complaint or "")
    _need(moe.group_size >= 1, f"moe.group_size={moe.group_size} must be >= 1.")
    _need(
        moe.expert_exchange in dispatch.EXCHANGES,
        f"moe.expert_exchange={moe.expert_exchange!r} is not valid; valid: {dispatch.EXCHANGES}.",
    )
    _need(
        not (moe.expert_exchange == "all_to_all" and moe.dispatch == "dropless"),
        "moe.expert_exchange='all_to_all' exchanges fixed-capacity buffers, so it needs "
        "moe.dispatch='einsum' or 'sort', not 'dropless'.",
    )


def _check_block(config: ml_collections.ConfigDict) -> None:
    """The default stack: one segment of moe.every-layer blocks."""
    mc, moe = config.model, config.moe
    _need(moe.every >= 1, f"moe.every={moe.every} must be >= 1 (1 = every layer is MoE).")
    _need(
        mc.num_layers % moe.every == 0,
        f"model.num_layers={mc.num_layers} must be a multiple of moe.every={moe.every} "
        "(the scan body is one block of moe.every layers).",
    )
    _need(
        0 <= moe.moe_index_in_block < moe.every,
        f"moe.moe_index_in_block={moe.moe_index_in_block} must be in [0, moe.every={moe.every}).",
    )


def _check_segments(config: ml_collections.ConfigDict) -> None:
    """An explicit model.segments stack: parses, adds up to num_layers, MoE only with experts."""
    mc = config.model
    try:
        stack = segments(config)
    except SegmentError as err:
        raise ConfigError(str(err)) from None
    total = sum(seg.num_layers for seg in stack)
    _need(
        total == mc.num_layers,
        f"model.segments={mc.segments!r} has {total} layers but model.num_layers="
        f"{mc.num_layers}; make them agree.",
    )
    has_moe = any("moe" in seg.pattern for seg in stack)
    _need(
        not has_moe or config.moe.num_experts > 0,
        f"model.segments={mc.segments!r} has MoE layers but moe.num_experts=0.",
    )


def check_run(config: ml_collections.ConfigDict, mesh_shape: tuple[int, int, int]) -> None:
    """Everything in check_model plus how batch and experts split over the resolved mesh."""
    check_model(config)
    data, expert, model = mesh_shape
    mc, moe, tc = config.model, config.moe, config.train
    if moe.num_experts:
        _need(
            moe.num_experts % expert == 0,
            f"moe.num_experts={moe.num_experts} is not divisible by the mesh expert axis "
            f"({expert}); use a mesh.shape whose expert size divides it.",
        )
    for name in ("batch_size", "eval_batch_size"):
        _need(
            tc[name] % (data * expert) == 0,
            f"train.{name}={tc[name]} is not divisible by mesh data x expert = {data * expert}.",
        )
    _need(
        tc.seq_len <= mc.max_len,
        f"train.seq_len={tc.seq_len} is larger than model.max_len={mc.max_len}, the longest "
        "sequence the model supports.",
    )
    for name, size in (("num_heads", mc.num_heads), ("mlp_dim", mc.mlp_dim)):
        _need(
            size % model == 0,
            f"model.{name}={size} is not divisible by the mesh model axis ({model}).",
        )
