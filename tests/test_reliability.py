"""Runs that are killed, preempted, fed non-finite steps or given a broken checkpoint.

The interrupted runs are real subprocesses of experiments/train.py on the tests' tiny config;
each is compared with one unbroken run, bitwise on CPU.
"""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam_jax import checkpoint, optim, sharding, steps, train
from glam_jax.data import text_corpus
from glam_jax.data.text_corpus import DataError
from glam_jax.metrics_writer import read_metrics
from tests.helpers import ROOT, random_batch, tiny_config

# --dist loadgroup (pyproject.toml) gives this module to one xdist worker: the unbroken run (a
# module fixture) is computed once, not once per xdist worker.
pytestmark = pytest.mark.xdist_group("reliability")

STEPS = 16
CHECKPOINT_EVERY = 4


def run_config(steps_: int, cache_dir: str, **train_overrides):
    """The tiny float32 model: a metric row every step, a checkpoint every 4, eval at the end."""
    config = tiny_config()
    config.model.vocab_size = 320
    config.data.cache_dir = cache_dir
    t = config.train
    t.steps = steps_
    t.log_every = 1
    t.eval_every = 0
    t.eval_batches = 1
    t.checkpoint_every = CHECKPOINT_EVERY
    t.keep_checkpoints = 3
    t.progress_bar = False
    t.learning_rate = 0.05
    t.warmup_steps = 5
    t.update(train_overrides)
    return config


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if "loss" in r}


def _steps_on_disk(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def unbroken(cache, tmp_path_factory):
    """Workdir of one uninterrupted run of STEPS steps (in this process)."""
    workdir = str(tmp_path_factory.mktemp("unbroken"))
    train.train_and_evaluate(run_config(STEPS, cache), workdir)
    return workdir


def _start(tmp_path, workdir, cache, steps_=STEPS, devices=8, **overrides):
    """experiments/train.py on run_config, in the background (stdout and stderr to files)."""
    config_file = tmp_path / f"config_{len(list(tmp_path.glob('config_*.py')))}.py"
    config_file.write_text(
        "from tests.test_reliability import run_config\n\n\n"
        f"def get_config():\n    return run_config({steps_}, {cache!r}, **{overrides!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    other = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*other, f"--xla_force_host_platform_device_count={devices}"])
    log = open(tmp_path / f"{config_file.stem}.log", "w")  # noqa: SIM115 - closed by _finish
    proc = subprocess.Popen(
        [sys.executable, f"{ROOT}/experiments/train.py", f"--config={config_file}"]
        + [f"--workdir={workdir}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=env,
    )
    proc.log_path = log.name
    proc.log_file = log
    return proc


def _finish(proc, timeout=300) -> tuple[int, str]:
    rc = proc.wait(timeout=timeout)
    proc.log_file.close()
    with open(proc.log_path) as f:
        return rc, f.read()


def _wait_for(proc, workdir, step: int, checkpoint_step: int | None = None) -> None:
    """Until this process has logged `step` in metrics.jsonl (and checkpoint_step is on disk).

    Rows count only once the run has printed its model line, which comes after a resumed run
    dropped the rows an earlier process logged past its checkpoint.
    """
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, _finish(proc)[1][-3000:]
        with open(proc.log_path) as f:
            started = "Model: " in f.read()
        try:
            done = max(_losses(workdir), default=0) if started else 0
        except (OSError, ValueError):
            done = 0
        saved = checkpoint_step is None or os.path.isdir(
            os.path.join(workdir, "checkpoints", str(checkpoint_step))
        )
        if done >= step and saved:
            return
        time.sleep(0.01)
    raise AssertionError(f"no step {step} within 300 s")


def test_kill_and_sigterm_then_resume_reproduce_the_unbroken_run(tmp_path, cache, unbroken):
    workdir = str(tmp_path / "run")
    # kill -9 after the checkpoint at step 4 is on disk: the restart resumes from it.
    proc = _start(tmp_path, workdir, cache)
    _wait_for(proc, workdir, CHECKPOINT_EVERY + 2, checkpoint_step=CHECKPOINT_EVERY)
    proc.send_signal(signal.SIGKILL)
    rc, _ = _finish(proc)
    assert rc == -signal.SIGKILL
    resumed = _steps_on_disk(workdir)[-1]  # 4, or 8 if the kill came late
    # SIGTERM (a preemption notice) two steps later: saves at the next step boundary, exits 0.
    proc = _start(tmp_path, workdir, cache)
    _wait_for(proc, workdir, resumed + 2)
    proc.send_signal(signal.SIGTERM)
    rc, log = _finish(proc)
    assert rc == 0, log[-3000:]
    assert f"Resumed from step {resumed}" in log
    preempted = [line for line in log.splitlines() if line.startswith("Preempted (SIGTERM)")]
    assert len(preempted) == 1, log[-3000:]
    saved = _steps_on_disk(workdir)
    assert saved[-1] >= resumed + 2  # newer than the last periodic one before SIGTERM
    assert saved[-1] < STEPS and f"saved step {saved[-1]} " in preempted[0]
    assert max(_losses(workdir)) == saved[-1]  # it stopped at the step it saved
    rc, log = _finish(_start(tmp_path, workdir, cache))
    assert rc == 0, log[-3000:]
    assert f"Resumed from step {saved[-1]}" in log
    a, b = _losses(unbroken), _losses(workdir)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert [a[s] for s in a] == [b[s] for s in a]  # bitwise equal floats, final loss included
    assert a[STEPS] < a[1]


def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path, cache, unbroken):
    workdir = str(tmp_path / "run")
    shutil.copytree(unbroken, workdir)
    newest = _steps_on_disk(workdir)[-1]
    assert newest == STEPS
    for path in glob.glob(os.path.join(workdir, "checkpoints", str(newest), "**"), recursive=True):
        if os.path.isfile(path):
            open(path, "w").close()  # truncated to zero bytes, as a full disk leaves them
    rc, log = _finish(_start(tmp_path, workdir, cache))
    assert rc == 0, log[-3000:]
    fallback = STEPS - CHECKPOINT_EVERY
    lines = [line for line in log.splitlines() if "is unreadable" in line]
    assert len(lines) == 1, log[-3000:]
    assert lines[0].startswith(f"Checkpoint step {newest} under {workdir}/checkpoints")
    assert f"fell back to step {fallback}" in lines[0]
    assert os.path.isdir(os.path.join(workdir, "unreadable_checkpoints", str(newest)))
    assert f"Resumed from step {fallback}" in log
    a, b = _losses(unbroken), _losses(workdir)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert [a[s] for s in a] == [b[s] for s in a]
    assert _steps_on_disk(workdir)[-1] == STEPS  # saved again, readable this time


def test_no_readable_checkpoint_is_one_sentence(tmp_path, cache, unbroken):
    workdir = str(tmp_path / "run")
    shutil.copytree(unbroken, workdir)
    for path in glob.glob(os.path.join(workdir, "checkpoints", "*", "**"), recursive=True):
        if os.path.isfile(path):
            open(path, "w").close()
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint under .* can be restored"):
        train.train_and_evaluate(run_config(STEPS, cache), workdir)


def test_resume_on_half_the_devices(tmp_path, cache, unbroken):
    """Checkpoints written on 8 devices (mesh (8,1,1)) resume on 4 (mesh (4,1,1))."""
    workdir = str(tmp_path / "run")
    shutil.copytree(unbroken, workdir)
    for step in _steps_on_disk(workdir)[1:]:
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
    start = _steps_on_disk(workdir)[0]
    rc, log = _finish(_start(tmp_path, workdir, cache, devices=4))
    assert rc == 0, log[-3000:]
    assert f"Resumed from step {start}" in log and "'data': 4" in log
    a, b = _losses(unbroken), _losses(workdir)
    assert sorted(b) == list(range(1, STEPS + 1))
    # Another device count sums in another order: equal up to float32 rounding, not bitwise.
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-4)


def _fresh_state(config):
    mesh = sharding.make_mesh((8, 1, 1))
    model = steps.build_model(config)
    tx = optim.make_optimizer(config.train)
    state, shardings = steps.create_train_state(config, model, tx, mesh)
    return state, (model, tx, mesh, shardings)


def _host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_non_finite_steps_leave_the_state_unchanged_are_counted_and_freeze_it_at_the_limit():
    config = tiny_config()
    config.train.max_nonfinite_steps = 3
    state, (model, tx, mesh, shardings) = _fresh_state(config)
    step = steps.make_train_step(config, model, tx, mesh, shardings)
    good = random_batch(config)
    bad = dict(good, weights=np.full_like(good["weights"], np.nan))  # NaN loss and gradients
    good, bad = steps.global_batch(good, mesh), steps.global_batch(bad, mesh)
    seen = []
    for batch in (good, bad, bad, good, bad, bad, bad, good):
        kept = _host((state.params, state.opt_state))
        state, metrics = step(state, batch)
        m = jax.device_get(metrics)
        changed = not _same(kept, _host((state.params, state.opt_state)))
        seen.append((bool(np.isfinite(m["loss"])), changed, int(m["nonfinite_steps"])))
        seen[-1] += (int(m["nonfinite_streak"]),)
    assert seen == [
        (True, True, 0, 0),  # (loss finite, state changed, skipped so far, skipped in a row)
        (False, False, 1, 1),
        (False, False, 2, 2),
        (True, True, 2, 0),
        (False, False, 3, 1),
        (False, False, 4, 2),
        (False, False, 5, 3),  # the limit: the run has failed ...
        (True, False, 6, 4),  # ... so even a finite step no longer updates anything
    ]
    assert int(state.step) == 8


def test_a_diverging_run_stops_in_one_sentence_and_saves_nothing_non_finite(tmp_path, cache):
    workdir = str(tmp_path / "run")
    config = run_config(12, cache, learning_rate=1e12, max_nonfinite_steps=3, checkpoint_every=2)
    with pytest.raises(train.NonFiniteError, match="train.max_nonfinite_steps=3") as info:
        train.train_and_evaluate(config, workdir)
    assert "\n" not in str(info.value)
    rows = read_metrics(workdir)
    skipped = [r["step"] for r in rows if not np.isfinite(r["loss"])]
    assert skipped and [r["nonfinite_streak"] for r in rows][-1] == 3
    assert rows[-1]["nonfinite_steps"] == len(skipped)
    # Every checkpoint on disk holds finite numbers only.
    mesh = sharding.make_mesh((8, 1, 1))
    model = steps.build_model(config)
    tx = optim.make_optimizer(config.train)
    abstract, _ = steps.abstract_state(config, model, tx, mesh)
    ckpt = checkpoint.Checkpointer(workdir, config)
    try:
        for saved in ckpt.manager.all_steps():
            state, _ = ckpt.restore(abstract, saved)
            assert bool(steps.all_finite((state.params, state.opt_state)))
    finally:
        ckpt.close()


def test_a_save_refuses_non_finite_parameters(tmp_path):
    config = tiny_config()
    state, _ = _fresh_state(config)
    ckpt = checkpoint.Checkpointer(str(tmp_path), config)
    broken = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
    with pytest.raises(checkpoint.CheckpointError, match="step 7 are not finite"):
        ckpt.save(7, broken, {})
    assert ckpt.latest_step is None
    ckpt.close()
    assert not glob.glob(str(tmp_path / "checkpoints" / "*"))


def test_a_latin1_corpus_file_is_named_in_one_sentence(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "latin1.txt"
    good.write_text("plain text\n\nmore text\n", encoding="utf-8")
    bad.write_bytes("caf\xe9 cr\xe8me\n\nna\xefve\n".encode("latin-1"))
    with pytest.raises(DataError, match=f"^{bad} is not UTF-8 text") as e:
        text_corpus.prepare_text_corpus(
            [good, bad],
            label="text",
            embedded=False,
            document_split="blank_line",
            validation_fraction=0.5,
            cache_dir=tmp_path / "cache",
        )
    assert "\n" not in str(e.value)
