"""Orbax checkpoints of the train state together with the data-iterator state.

One step directory holds `state` (params, optimizer state, step, rng; restored straight into
their shardings) and `data` (the grain iterator state as JSON), so a resumed run continues
with exactly the batch the interrupted one would have seen next. With several processes each
reads its own part of the data; `allgather_json` collects every process's iterator state so the
saved `data` item holds them all, and each process takes its own part back on restore. The
model part of the config is stored beside the checkpoints; resuming with a different model shape
fails in one sentence.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from glam_jax.errors import GlamError
from glam_jax.steps import TrainState

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
    ),
    "moe": ("num_experts", "every", "moe_index_in_block", "expert_mlp_dim", "router"),
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
    """The config that `save_run_config` wrote (JSON lists become the tuples they were)."""
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

    with open(path) as f:
        return ml_collections.ConfigDict(tuples(json.load(f)))


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
            diffs = [
                f"{part}.{key}: checkpoint {stored.get(part, {}).get(key)!r} vs config {value!r}"
                for part, fields in current.items()
                for key, value in fields.items()
                if stored.get(part, {}).get(key) != value
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
        """Saves the train state and the data-iterator state of `step` (in the background)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[Any, dict]:
        """(state in the abstract state's shardings, data-iterator state) of `step` or latest."""
        step = self.latest_step if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint found under {self.directory}.")
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        )
        try:
            restored = self.manager.restore(step, args=args)
        except (ValueError, KeyError, FileNotFoundError) as err:
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err)
            raise CheckpointError(
                f"checkpoint step {step} under {self.directory} does not match this model or "
                f"optimizer ({first}); use a new --workdir or the config it was written with."
            ) from None
        return restored["state"], restored["data"]

    def wait(self) -> None:
        """Blocks until pending background writes are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending writes and releases the checkpoint manager."""
        self.manager.wait_until_finished()
        self.manager.close()
