"""Distillation of a trained (MoE) teacher into a dense student (Switch Transformer, section 5).

The student trains on hard_weight * CE(labels) + soft_weight * CE(teacher probabilities at
temperature T), both averaged over the real (weight 1) target tokens, through the project's one
training loop (`train.train_and_evaluate` with `TrainHooks`): same sharded state, optimizer,
schedules, data pipeline, checkpoints and eval. The teacher's forward runs inside the student's
jitted step on frozen parameters passed in as a plain input (no second process, no gradient).
By default the student starts from every teacher weight outside the experts (Switch's trick);
the FFNs in the teacher's MoE positions start fresh.

    result = train_student("/runs/moe", "/runs/student", config_overrides={"train.steps": 500})
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from glam_jax import checkpoint, flops, losses, pretrained, steps, train
from glam_jax.data import tokenizer as tokenizer_lib
from glam_jax.errors import GlamError
from glam_jax.layers import dtype_of
from glam_jax.metrics_writer import read_metrics
from glam_jax.model import cast_for_compute

RESULT_FILE = "distill_result.json"


class DistillError(GlamError):
    """A teacher, student or setting that distillation cannot use, in one sentence."""


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """The loss mix. Switch section 5 uses 0.25 hard / 0.75 soft.

    scale_soft_by_t2 multiplies the soft term by T^2 (Hinton et al. 2015), which keeps its
    gradient, shrunk by 1/T^2 through the softened softmax, comparable across temperatures;
    off by default (it changes nothing at T=1).
    """

    hard_weight: float = 0.25
    soft_weight: float = 0.75
    temperature: float = 1.0
    scale_soft_by_t2: bool = False

    def __post_init__(self):
        for name in ("hard_weight", "soft_weight"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise DistillError(f"{name}={value!r} is outside [0, 1]; use a weight in [0, 1].")
        if self.hard_weight + self.soft_weight <= 0:
            raise DistillError(
                "hard_weight=0 and soft_weight=0 leave nothing to train on; make one positive."
            )
        t = self.temperature
        if not (isinstance(t, int | float) and math.isfinite(t) and t > 0):
            raise DistillError(f"temperature={t!r} is not a positive number; use e.g. 1.0.")


# ---- the loss ------------------------------------------------------------------------------


def soft_cross_entropy(
    student_logits_btv: jax.Array, teacher_logits_btv: jax.Array, temperature: float
) -> tuple[jax.Array, jax.Array]:
    """(CE of softmax(student/T) against softmax(teacher/T), the teacher's entropy at T), each
    per token [batch, length] in float32; their difference is the KL divergence."""
    teacher_logp_btv = jax.nn.log_softmax(
        jax.lax.stop_gradient(teacher_logits_btv).astype(jnp.float32) / temperature, axis=-1
    )
    teacher_p_btv = jnp.exp(teacher_logp_btv)
    soft_bt = optax.softmax_cross_entropy(
        student_logits_btv.astype(jnp.float32) / temperature, teacher_p_btv
    )
    return soft_bt, -jnp.sum(teacher_p_btv * teacher_logp_btv, axis=-1)


def _objective(
    logits_btv, ce, weights_bt, denom, *, teacher_logits_btv, settings: DistillSettings
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The token objective of `steps.loss_and_metrics`: the hard CE `ce` mixed with the soft CE
    (padding, weight 0, counts in neither; both are means over the same real tokens). Metrics:
    soft_loss (the soft CE) and soft_kl (it less the teacher's entropy: 0 when the student
    matches the teacher, so comparable from batch to batch)."""
    soft_bt, entropy_bt = soft_cross_entropy(logits_btv, teacher_logits_btv, settings.temperature)
    soft = jnp.sum(soft_bt * weights_bt) / denom
    kl = soft - jnp.sum(entropy_bt * weights_bt) / denom
    scale = settings.temperature**2 if settings.scale_soft_by_t2 else 1.0
    objective = settings.hard_weight * ce + settings.soft_weight * scale * soft
    return objective, {"soft_loss": soft, "soft_kl": kl}


def distillation_loss(
    student_logits_btv: jax.Array,
    teacher_logits_btv: jax.Array,
    targets_bt: jax.Array,
    weights_bt: jax.Array,
    settings: DistillSettings = DistillSettings(),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(hard_weight * CE(targets) + soft_weight * [T^2 *] CE(teacher at T), {ce_loss, soft_loss}),
    each CE a mean over tokens of weight 1: what the distillation train step minimises (its
    total adds the trainer's logits z-loss)."""
    weights_bt = weights_bt.astype(jnp.float32)
    nll_bt, _ = losses.cross_entropy(student_logits_btv, targets_bt, weights_bt)
    denom = jnp.maximum(jnp.sum(weights_bt), 1.0)
    ce = jnp.sum(nll_bt) / denom
    loss, extra = _objective(
        student_logits_btv,
        ce,
        weights_bt,
        denom,
        teacher_logits_btv=teacher_logits_btv,
        settings=settings,
    )
    return loss, {"ce_loss": ce, **extra}


def teacher_logits(teacher_model, teacher_config, teacher_params, batch) -> jax.Array:
    """The teacher's eval-mode logits [batch, length, vocab] (no dropout, eval capacity)."""
    compute_params = cast_for_compute(teacher_params, dtype_of(teacher_config.model.dtype))
    logits_btv, _ = teacher_model.apply(
        {"params": compute_params},
        batch["inputs"],
        batch["segment_ids"],
        batch["positions"],
        train=False,
    )
    return jax.lax.stop_gradient(logits_btv)


def make_loss_fn(student_model, student_config, teacher_model, teacher_config, settings):
    """loss_fn(params, batch, rng, teacher_params, model_state) for `steps.make_train_step`: the
    trainer's loss with its CE term replaced by the distillation mix (z-losses and MoE losses
    kept; the student's model state, e.g. its expert bias, updated as in plain training)."""

    def loss_fn(params, batch, rng, teacher_params, model_state):
        objective = functools.partial(
            _objective,
            teacher_logits_btv=teacher_logits(teacher_model, teacher_config, teacher_params, batch),
            settings=settings,
        )
        return steps.loss_and_metrics(
            params, batch, rng, student_model, student_config, True, objective, model_state
        )

    return loss_fn


# ---- the student -------------------------------------------------------------------------


def student_mlp_dim(teacher_config: ml_collections.ConfigDict) -> int:
    """Dense FFN width with the teacher's activated FFN FLOPs per token (see student_config)."""
    mc, moe = teacher_config.model, teacher_config.moe
    if not moe.num_experts:
        return int(mc.mlp_dim)
    expert_width = moe.expert_mlp_dim or mc.mlp_dim
    per_block = mc.mlp_dim * (moe.every - 1) + moe.num_selected * expert_width
    return round(per_block / moe.every)


def student_config(teacher_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The dense student of the teacher's activated size: a copy of the teacher's config
    (layers, widths, attention, data, recipe, steps) with every FFN dense.

    Rule: each FFN gets width (mlp_dim * (every - 1) + k * expert_mlp_dim) / every (rounded), so a
    block of `every` layers activates the same FFN FLOPs per token as the teacher's (router
    FLOPs aside). For the FLOP-matched teachers (top-1 full-width experts, or top-2 with
    expert_mlp_dim = mlp_dim / 2) that is mlp_dim itself, so the teacher's dense FFNs are copied
    into the student too; for e.g. GLaM's top-2 full-width experts it is 1.5 x mlp_dim and only
    the non-FFN weights can be copied. Pass an explicit student config to train_student instead.
    """
    config = copy.deepcopy(teacher_config)
    config.model.mlp_dim = student_mlp_dim(teacher_config)
    config.moe.num_experts = 0
    return config


def _path(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def init_student_from_teacher(student_params: Any, teacher_params: Any) -> tuple[Any, list[str]]:
    """(student params with every teacher weight of the same path and shape copied, the paths
    left as initialised).

    Copied: embeddings, attention (relative-position bias included), norms, final norm, output
    projection and the dense FFNs of the same width. Left fresh: the FFNs in the teacher's MoE
    positions (the teacher has `moe/...` there, the student `ffn/...`) and FFNs whose width
    changed. Any other difference (a weight the other model lacks or shapes apart) is refused.
    Copies are new buffers in the student leaf's sharding and dtype.
    """
    teacher = {
        _path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(teacher_params)[0]
    }
    used, fresh = set(), []

    def take(path, leaf):
        name = _path(path)
        source = teacher.get(name)
        if source is not None and source.shape == leaf.shape:
            used.add(name)
            if isinstance(leaf, jax.Array):
                return jax.device_put(source.astype(leaf.dtype), leaf.sharding, may_alias=False)
            return jnp.asarray(source, leaf.dtype)
        if "ffn" in name.split("/"):
            fresh.append(name)
            return leaf
        what = "lacks it" if source is None else f"has shape {tuple(source.shape)}"
        raise DistillError(
            f"student weight {name} of shape {tuple(leaf.shape)} cannot come from the teacher, "
            f"which {what}; give the student the teacher's non-FFN shapes or turn "
            "init_from_teacher off."
        )

    params = jax.tree_util.tree_map_with_path(take, student_params)
    unused = [n for n in teacher if n not in used and "moe" not in n.split("/")]
    unused = [n for n in unused if "ffn" not in n.split("/")]
    if unused:
        raise DistillError(
            f"teacher weight {unused[0]} has no place in the student; give the student the "
            "teacher's layout (same scan_layers, tie_embeddings, moe.every) or turn "
            "init_from_teacher off."
        )
    return params, fresh


# ---- checks on workdirs and configs ----------------------------------------------------------


def _checkpoint_steps(workdir: str) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _trained_workdir_config(
    workdir: str, flag: str, config: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
    """`config`, else the one saved in a training workdir; refuses a missing workdir, one with no
    checkpoint, or (without `config`) one with no saved config."""
    if not workdir or not os.path.isdir(workdir):
        raise DistillError(f"{flag}={workdir!r} is not a directory; pass a training workdir.")
    if not _checkpoint_steps(workdir):
        raise DistillError(
            f"{flag}={workdir!r} holds no checkpoint under checkpoints/; train it first."
        )
    if config is not None:
        return config
    try:
        return checkpoint.load_run_config(workdir)
    except checkpoint.CheckpointError:
        raise DistillError(
            f"{flag}={workdir!r} has no {checkpoint.RUN_CONFIG} (training writes one); pass "
            f"the config it was trained with as {flag.replace('workdir', 'config')}."
        ) from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
    """Sets dotted fields ('train.steps': 500) in place, refusing unknown fields or types."""
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = config
        try:
            for part in parents:
                node = node[part]
            if leaf not in node:
                raise KeyError(leaf)
            node[leaf] = value
        except (KeyError, AttributeError, TypeError) as err:
            kind = "names no config field" if isinstance(err, KeyError | AttributeError) else ""
            raise DistillError(
                f"config override {key}={value!r} {kind or 'has the wrong type'}; "
                "override an existing field with a value of its type."
            ) from None


def _same_vocabulary(teacher_config, other_config, other: str) -> None:
    t, o = teacher_config.model.vocab_size, other_config.model.vocab_size
    if t != o:
        raise DistillError(
            f"the {other} has model.vocab_size={o} but the teacher {t}; distillation needs one "
            "vocabulary, so use the teacher's."
        )


def _resolve_tokenizer(config, teacher_config, teacher_workdir: str) -> None:
    """Points the student at the teacher's tokenizer; a different one is refused."""
    try:
        teacher_path = pretrained.tokenizer_path(teacher_config, teacher_workdir)
    except pretrained.PretrainedError:
        if config.data.tokenizer_path:
            return  # the teacher's own cannot be found; trust the one the caller named
        raise DistillError(
            f"the teacher's tokenizer is not under {teacher_workdir}/data/tokenizers; pass it "
            "as config override data.tokenizer_path."
        ) from None
    if not config.data.tokenizer_path:
        config.data.tokenizer_path = teacher_path
        return
    mine = tokenizer_lib.load_tokenizer(config.data.tokenizer_path).serialized_model_proto()
    if mine != tokenizer_lib.load_tokenizer(teacher_path).serialized_model_proto():
        raise DistillError(
            f"data.tokenizer_path={config.data.tokenizer_path!r} is another tokenizer than the "
            f"teacher's ({teacher_path}); distillation needs one vocabulary, so use the teacher's."
        )


def _same_tokenizer(tokenizer_path: str, other_config, other_workdir: str) -> None:
    """Refuses a dense baseline trained with another tokenizer (where its own can be found)."""
    try:
        other = pretrained.tokenizer_path(other_config, other_workdir)
    except pretrained.PretrainedError:
        return
    proto = tokenizer_lib.load_tokenizer(other).serialized_model_proto()
    if proto != tokenizer_lib.load_tokenizer(tokenizer_path).serialized_model_proto():
        raise DistillError(
            f"the dense baseline's tokenizer {other} is another than the teacher's "
            f"({tokenizer_path}); the losses would not be comparable, so train it with the "
            "teacher's."
        )


# ---- training ----------------------------------------------------------------------------


class _FrozenModel:
    """A trained model's config and params, restored once onto the training mesh."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir = config, workdir
        self.model = steps.build_model(config)
        self._params = None
        self.step = None

    def params(self, mesh):
        if self._params is None:
            self._params, self.step = pretrained.params_from_workdir(
                self.config, self.workdir, mesh
            )
        return self._params

    def evaluate(self, data, mesh, max_batches: int) -> dict[str, float]:
        params = self.params(mesh)
        shardings = jax.tree.map(lambda p: p.sharding, params)
        eval_step = steps.make_eval_step(self.config, self.model, mesh, shardings)
        return train.evaluate(eval_step, params, data, mesh, max_batches)


def distill_hooks(
    teacher: _FrozenModel, settings: DistillSettings, init_from_teacher: bool, fresh: list
) -> train.TrainHooks:
    """TrainHooks whose step runs the teacher inside it and (optionally) whose fresh state starts
    from the teacher's non-expert weights (the paths left fresh are appended to `fresh`)."""

    def make_train_step(config, model, tx, mesh, shardings):
        params = teacher.params(mesh)
        loss_fn = make_loss_fn(model, config, teacher.model, teacher.config, settings)
        jitted = steps.make_train_step(
            config,
            model,
            tx,
            mesh,
            shardings,
            loss_fn=loss_fn,
            aux_shardings=jax.tree.map(lambda p: p.sharding, params),
        )

        return lambda state, batch: jitted(state, batch, params)

    def init_state(state, mesh):
        params, left_fresh = init_student_from_teacher(state.params, teacher.params(mesh))
        fresh.extend(left_fresh)
        return state.replace(params=params)

    return train.TrainHooks(
        make_train_step=make_train_step, init_state=init_state if init_from_teacher else None
    )


def _size(config) -> dict[str, Any]:
    counts = flops.count(config)
    return {
        "num_layers": config.model.num_layers,
        "mlp_dim": config.model.mlp_dim,
        "num_experts": config.moe.num_experts,
        "num_selected": config.moe.num_selected if config.moe.num_experts else None,
        "expert_mlp_dim": (config.moe.expert_mlp_dim or config.model.mlp_dim)
        if config.moe.num_experts
        else None,
        "total_params": counts.total_params,
        "activated_params": counts.activated_params,
        "flops_per_token": counts.flops_per_token,
    }


def _first_last(workdir: str, start_step: int) -> dict[str, float]:
    rows = [r for r in read_metrics(workdir) if "loss" in r and r["step"] > start_step]
    out = {}
    for key in ("loss", "ce_loss", "soft_loss", "soft_kl"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[f"train_{key}_first"], out[f"train_{key}_last"] = values[0], values[-1]
    return out


def retained_fraction(dense_loss: float, student_loss: float, teacher_loss: float):
    """(L_dense - L_student) / (L_dense - L_teacher), the share of the teacher's gain over the
    dense baseline that the student keeps; None when the teacher has no gain to keep."""
    gain = dense_loss - teacher_loss
    return (dense_loss - student_loss) / gain if gain > 0 else None


def train_student(
    teacher_workdir: str,
    workdir: str,
    *,
    config_overrides: Mapping[str, Any] | None = None,
    student: ml_collections.ConfigDict | None = None,
    teacher_config: ml_collections.ConfigDict | None = None,
    dense_baseline_workdir: str = "",
    dense_baseline_config: ml_collections.ConfigDict | None = None,
    hard_weight: float = 0.25,
    soft_weight: float = 0.75,
    temperature: float = 1.0,
    scale_soft_by_t2: bool = False,
    init_from_teacher: bool = True,
) -> dict[str, Any]:
    """Trains a dense student of the teacher in `workdir` (resuming it if interrupted), evaluates
    student, teacher and dense baseline on the same held-out batches, and writes and returns
    <workdir>/distill_result.json.

    teacher_config / dense_baseline_config default to the config.json that training saves in
    each workdir. The student's config is `student`, else student_config(teacher_config) (the
    teacher's data, recipe and steps) reading the teacher's prepared data when the teacher had
    no data.cache_dir; then `config_overrides` ({'train.steps': 500, ...}). The student always
    uses the teacher's tokenizer (data.tokenizer_path may name only the same model).
    wallclock_s is the whole training call: compilation, periodic evals and checkpoints included.
    """
    settings = DistillSettings(hard_weight, soft_weight, temperature, scale_soft_by_t2)
    teacher_config = _trained_workdir_config(teacher_workdir, "teacher_workdir", teacher_config)
    if os.path.abspath(workdir) in {
        os.path.abspath(teacher_workdir),
        os.path.abspath(dense_baseline_workdir or teacher_workdir),
    }:
        raise DistillError(f"workdir={workdir!r} must be a new directory, not a trained model's.")
    config = copy.deepcopy(student) if student is not None else student_config(teacher_config)
    if student is None and not config.data.cache_dir:
        config.data.cache_dir = os.path.join(teacher_workdir, "data")  # prepared corpus reused
    apply_overrides(config, config_overrides or {})
    _same_vocabulary(teacher_config, config, "student")
    _resolve_tokenizer(config, teacher_config, teacher_workdir)
    dense = None
    if dense_baseline_workdir:
        dense_config = _trained_workdir_config(
            dense_baseline_workdir, "dense_baseline_workdir", dense_baseline_config
        )
        _same_vocabulary(teacher_config, dense_config, "dense baseline")
        _same_tokenizer(config.data.tokenizer_path, dense_config, dense_baseline_workdir)
        dense = _FrozenModel(dense_config, dense_baseline_workdir)

    teacher = _FrozenModel(teacher_config, teacher_workdir)
    fresh: list[str] = []
    start_step = (_checkpoint_steps(workdir) or [0])[-1]
    start = time.perf_counter()
    student_eval = train.train_and_evaluate(
        config, workdir, distill_hooks(teacher, settings, init_from_teacher, fresh)
    )
    wallclock = time.perf_counter() - start

    tc = config.train
    mesh, data = train.mesh_and_data(config, workdir)
    try:
        teacher_eval = teacher.evaluate(data, mesh, tc.eval_batches)
        dense_eval = dense.evaluate(data, mesh, tc.eval_batches) if dense else None
    finally:
        data.train_iter.close()
    result = {
        "teacher_workdir": os.path.abspath(teacher_workdir),
        "workdir": os.path.abspath(workdir),
        "dense_baseline_workdir": os.path.abspath(dense_baseline_workdir) if dense else None,
        **dataclasses.asdict(settings),
        "init_from_teacher": init_from_teacher,
        "fresh_params": fresh if init_from_teacher and not start_step else None,
        "config_overrides": {k: _plain(v) for k, v in (config_overrides or {}).items()},
        "steps": tc.steps,
        "tokens": tc.steps * tc.batch_size * tc.seq_len,
        "resumed_from_step": start_step,
        "wallclock_s": wallclock,
        "eval_batches": tc.eval_batches,
        "eval_tokens": student_eval["eval_tokens"],
        "student_eval_loss": student_eval["eval_loss"],
        "teacher_eval_loss": teacher_eval["eval_loss"],
        "dense_eval_loss": dense_eval["eval_loss"] if dense else None,
        "retained_fraction": retained_fraction(
            dense_eval["eval_loss"], student_eval["eval_loss"], teacher_eval["eval_loss"]
        )
        if dense
        else None,
        "teacher_step": teacher.step,
        "dense_step": dense.step if dense else None,
        "student": _size(config),
        "teacher": _size(teacher_config),
        **_first_last(workdir, start_step),
    }
    if jax.process_index() == 0:
        with open(os.path.join(workdir, RESULT_FILE), "w") as f:
            json.dump(result, f, indent=1)
    return result


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
