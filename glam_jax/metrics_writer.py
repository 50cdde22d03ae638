"""Training metrics to `metrics.jsonl` (one JSON object per row) and TensorBoard event files.

Only the primary process writes. TensorBoard files come from tensorboardX, so no TensorFlow.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def _plain(value: Any) -> Any:
    """numpy/jax values -> JSON numbers or nested lists."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        return arr.item()
    return arr.tolist()


class MetricsWriter:
    """Appends rows to <workdir>/metrics.jsonl and scalars to <workdir>/tensorboard."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, row: dict[str, Any]) -> None:
        """Appends one row of metrics for `step` (JSON line, and TensorBoard where enabled)."""
        if not self.enabled:
            return
        plain = {"step": int(step), **{k: _plain(v) for k, v in row.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(plain) + "\n")
        for key, value in plain.items():
            if key == "step":
                continue
            if isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
            elif isinstance(value, list) and value and isinstance(value[0], (int, float)):
                for i, v in enumerate(value):  # per-layer values, e.g. dropped_fraction
                    self._tb.add_scalar(f"{key}/layer_{i}", v, step)
        self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the writers."""
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All rows of <workdir>/metrics.jsonl (for tests, notebooks and comparison scripts)."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
