"""Where a train step's GPU time goes: traces a few steps and sums kernel time by name.

python experiments/profile_step.py --config=configs/glam_gpu_bench.py:moe --top=30 \
    --json_out=/tmp/profile.json

Uses jax.profiler's Perfetto trace (no TensorBoard plugin needed) and groups device events by
kernel name, so a slow op (e.g. a scatter in a gradient) shows up at the top of the table; a
second table groups them by HLO instruction with the JAX op each came from (its op_name
metadata in the compiled module), which is how a GEMM running twice shows up.
"""

from __future__ import annotations

import json

from absl import flags

from glam_jax import cli, gpu_defaults

_CONFIG = flags.DEFINE_string("config", "configs/glam_gpu_bench.py:moe", "Config file[:variant].")
_STEPS = flags.DEFINE_integer("steps", 3, "Traced steps.")
_TOP = flags.DEFINE_integer("top", 30, "Rows to print.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write the table as JSON here.")


def main(argv) -> None:
    del argv
    import jax

    from experiments.bench_utils import (
        hlo_op_sources,
        kernel_table,
        load_config,
        random_train_step,
        trace,
    )

    config = load_config(_CONFIG.value)
    _, state, train_step, batch = random_train_step(config)
    for _ in range(3):
        state, _ = train_step(state, batch)
    jax.block_until_ready(state)
    current = {"state": state}

    def one_step():  # the step donates its state, so thread it through
        current["state"], _ = train_step(current["state"], batch)
        return current["state"]

    path = trace(one_step, _STEPS.value)
    rows = kernel_table(path, _STEPS.value)
    step_ms = sum(r["ms_per_step"] for r in rows)
    print(f"{_CONFIG.value}: {step_ms:.1f} ms of kernels per step")
    for r in rows[: _TOP.value]:
        share = r["ms_per_step"] / step_ms
        calls = r["count_per_step"]
        print(f"{r['ms_per_step']:8.2f} ms {share:6.1%} x{calls:5.0f}  {r['name'][:110]}")
    # The same time by HLO instruction, with the JAX op each one came from.
    sources = hlo_op_sources(train_step.lower(state, batch).compile().as_text())
    by_op = kernel_table(path, _STEPS.value, key="hlo_op")
    for r in by_op:
        r["source"] = sources.get(r["name"], "")
    print("by HLO instruction:")
    for r in by_op[: _TOP.value]:
        print(
            f"{r['ms_per_step']:8.2f} ms x{r['count_per_step']:4.0f}  {r['name'][:40]:40s} "
            f"{r['source'][-110:]}"
        )
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            out = {"config": _CONFIG.value, "kernel_ms_per_step": step_ms, "rows": rows}
            json.dump(dict(out, by_hlo_op=by_op), f)


if __name__ == "__main__":
    gpu_defaults.apply()
    cli.run(main)
