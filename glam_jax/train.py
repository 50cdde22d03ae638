"""The training loop: config -> mesh/model -> data -> train step -> metrics/checkpoints.

`train_and_evaluate(config, workdir)` is the one entry point (experiments/train.py calls it).
Interrupt it at any point and run it again with the same workdir: it resumes from the newest
checkpoint, data order included, and reproduces the unbroken run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from glam_jax import checkpoint, config_checks, flops, optim, preemption, sharding, steps
from glam_jax.data import create_datasets
from glam_jax.data.pipeline import TrainIterator
from glam_jax.errors import GlamError
from glam_jax.metrics_writer import MetricsWriter

LN2 = math.log(2.0)


def say(message: str, bar=None) -> None:
    """A progress line on the primary process (through tqdm when a bar is showing)."""
    if jax.process_index() != 0:
        return
    if bar is not None:
        bar.write(message)
    else:
        print(message, flush=True)
    logging.info(message)


def mesh_and_data(config: ml_collections.ConfigDict, workdir: str):
    """Checks the config against the devices, then builds the mesh and the datasets.

    (The tokenizer's size is checked against model.vocab_size by the data layer.)
    """
    try:
        mesh_shape = sharding.mesh_shape(config.mesh.shape, jax.device_count())
    except sharding.ShardingError as err:
        raise config_checks.ConfigError(str(err)) from None
    config_checks.check_run(config, mesh_shape)
    mesh = sharding.make_mesh(mesh_shape)
    data = create_datasets(config, cache_dir=config.data.cache_dir or os.path.join(workdir, "data"))
    return mesh, data


@dataclasses.dataclass(frozen=True)
class TrainHooks:
    """What a variant of training (distillation, glam_jax/distill.py) changes in this one loop.

    make_train_step(config, model, tx, mesh, shardings) -> step(state, batch) -> (state, metrics);
    init_state(state, mesh) -> state adjusts a freshly initialised state (never a resumed one).
    """

    make_train_step: Callable = steps.make_train_step
    init_state: Callable | None = None


def setup(config: ml_collections.ConfigDict, workdir: str, init_state: Callable | None = None):
    """Checks the config, builds mesh, data, model, optimizer and (restored) state."""
    mesh, data = mesh_and_data(config, workdir)
    model = steps.build_model(config)
    tx = optim.make_optimizer(config.train)
    ckpt = checkpoint.Checkpointer(workdir, config, is_primary=jax.process_index() == 0)
    if ckpt.latest_step is not None:
        abstract, shardings = steps.abstract_state(config, model, tx, mesh)
        state, data_state = ckpt.restore(abstract)
        data.train_iter.set_state(data_state)
        resumed = int(state.step)
        if ckpt.unreadable:  # newer than the one restored: moved aside so they can be re-saved
            aside = ckpt.set_aside([step for step, _ in ckpt.unreadable], workdir)
            for step, reason in ckpt.unreadable:
                say(
                    f"Checkpoint step {step} under {ckpt.directory} is unreadable ({reason}); "
                    f"moved it to {aside} and fell back to step {resumed}."
                )
        say(f"Resumed from step {resumed} in {ckpt.directory}")
    else:
        state, shardings = steps.create_train_state(config, model, tx, mesh)
        if init_state is not None:
            state = init_state(state, mesh)
    return mesh, data, model, tx, ckpt, state, shardings


def merged_data_state(train_iter: TrainIterator) -> dict[str, Any]:
    """The data-iterator state of all processes merged (a collective: every process calls it)."""
    return TrainIterator.merge_states(checkpoint.allgather_json(train_iter.get_state()))


def evaluate(eval_step, params, data, mesh, max_batches: int, model_state=None) -> dict[str, float]:
    """Loss, perplexity and bits per character over the validation split (or max_batches);
    model_state: the TrainState's non-parameter variables (the expert bias), if any."""
    nll = weight = chars = 0.0
    for i, batch in enumerate(data.make_eval_iter()):
        if max_batches and i >= max_batches:
            break
        m = eval_step(params, steps.global_batch(batch, mesh), model_state)
        nll += float(m["nll_sum"])
        weight += float(m["weight_sum"])
        chars += float(m["char_sum"])
    loss = nll / max(weight, 1.0)
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(min(loss, 50.0)),
        "eval_bits_per_char": nll / LN2 / max(chars, 1.0),
        "eval_tokens": weight,
    }


@sharding.with_config_rules
def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, step: int | None = None, max_batches: int = 0
) -> dict[str, float]:
    """Restores checkpoint `step` (default newest) of `workdir` and evaluates it."""
    from glam_jax import pretrained

    if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # before preparing any data
        raise pretrained.PretrainedError(
            f"{workdir} has no checkpoints/ folder; is it a training workdir?"
        )
    mesh, data = mesh_and_data(config, workdir)
    params, model_state, restored_step = pretrained.state_from_workdir(config, workdir, mesh, step)
    model = steps.build_model(config)
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    eval_step = steps.make_eval_step(config, model, mesh, param_shardings)
    result = {"step": restored_step}
    result.update(evaluate(eval_step, params, data, mesh, max_batches, model_state))
    return result


def _truncate_metrics(path: str, last_step: int) -> None:
    """Drops rows logged after the checkpoint we resume from (those steps are re-run)."""
    import json

    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(rows)


def _log_row(metrics: dict[str, Any], elapsed: float, tokens: int, mfu_denominator) -> dict:
    row = {
        key: np.asarray(metrics[key])
        for key in (
            "loss",
            "ce_loss",
            "aux_loss",
            "z_loss",
            "importance_loss",
            "load_loss",
            "sequence_aux_loss",
            "logits_z_loss",
            "soft_loss",
            "soft_kl",
            "learning_rate",
            "grad_norm",
            "expert_load",
            "expert_load_max_over_mean",  # [MoE layers]: 1.0 is perfectly balanced
            "expert_bias",  # [MoE layers, E]: auxiliary-loss-free balancing bias (when on)
            "dropped_fraction",
            "router_entropy",
            "top1_stability",
            "nonfinite_steps",
            "nonfinite_streak",
        )
        if key in metrics
    }
    if "expert_bias" in row:  # float32 written as its shortest decimal (0.003, not 0.00300000002)
        bias = row["expert_bias"].astype(np.float32)
        shortest = [float(np.format_float_positional(v, unique=True)) for v in bias.ravel()]
        row["expert_bias"] = np.asarray(shortest).reshape(bias.shape)
    row["tokens_per_s"] = tokens / max(elapsed, 1e-9)
    if mfu_denominator:
        row["mfu"] = row["tokens_per_s"] / mfu_denominator
    return row


class NonFiniteError(GlamError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


def _newest(ckpt) -> str:
    step = ckpt.latest_step
    return "no checkpoint yet" if step is None else f"newest checkpoint: step {step}"


def _check_streak(streak: int, step: int, max_streak: int, ckpt) -> None:
    """Stops the run once train.max_nonfinite_steps steps in a row were non-finite. `streak` is
    read where the loop syncs anyway (metric rows, checkpoints): the train step skips every
    update after the limit, so a late look sees the state from before the run went bad."""
    if streak >= max_streak:
        raise NonFiniteError(
            f"the loss or gradient norm was not finite for train.max_nonfinite_steps={max_streak} "
            f"steps in a row from step {step - streak + 1} (their updates were skipped and "
            f"nothing after them was saved; {_newest(ckpt)}); lower train.learning_rate, check "
            "the data, or raise train.max_nonfinite_steps."
        )


def make_workdir(workdir: str) -> None:
    """Creates the workdir, or says in one sentence why it cannot be one."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise GlamError(f"--workdir={workdir} is an existing file; pass a directory.")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as err:
        raise GlamError(f"cannot create --workdir={workdir}: {err.strerror}.") from None


def _progress_bar(tc: ml_collections.ConfigDict, start_step: int):
    """A tqdm bar over the steps (train.progress_bar), or None."""
    if not tc.progress_bar:
        return None
    from tqdm import tqdm

    return tqdm(total=tc.steps, initial=start_step, unit="step", dynamic_ncols=True)


def _evaluates_at(done: int, tc: ml_collections.ConfigDict) -> bool:
    """Whether step `done` is evaluated: every train.eval_every steps and at the end."""
    return bool(tc.eval_every and done % tc.eval_every == 0) or done == tc.steps


def _saves_at(done: int, tc: ml_collections.ConfigDict, preempted: bool) -> bool:
    """Whether step `done` is saved: periodically, at the end and on preemption, never with
    train.checkpoint_every=-1."""
    if tc.checkpoint_every < 0:
        return False
    periodic = tc.checkpoint_every > 0 and done % tc.checkpoint_every == 0
    return periodic or done == tc.steps or preempted


def _stop_preempted(done: int, tc: ml_collections.ConfigDict, ckpt, bar) -> None:
    """Waits for the preemption save to reach the disk and says where the run stopped."""
    ckpt.wait()
    saved = f"saved step {done} to {ckpt.directory}; run the same command to resume"
    if tc.checkpoint_every < 0:
        saved = f"stopped at step {done} without saving (train.checkpoint_every=-1)"
    say(f"Preempted (SIGTERM): {saved}.", bar)


def _say_model(config, counts, mesh, data) -> None:
    """The start-up lines: model size, mesh, data and how the weights are stored."""
    say(
        f"Model: {counts.total_params / 1e6:.4g}M params, "
        f"{counts.activated_params / 1e6:.4g}M activated/token, "
        f"{counts.flops_per_token / 1e9:.4g} GFLOP/token (train); mesh {dict(mesh.shape)}; "
        f"{data.num_train_documents} train / {data.num_eval_documents} eval documents."
    )
    note = optim.weight_storage_note(config)
    if note:
        say(note)


@sharding.with_config_rules
def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, hooks: TrainHooks | None = None
) -> dict[str, float]:
    """Trains to config.train.steps with periodic eval and checkpoints; returns the last eval.

    On SIGTERM (a preemption notice) it saves at the next step boundary and returns early.
    """
    tc = config.train
    hooks = hooks or TrainHooks()
    make_workdir(workdir)
    mesh, data, model, tx, ckpt, state, shardings = setup(config, workdir, hooks.init_state)
    primary = jax.process_index() == 0
    if primary:
        checkpoint.save_run_config(config, workdir)
    writer = MetricsWriter(workdir, enabled=primary)
    start_step = int(state.step)
    if primary:
        _truncate_metrics(writer.path, start_step)

    counts = flops.count(config)
    peak = flops.peak_flops(jax.devices()[0].device_kind, tc.peak_tflops)
    mfu_denominator = peak * jax.device_count() / counts.flops_per_token if peak else None
    _say_model(config, counts, mesh, data)
    train_step = hooks.make_train_step(config, model, tx, mesh, shardings)
    eval_step = steps.make_eval_step(config, model, mesh, shardings.params, shardings.model_state)
    tokens_per_step = tc.batch_size * tc.seq_len

    bar = _progress_bar(tc, start_step) if primary else None
    last_eval: dict[str, float] = {}
    window_start, window_steps = time.perf_counter(), 0
    watch = preemption.PreemptionWatch()
    watch.install()
    try:
        for step in range(start_step, tc.steps):
            batch = steps.global_batch(next(data.train_iter), mesh)
            state, metrics = train_step(state, batch)
            window_steps += 1
            done = step + 1
            if done % tc.log_every == 0 or done == tc.steps:
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - window_start
                row = _log_row(metrics, elapsed, window_steps * tokens_per_step, mfu_denominator)
                writer.write(done, row)
                _check_streak(int(metrics["nonfinite_streak"]), done, tc.max_nonfinite_steps, ckpt)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                window_start, window_steps = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            is_eval = _evaluates_at(done, tc)
            if is_eval:
                last_eval = evaluate(
                    eval_step, state.params, data, mesh, tc.eval_batches, state.model_state
                )
                writer.write(done, last_eval)
                say(
                    f"step {done}: eval loss {last_eval['eval_loss']:.4f}, "
                    f"perplexity {last_eval['eval_perplexity']:.2f}, "
                    f"bits/char {last_eval['eval_bits_per_char']:.4f}",
                    bar,
                )
                window_start = time.perf_counter()  # eval time is not training throughput
            preempted = watch.reached(done, ckpt.manager)
            if _saves_at(done, tc, preempted):
                streak = int(jax.device_get(state.nonfinite_streak))
                _check_streak(streak, done, tc.max_nonfinite_steps, ckpt)
                ckpt.save(
                    done,
                    state,
                    merged_data_state(data.train_iter),
                    metrics={"eval_loss": last_eval["eval_loss"]} if is_eval else None,
                )
            if preempted and done < tc.steps:
                _stop_preempted(done, tc, ckpt, bar)
                break
        if start_step >= tc.steps:  # nothing left to train: report the checkpoint's eval
            say(f"Already trained to step {start_step} (train.steps={tc.steps}).")
            last_eval = evaluate(
                eval_step, state.params, data, mesh, tc.eval_batches, state.model_state
            )
    finally:  # also on errors and Ctrl-C: finish pending checkpoint writes, flush metrics
        watch.uninstall()
        if bar is not None:
            bar.close()
        ckpt.close()
        writer.close()
        data.train_iter.close()
    return last_eval
