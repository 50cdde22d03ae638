"""Checks a run config before anything is built, so a bad value fails in one clear sentence.

Three tables drive it: `enumerated_knobs()` (knob -> the owning module's table of valid names),
`LOWER_BOUNDS` (counts and sizes that must be at least some value) and `split_sizes()` (sizes
that the mesh splits along a logical axis, so they must divide evenly).
"""

from __future__ import annotations

import math
import types
from collections.abc import Collection

import jax
import ml_collections

from glam_jax import attention, layers, model, optim, sharding
from glam_jax.errors import GlamError
from glam_jax.moe import capacity, dispatch, routers


class ConfigError(GlamError):
    """An invalid config value; the message names the field, the value and what is valid."""


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def enumerated_knobs() -> dict[str, Collection[str]]:
    """Every knob that takes one of a fixed set of names -> that set, as its owner defines it."""
    from glam_jax.data import text_corpus, tokenizer  # imports TFDS: only when checking a run

    return {
        "model.dtype": layers.DTYPES,
        "model.param_dtype": layers.DTYPES,
        "model.norm": layers.NORMS,
        "model.ffn_activation": layers.ACTIVATIONS,
        "model.position": attention.POSITIONS,
        "model.attention_impl": attention.ATTENTION_IMPLS,
        "model.qk_norm": attention.QK_NORMS,
        "model.remat_policy": model.REMAT_POLICIES,
        "model.remat_scope": model.REMAT_SCOPES,
        "moe.router": routers.ROUTERS,
        "moe.second_expert_policy": routers.SECOND_EXPERT_POLICIES,
        "moe.router_score": routers.ROUTER_SCORES,
        "moe.group_score": routers.GROUP_SCORES,
        "moe.gate_norm": capacity.GATE_NORMS,
        "moe.dispatch": dispatch.DISPATCHES,
        "moe.decode_dispatch": dispatch.DISPATCHES,
        "moe.capacity_convention": capacity.CAPACITY_CONVENTIONS,
        "moe.expert_exchange": dispatch.EXCHANGES,
        "moe.ragged_matmul": dispatch.RAGGED_MATMUL_CHOICES,
        "moe.shared_expert_gate": layers.OUTPUT_GATES,
        "train.optimizer": optim.OPTIMIZERS,
        "train.decay": optim.DECAYS,
        "data.corpus": text_corpus.EMBEDDED_CORPORA,
        "data.document_split": text_corpus.DOCUMENT_SPLITS,
        "data.undecodable_files": text_corpus.UNDECODABLE_POLICIES,
        "data.spm_model_type": tokenizer.MODEL_TYPES,
    }


# Counts and sizes -> the smallest valid value (0 often means "off" or "as large as possible").
LOWER_BOUNDS = {
    "model.vocab_size": 1,
    "model.num_layers": 1,
    "model.embed_dim": 1,
    "model.mlp_dim": 1,
    "model.num_heads": 1,
    "model.num_kv_heads": 0,
    "model.head_dim": 1,
    "model.max_len": 1,
    "model.sliding_window": 0,
    "moe.num_experts": 0,
    "moe.every": 1,
    "moe.expert_mlp_dim": 0,
    "moe.num_shared_experts": 0,
    "moe.shared_expert_mlp_dim": 0,
    "moe.expert_bias_update_rate": 0,
    "moe.group_size": 1,
    "moe.min_capacity": 0,
    "moe.num_groups": 1,
    "moe.topk_groups": 1,
    "moe.routed_scaling_factor": 0,
    "moe.sequence_aux_loss_weight": 0,
    "train.batch_size": 1,
    "train.eval_batch_size": 1,
    "train.seq_len": 1,
    "train.steps": 1,
    "train.warmup_steps": 0,
    "train.log_every": 1,
    "train.eval_every": 0,
    "train.eval_batches": 0,
    "train.checkpoint_every": -1,
    "train.keep_checkpoints": 1,
    "train.max_nonfinite_steps": 1,
    "train.learning_rate": 0,
    "train.grad_clip_norm": 0,
    "train.weight_decay": 0,
    "data.worker_count": 0,
    "data.max_document_chars": 0,
    "data.tokenize_threads": 0,
    "data.num_streams": 0,
}


def _listing(valid: Collection[str]) -> str:
    return ", ".join(repr(v) for v in valid)


def _value(config: ml_collections.ConfigDict, knob: str):
    part, key = knob.split(".")
    return config[part][key]


def check_values(config: ml_collections.ConfigDict) -> None:
    """Every enumerated knob against its valid names and every count against its lower bound."""
    for knob, valid in enumerated_knobs().items():
        value = _value(config, knob)
        _need(
            isinstance(value, str) and value in valid,
            f"{knob}={value!r} is not valid; valid: {_listing(valid)}.",
        )
    for knob, lowest in LOWER_BOUNDS.items():
        value = _value(config, knob)
        _need(
            isinstance(value, (int, float)) and math.isfinite(value) and value >= lowest,
            f"{knob}={value!r} is not valid; it must be a number >= {lowest}.",
        )


def check_model(config: ml_collections.ConfigDict) -> None:
    """Model/MoE fields that do not depend on the devices."""
    mc, moe = config.model, config.moe
    _need(moe.every >= 1, f"moe.every={moe.every} must be >= 1 (1 = every layer is MoE).")
    check_values(config)
    if mc.get("segments"):
        _check_segments(config)
    else:
        _check_block(config)
    kv = mc.num_kv_heads or mc.num_heads
    _need(
        mc.num_heads % kv == 0,
        f"model.num_heads={mc.num_heads} must be a multiple of model.num_kv_heads={kv}.",
    )
    _need(
        mc.position != "rope" or mc.head_dim % 2 == 0,
        f"model.head_dim={mc.head_dim} must be even for position='rope' (it rotates pairs).",
    )
    if moe.num_experts == 0:
        return
    for name in ("capacity_factor_train", "capacity_factor_eval"):
        _need(
            moe[name] > 0, f"moe.{name}={moe[name]} must be > 0 (1.25 train / 2.0 eval are usual)."
        )
    spec = routers.ROUTERS[moe.router]
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
    biased = [name for name, r in routers.ROUTERS.items() if r.choice_bias]
    _need(
        moe.expert_bias_update_rate == 0 or spec.choice_bias,
        f"moe.expert_bias_update_rate={moe.expert_bias_update_rate} needs a router that chooses "
        f"with the balancing bias ({_listing(biased)}), not moe.router={moe.router!r}.",
    )
    complaint = spec.check(moe)  # the router's own rules (RouterSpec.check)
    _need(complaint is None, complaint or "")
    _check_routing_options(moe, spec)
    _need(
        not (moe.expert_exchange == "ragged_all_to_all" and moe.dispatch != "dropless"),
        "moe.expert_exchange='ragged_all_to_all' sends variable numbers of rows, which only "
        f"moe.dispatch='dropless' has; with moe.dispatch={moe.dispatch!r} use 'all_to_all'.",
    )


def _check_routing_options(moe, spec: routers.RouterSpec) -> None:
    """Routing zoo II knobs only where the chosen router honours them (RouterSpec flags)."""
    scored_routers = [n for n, r in routers.ROUTERS.items() if r.scored]
    if not spec.scored:
        for knob, default in (
            ("router_score", "softmax"),
            ("norm_topk_prob", False),
            ("routed_scaling_factor", 1.0),
            ("sequence_aux_loss_weight", 0.0),
        ):
            _need(
                moe[knob] == default,
                f"moe.{knob}={moe[knob]!r} is not read by moe.router={moe.router!r}; "
                f"set it to {default!r}, or use one of the routers {scored_routers}.",
            )
    _need(
        moe.routed_scaling_factor > 0,
        f"moe.routed_scaling_factor={moe.routed_scaling_factor} must be > 0 (1.0 = off).",
    )
    if not spec.grouped:
        for knob in ("num_groups", "topk_groups"):
            _need(
                moe[knob] == 1,
                f"moe.{knob}={moe[knob]} is not read by moe.router={moe.router!r}; set it to 1, "
                "or use moe.router='group_topk'.",
            )
    _need(
        moe.second_expert_policy != "sampling" or moe.router == "gshard_top2",
        f"moe.second_expert_policy='sampling' samples gshard_top2's second expert, but "
        f"moe.router={moe.router!r}; use moe.router='gshard_top2' or policy 'random'.",
    )
    if moe.gate_norm == "after_capacity":
        _need(
            moe.router != "expert_choice",
            "moe.gate_norm='after_capacity' renormalises each token's kept choices, but "
            "moe.router='expert_choice' has no per-token choices; use 'before_capacity'.",
        )
        _need(
            moe.num_selected > 1,
            f"moe.gate_norm='after_capacity' with moe.num_selected={moe.num_selected} makes "
            "every kept gate 1, so the router gets no gradient; use 'before_capacity' or k > 1.",
        )
        _need(
            moe.routed_scaling_factor == 1.0,
            f"moe.gate_norm='after_capacity' divides the gates by their sum, which undoes "
            f"moe.routed_scaling_factor={moe.routed_scaling_factor}; use one or the other.",
        )


def _check_block(config: ml_collections.ConfigDict) -> None:
    """The default stack: one segment of moe.every-layer blocks."""
    mc, moe = config.model, config.moe
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
        stack = model.segments(config)
    except model.SegmentError as err:
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


def split_sizes(config: ml_collections.ConfigDict) -> list[tuple[str, int, str]]:
    """(knob, the size it sets, the logical axis that size lies along) for every size the mesh
    splits; the rule table in glam_jax.sharding says over how many devices."""
    mc, moe, tc = config.model, config.moe, config.train
    rows = [
        ("model.num_heads", mc.num_heads, "heads"),
        ("model.num_kv_heads", mc.num_kv_heads or mc.num_heads, "heads"),
        ("model.mlp_dim", mc.mlp_dim, "mlp"),
        ("model.vocab_size", mc.vocab_size, "vocab"),
        ("train.batch_size", tc.batch_size, "batch"),
        ("train.eval_batch_size", tc.eval_batch_size, "batch"),
    ]
    if moe.num_experts:
        rows += [
            ("moe.num_experts", moe.num_experts, "expert"),
            ("moe.expert_mlp_dim", moe.expert_mlp_dim or mc.mlp_dim, "mlp"),
        ]
    if moe.num_experts and moe.num_shared_experts:
        rows.append(("moe.shared_expert_mlp_dim", model.shared_expert_mlp_dim(config), "mlp"))
    return rows


def _check_kernel(config: ml_collections.ConfigDict, mesh_shape: tuple[int, int, int]) -> None:
    """An explicitly named grouped-matmul kernel must run here on the per-device expert shape."""
    mc, moe = config.model, config.moe
    if not moe.num_experts or moe.dispatch != "dropless" or moe.ragged_matmul in ("auto", "xla"):
        return
    hidden = (moe.expert_mlp_dim or mc.mlp_dim) // sharding.ways_on_mesh_shape("mlp", mesh_shape)
    shape = (moe.num_experts, mc.embed_dim, hidden)
    weights = types.SimpleNamespace(wi_0=jax.ShapeDtypeStruct(shape, layers.dtype_of(mc.dtype)))
    try:
        dispatch.resolve_ragged_matmul(moe.ragged_matmul, weights)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_run(config: ml_collections.ConfigDict, mesh_shape: tuple[int, int, int]) -> None:
    """Everything in check_model plus how batch and experts split over the resolved mesh."""
    check_model(config)
    mc, tc = config.model, config.train
    for knob, size, axis in split_sizes(config):
        ways = sharding.ways_on_mesh_shape(axis, mesh_shape)
        _need(
            size % ways == 0,
            f"{knob}={size} is not divisible by {ways}, the number of devices mesh.shape="
            f"{tuple(mesh_shape)} splits logical axis {axis!r} over; use a multiple of {ways}.",
        )
    _need(
        tc.seq_len <= mc.max_len,
        f"train.seq_len={tc.seq_len} is larger than model.max_len={mc.max_len}, the longest "
        "sequence the model supports.",
    )
    _need(
        not (
            config.moe.num_experts
            and config.moe.expert_exchange == "ragged_all_to_all"
            and sharding.ways_on_mesh_shape("expert", mesh_shape) > 1
            and jax.default_backend() == "cpu"
        ),
        "moe.expert_exchange='ragged_all_to_all' cannot run on CPU devices (XLA:CPU has no "
        "ragged all-to-all); use 'all_to_all', which sends padded slots instead.",
    )
    _check_kernel(config, mesh_shape)
