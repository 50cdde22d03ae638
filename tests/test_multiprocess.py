"""Two processes on localhost (4 fake CPU devices each, one (2, 4, 1) mesh across both, each
feeding only its own rows) train exactly like one process with 8 devices, through a restart."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import jax
import pytest

from glam_jax import sharding, steps
from glam_jax.data import create_datasets
from glam_jax.errors import GlamError
from glam_jax.metrics_writer import read_metrics
from tests.helpers import ROOT
from tests.multiprocess_worker import NUM_STREAMS, worker_config

WORKER = os.path.join(ROOT, "tests", "multiprocess_worker.py")
STEPS, FIRST_LEG = 6, 3
TIMEOUT_S = 300  # for each group of processes started together


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(log_path, devices: int, *args) -> subprocess.Popen:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, WORKER, *(str(a) for a in args)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _wait(procs: dict[str, subprocess.Popen], logs: dict[str, str]) -> None:
    """Waits for all; once one fails or time is up, kills the others (they would hang on it)."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs.values()):
            if time.monotonic() > deadline or any(p.poll() for p in procs.values()):
                break
            time.sleep(0.2)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = {name: p.returncode for name, p in procs.items() if p.returncode != 0}
    if failed:
        tails = "\n".join(f"--- {name}:\n{open(logs[name]).read()[-3000:]}" for name in failed)
        pytest.fail(f"processes failed or timed out after {TIMEOUT_S}s: {failed}\n{tails}")


def _start_pair(tmp_path, label: str, workdir, cache, steps: int) -> dict[str, subprocess.Popen]:
    port = _free_port()
    return {
        f"{label}{i}": _start(tmp_path / f"{label}{i}.log", 4, workdir, cache, steps, i, 2, port)
        for i in range(2)
    }


def _by_step(workdir, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in read_metrics(str(workdir)) if key in row}


def test_two_processes_train_like_one_through_a_restart(tmp_path):
    cache, one, two = tmp_path / "data", tmp_path / "one", tmp_path / "two"
    create_datasets(worker_config(STEPS, cache), cache)  # corpus + tokenizer, before any worker

    # Two processes train 3 steps (and checkpoint) while one 8-device process trains all 6.
    procs = _start_pair(tmp_path, "first", two, cache, FIRST_LEG)
    procs["single"] = _start(tmp_path / "single.log", 8, one, cache, STEPS)
    logs = {name: str(tmp_path / f"{name}.log") for name in procs}
    _wait(procs, logs)
    # Both processes restart from the step-3 checkpoint, each with its own data position.
    procs = _start_pair(tmp_path, "second", two, cache, STEPS)
    logs = {name: str(tmp_path / f"{name}.log") for name in procs}
    _wait(procs, logs)

    for i in range(2):
        assert f"worker {i}/2 done: 4 of 8 devices" in open(tmp_path / f"second{i}.log").read()
    assert "worker 0/1 done: 8 of 8 devices" in open(tmp_path / "single.log").read()
    assert "Resumed from step 3" in open(tmp_path / "second0.log").read()
    # The checkpoint holds the data position of both processes' streams.
    saved = json.loads((two / "checkpoints" / str(FIRST_LEG) / "data" / "metadata").read_text())
    assert sorted(saved["streams"]) == [str(s) for s in range(NUM_STREAMS)]

    single, pair = _by_step(one, "loss"), _by_step(two, "loss")
    assert sorted(single) == sorted(pair) == list(range(1, STEPS + 1))
    for step in single:
        assert abs(single[step] - pair[step]) < 1e-5, (step, single, pair)
    assert single[STEPS] < single[1]
    single_eval, pair_eval = _by_step(one, "eval_loss"), _by_step(two, "eval_loss")
    assert sorted(pair_eval) == [FIRST_LEG, STEPS] and sorted(single_eval) == [STEPS]
    assert abs(single_eval[STEPS] - pair_eval[STEPS]) < 1e-5


@pytest.mark.parametrize("mesh_shape", [(1, 1, 8), (2, 4, 1)])
def test_a_batch_not_dealt_out_over_the_processes_is_refused(monkeypatch, mesh_shape):
    """Pretending there are two processes while this one holds every device: its rows would not
    be the half of the batch the data pipeline gives it, so building a batch fails clearly."""
    mesh = sharding.make_mesh(mesh_shape)
    steps._process_row_share.cache_clear()
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    try:
        with pytest.raises(GlamError, match="equal contiguous share"):
            steps._process_row_share(mesh)
    finally:
        steps._process_row_share.cache_clear()
