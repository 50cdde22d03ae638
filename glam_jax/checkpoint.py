"""Orbax checkpoints of the train state together with the data-iterator state.

One step directory holds `state` (params, optimizer state, step, rng, model state such as the
MoE expert bias; restored straight into their shardings) and `data` (the grain iterator state
as JSON), so a resumed run continues with exactly the batch the interrupted one would have seen
next. With several processes each reads its own part of the data; `allgather_json` collects
every process's iterator state so the saved `data` item holds them all, and each process takes
its own part back on restore. The model part of the config is stored beside the checkpoints;
resuming with a different model shape fails in one sentence. A newest checkpoint that cannot be
read (a save cut short, a disk that filled up) is skipped for the newest one that can, and a
save refuses non-finite values.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from glam_jax.errors import GlamError
from glam_jax.presets.base import get_base_config
from glam_jax.steps import TrainState, all_finite

# Config fields that change parameter shapes or meaning; a workdir is tied to them.
MODEL_FIELDS = ("model", "moe")
SHAPE_FIELDS = {
    "model": (
        "vocab_size",
        "num_layers",
        "embed_dim",
        "mlp_dim",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "ffn_glu",
        "position",
        "rel_buckets",
        "tie_embeddings",
        "norm",
        "qk_norm",  # Hugging Face families: q/k norm scales and q/k/v biases
        "qkv_bias",
    ),
    "moe": (
        "num_experts",
        "every",
        "moe_index_in_block",
        "expert_mlp_dim",
        "router",
        "num_shared_experts",
        "shared_expert_mlp_dim",
        "shared_expert_gate",
    ),
}


class CheckpointError(GlamError):
    """A checkpoint that does not fit this run, reported in one sentence."""


RUN_CONFIG = "config.json"  # the whole config of the newest run in a workdir


def save_run_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the full config beside the checkpoints, so tools that start from a workdir
    (distillation's teacher) need no --config."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RUN_CONFIG)
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=1, sort_keys=True))
    os.replace(path + ".tmp", path)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config that `save_run_config` wrote (JSON lists become the tuples they were), over
    today's defaults: a field added after the workdir was written held its default value there.
    """
    path = os.path.join(workdir, RUN_CONFIG)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{workdir} has no {RUN_CONFIG}; pass the config it was trained with."
        )

    def tuples(value):
        if isinstance(value, dict):
            return {key: tuples(v) for key, v in value.items()}
        if isinstance(value, list):
            return tuple(tuples(v) for v in value)
        return value

    def over(default, saved):
        if isinstance(default, dict) and isinstance(saved, dict):
            return {**default, **{key: over(default.get(key), v) for key, v in saved.items()}}
        return saved

    with open(path) as f:
        saved = tuples(json.load(f))
    return ml_collections.ConfigDict(over(get_base_config().to_dict(), saved))


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-able `value`, in process order (a collective: all processes call it).

    The encoded texts travel as zero-padded uint8 rows of one shape, their lengths first.
    """
    if jax.process_count() == 1:
        return [json.loads(json.dumps(value))]
    text = np.frombuffer(json.dumps(value, sort_keys=True).encode("utf-8"), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(text)))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(text)] = text
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [
        json.loads(row[:length].tobytes().decode("utf-8"))
        for row, length in zip(rows, lengths, strict=True)
    ]


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200].rstrip(":") if text else type(err).__name__


def _free_name(path: str) -> str:
    """`path`, or `path.1`, `path.2`, ... whichever does not exist yet."""
    candidate, n = path, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


_all_finite = jax.jit(lambda params, opt_state: all_finite((params, opt_state)))


class Checkpointer:
    """Saves/restores TrainState + data state under <workdir>/checkpoints."""

    def __init__(self, workdir: str, config, *, is_primary: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._config_path = os.path.join(workdir, "model_config.json")
        tc = config.train
        policies = [ocp.checkpoint_managers.LatestN(n=tc.keep_checkpoints)]
        if tc.keep_best:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=lambda m: m["eval_loss"],
                    reverse=True,  # lowest eval loss is best (orbax's convention for 'min')
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=tc.async_checkpoint,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            create=True,
        )
        self._is_primary = is_primary
        self.unreadable: list[tuple[int, str]] = []  # filled by restore()
        self._check_or_write_model_config(config, is_primary)
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data"), options=options
        )

    def _check_or_write_model_config(self, config, is_primary: bool) -> None:
        current = {
            part: {key: config[part][key] for key in SHAPE_FIELDS[part]} for part in MODEL_FIELDS
        }
        if os.path.exists(self._config_path):
            with open(self._config_path) as f:
                stored = json.load(f)
            # A field added after the workdir was written held its default value there.
            defaults = get_base_config()
            recorded = {
                part: {key: stored.get(part, {}).get(key, defaults[part][key]) for key in keys}
                for part, keys in SHAPE_FIELDS.items()
            }
            diffs = [
                f"{part}.{key}: checkpoint {recorded[part][key]!r} vs config {value!r}"
                for part, fields in current.items()
                for key, value in fields.items()
                if recorded[part][key] != value
            ]
            if diffs:
                raise CheckpointError(
                    f"the workdir {os.path.dirname(self._config_path)} holds a checkpoint of a "
                    f"different model ({'; '.join(diffs)}); use a new --workdir or the old config."
                )
        elif is_primary:
            os.makedirs(os.path.dirname(self._config_path), exist_ok=True)
            with open(self._config_path, "w") as f:
                json.dump(current, f, indent=1)

    @property
    def latest_step(self) -> int | None:
        """The newest saved step, or None in an empty workdir."""
        return self.manager.latest_step()

    def save(
        self, step: int, state: TrainState, data_state: dict, metrics: dict | None = None
    ) -> None:
        """Writes `step` (in the background with train.async_checkpoint).

        Refuses non-finite parameters or optimizer state: the train step keeps the state finite
        by skipping non-finite updates, so this catches only an update that overflowed.
        """
        if not bool(jax.device_get(_all_finite(state.params, state.opt_state))):
            raise CheckpointError(
                f"the parameters or optimizer state at step {step} are not finite (inf or NaN), "
                f"so they were not saved (newest checkpoint under {self.directory}: "
                f"{self.latest_step or 'none'}); lower train.learning_rate or check the data."
            )
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[Any, dict]:
        """(state in the abstract state's shardings, data-iterator state) of `step`, or of the
        newest checkpoint that can be restored.

        Without `step`, checkpoints that cannot be read (truncated or missing files, say) are
        skipped; `self.unreadable` lists them as (step, reason), newest first.
        """
        self.unreadable: list[tuple[int, str]] = []
        candidates = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
        if not candidates:
            raise CheckpointError(f"no checkpoint found under {self.directory}.")
        for candidate in candidates:
            try:
                return self._restore_step(candidate, abstract_state)
            except (ValueError, KeyError, TypeError, OSError) as err:  # not device errors (OOM)
                self.unreadable.append((candidate, _first_line(err)))
        reasons = "; ".join(f"step {s}: {reason}" for s, reason in self.unreadable)
        raise CheckpointError(
            f"no checkpoint under {self.directory} can be restored ({reasons}): they are "
            "unreadable or were written for another model or optimizer; use a new --workdir or "
            "the config they were written with."
        )

    def _restore_step(self, step: int, abstract_state: TrainState) -> tuple[Any, dict]:
        """(state, data state) of one step. A model without non-parameter state also reads
        checkpoints written before TrainState.model_state existed (the same tree without it)."""

        def restore(target):
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
            )
            restored = self.manager.restore(step, args=args)
            return restored["state"], restored["data"]

        try:
            return restore(abstract_state)
        except ValueError:
            if jax.tree.leaves(abstract_state.model_state):
                raise
            legacy = {
                f.name: getattr(abstract_state, f.name)
                for f in dataclasses.fields(abstract_state)
                if f.name != "model_state"
            }
            state, data = restore(legacy)
            return TrainState(**state, model_state={}), data

    def set_aside(self, steps: list[int], workdir: str) -> str:
        """Moves unreadable step folders to <workdir>/unreadable_checkpoints/ (kept for a person to
        look at, out of the way of the steps that will be saved again); returns that folder."""
        target = os.path.join(os.path.abspath(workdir), "unreadable_checkpoints")
        if self._is_primary:
            os.makedirs(target, exist_ok=True)
            for step in steps:
                source = os.path.join(self.directory, str(step))
                if os.path.exists(source):
                    os.replace(source, _free_name(os.path.join(target, str(step))))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("glam_jax.checkpoint.set_aside")
        self.manager.reload()
        return target

    def wait(self) -> None:
        """Blocks until pending background writes are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending writes and releases the checkpoint manager."""
        self.manager.wait_until_finished()
        self.manager.close()
