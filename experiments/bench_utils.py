"""Timing and config loading shared by the benchmark scripts (no flags here)."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time


def time_fn(fn, *args, iters: int) -> float:
    """Median seconds of fn(*args) after two warm-up calls."""
    import jax

    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_config(spec: str):
    """'path.py[:variant]' -> ConfigDict, as ml_collections' config flags do."""
    import importlib.util

    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def random_train_step(config):
    """(mesh, state, jitted train step, global batch of random tokens) for a config.

    Benchmarks and profiles time the model, not the input pipeline: the batch is random
    tokens in the pipeline's layout, one unpacked document per row.
    """
    import numpy as np

    from glam_jax import optim, sharding, steps

    mesh = sharding.make_mesh(config.mesh.shape)
    model = steps.build_model(config)
    tx = optim.make_optimizer(config.train)
    state, shardings = steps.create_train_state(config, model, tx, mesh)
    train_step = steps.make_train_step(config, model, tx, mesh, shardings)
    b, s, v = config.train.batch_size, config.train.seq_len, config.model.vocab_size
    rng = np.random.RandomState(0)
    batch = {
        "inputs": rng.randint(0, v, (b, s)).astype(np.int32),
        "targets": rng.randint(0, v, (b, s)).astype(np.int32),
        "segment_ids": np.ones((b, s), np.int32),
        "positions": np.tile(np.arange(s, dtype=np.int32), (b, 1)),
        "weights": np.ones((b, s), np.float32),
        "target_chars": np.ones((b, s), np.int32),
    }
    return mesh, state, train_step, steps.global_batch(batch, mesh)


def kernel_table(trace_path: str, steps: int, key: str = "name") -> list[dict]:
    """[{name, ms_per_step, count_per_step}] of device events per device, largest first.

    key='name' groups by kernel name; key='hlo_op' by the HLO instruction that launched the
    kernel (XLA tags each GPU event with it), to look up in the compiled module.
    """
    with gzip.open(trace_path, "rt") as f:
        trace = json.load(f)
    pids = {
        e["pid"]
        for e in trace["traceEvents"]
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and "/device:" in str(e.get("args", {}).get("name", ""))
    }
    total = collections.Counter()
    count = collections.Counter()
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e.get("pid") in pids:
            group = e["name"] if key == "name" else e.get("args", {}).get(key, e["name"])
            total[group] += e.get("dur", 0)
            count[group] += 1
    devices = max(len(pids), 1)  # several GPUs: report the per-device average
    return [
        {
            "name": n,
            "ms_per_step": us / 1e3 / steps / devices,
            "count_per_step": count[n] / steps / devices,
        }
        for n, us in total.most_common()
    ]


def trace(fn, steps: int) -> str:
    """Runs fn() `steps` times under jax.profiler; returns the Perfetto trace file."""
    import jax

    jax.block_until_ready(fn())
    logdir = tempfile.mkdtemp()
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        for _ in range(steps):
            out = fn()
        jax.block_until_ready(out)
    return glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)[0]


def trace_kernels(fn, steps: int) -> list[dict]:
    """kernel_table (by kernel name) of `steps` traced calls of fn()."""
    return kernel_table(trace(fn, steps), steps)


def device_seconds(fn, calls: int = 5) -> float:
    """Kernel time of one fn() call, from `calls` traced calls: the GPU's time without the host
    dispatch that separates standalone calls."""
    return sum(r["ms_per_step"] for r in trace_kernels(fn, calls)) / 1e3


_HLO_OP = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]+)"', re.MULTILINE)


def hlo_op_sources(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the JAX op path that produced it (its op_name metadata)."""
    return {m.group(1): m.group(2) for m in _HLO_OP.finditer(hlo_text)}


COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")


def collective_counts(hlo_text: str) -> dict[str, int]:
    """How many of each collective a compiled HLO module holds (async start ops counted once)."""
    counts = {}
    for name in COLLECTIVES:
        starts = hlo_text.count(f" {name}-start(")
        counts[name] = starts if starts else hlo_text.count(f" {name}(")
    return counts
