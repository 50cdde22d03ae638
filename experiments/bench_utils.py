"""Timing and config loading shared by the benchmark scripts (no flags here)."""

from __future__ import annotations

import statistics
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
