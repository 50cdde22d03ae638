"""Trains the same model on the same data once per router (and dispatch path) and compares.

python experiments/compare_routers.py --config=configs/glam_tiny.py --steps=150 \
    --workdir=/tmp/compare_routers [--dispatches=einsum,sort,dropless]

Writes <workdir>/results.json, <workdir>/compare_routers.png (eval loss curves and per-expert
load) and prints a table. Each run keeps its own metrics.jsonl under <workdir>/<run>-<path>.
A run is a router with the settings its paper uses (RUNS), e.g. --routers=topk_sigmoid,group_topk.
"""

from __future__ import annotations

import json
import os
import time

from absl import flags, logging
from ml_collections import config_flags

from glam_jax import cli, config_checks, gpu_defaults, train
from glam_jax.metrics_writer import read_metrics
from glam_jax.moe import routers as routing

_CONFIG = config_flags.DEFINE_config_file("config", "configs/glam_tiny.py", "Base config.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/glam_compare_routers", "Output directory.")
_STEPS = flags.DEFINE_integer("steps", 150, "Training steps per run.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 25, "Steps between evaluations.")
# Each compared run: name -> (moe.router, k, other moe.* fields as its paper sets them).
# A router registered in routers.ROUTERS but not listed here runs as itself with k=2.
RUNS = {
    "gshard_top2": ("gshard_top2", 2, {}),
    # Praxis: the 2nd expert drawn in proportion to the gates, gates renormalised after capacity
    "gshard_top2_sampling": (
        "gshard_top2",
        2,
        {"second_expert_policy": "sampling", "gate_norm": "after_capacity"},
    ),
    "switch_top1": ("switch_top1", 1, {"router_init_scale": 0.1}),  # Switch's smaller init
    "topk_softmax": ("topk_softmax", 2, {}),
    "topk": ("topk", 2, {}),  # OLMoE / Qwen2-MoE: softmax, top-k, no renormalisation
    # DeepSeek-V3 scores without groups: sigmoid, top-k, renormalised, V3's sequence-wise loss
    "topk_sigmoid": (
        "topk",
        2,
        {"router_score": "sigmoid", "norm_topk_prob": True, "sequence_aux_loss_weight": 1e-4},
    ),
    # DeepSeek-V3 group-limited: 4 groups of 2 experts, the best 2 by the sum of their top 2
    "group_topk": (
        "group_topk",
        2,
        {
            "router_score": "sigmoid",
            "norm_topk_prob": True,
            "num_groups": 4,
            "topk_groups": 2,
            "group_score": "top2_sum",
            "sequence_aux_loss_weight": 1e-4,
        },
    ),
    # Shazeer et al. use 0.1 for both of their losses
    "noisy_topk": ("noisy_topk", 2, {"importance_loss_weight": 0.1, "load_loss_weight": 0.1}),
    "expert_choice": ("expert_choice", 2, {}),
}
_ROUTERS = flags.DEFINE_list(
    "routers",
    list(dict.fromkeys([*RUNS, *routing.ROUTERS])),
    f"Runs to compare: names of RUNS ({', '.join(RUNS)}) or of registered routers.",
)
_DISPATCHES = flags.DEFINE_list("dispatches", ["einsum"], "Dispatch paths to compare.")


def run_config(base, run: str, dispatch: str, workdir: str):
    router, k, fields = RUNS.get(run, (run, 2, {}))
    config = base.copy_and_resolve_references()
    config.moe.router = router
    config.moe.dispatch = dispatch
    config.moe.num_selected = k
    for key, value in fields.items():
        config.moe[key] = value
    config.train.steps = _STEPS.value
    config.train.eval_every = _EVAL_EVERY.value
    config.train.log_every = min(config.train.log_every, _EVAL_EVERY.value)
    config.train.checkpoint_every = 0
    config.train.progress_bar = False
    config.data.cache_dir = config.data.cache_dir or os.path.join(workdir, "data")
    return config


def summarise(name: str, router: str, dispatch: str, rows: list[dict], seconds: float) -> dict:
    evals = [r for r in rows if "eval_loss" in r]
    trains = [r for r in rows if "loss" in r]
    last = trains[-1]
    return {
        "run": name,
        "router": router,
        "dispatch": dispatch,
        "eval_steps": [r["step"] for r in evals],
        "eval_loss": [r["eval_loss"] for r in evals],
        "eval_bits_per_char": [r["eval_bits_per_char"] for r in evals],
        "final_eval_loss": evals[-1]["eval_loss"],
        "final_bits_per_char": evals[-1]["eval_bits_per_char"],
        "expert_load_last": last.get("expert_load"),
        "dropped_fraction_last": last.get("dropped_fraction"),
        "router_entropy_last": last.get("router_entropy"),
        "top1_stability_last": last.get("top1_stability"),
        "aux_loss_last": last.get("aux_loss"),
        "tokens_per_s": sum(r["tokens_per_s"] for r in trains) / len(trains),
        "wall_s": seconds,
    }


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_load) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        ax_loss.plot(r["eval_steps"], r["eval_loss"], marker="o", label=r["run"])
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("eval loss (nats/token)")
    ax_loss.set_title("Held-out loss")
    ax_loss.legend(fontsize=8)
    width = 0.8 / max(len(results), 1)
    for i, r in enumerate(results):
        load = r["expert_load_last"][-1] if r["expert_load_last"] else []
        ax_load.bar([e + i * width for e in range(len(load))], load, width=width, label=r["run"])
    if results and results[0]["expert_load_last"]:
        uniform = 1.0 / len(results[0]["expert_load_last"][-1])
        ax_load.axhline(uniform, color="k", linestyle="--", linewidth=1, label="uniform")
    ax_load.set_xlabel("expert (last MoE layer)")
    ax_load.set_ylabel("share of routed assignments")
    ax_load.set_title("Expert load at the last step")
    ax_load.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    workdir = _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    results, skipped = [], []
    for run in _ROUTERS.value:
        for dispatch in _DISPATCHES.value:
            name = f"{run}-{dispatch}"
            run_dir = os.path.join(workdir, name)
            config = run_config(_CONFIG.value, run, dispatch, workdir)
            router = config.moe.router
            try:
                config_checks.check_model(config)
            except config_checks.ConfigError as err:
                skipped.append({"run": name, "reason": str(err)})
                print(f"skip {name}: {err}")
                continue
            if os.path.exists(run_dir):
                import shutil

                shutil.rmtree(run_dir)  # a comparison always starts from scratch
            print(f"== {name}", flush=True)
            start = time.perf_counter()
            train.train_and_evaluate(config, run_dir)
            seconds = time.perf_counter() - start
            results.append(summarise(name, router, dispatch, read_metrics(run_dir), seconds))
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"steps": _STEPS.value, "results": results, "skipped": skipped}, f, indent=1)
    plot(results, os.path.join(workdir, "compare_routers.png"))
    print(
        f"\n{'run':28s} {'eval loss':>9s} {'bits/char':>9s} {'dropped':>8s} "
        f"{'entropy':>8s} {'top1 stab':>9s} {'tok/s':>8s}"
    )
    for r in results:
        dropped = sum(r["dropped_fraction_last"]) / len(r["dropped_fraction_last"])
        entropy = sum(r["router_entropy_last"]) / len(r["router_entropy_last"])
        stab = r["top1_stability_last"]
        print(
            f"{r['run']:28s} {r['final_eval_loss']:9.4f} {r['final_bits_per_char']:9.4f} "
            f"{dropped:8.3f} {entropy:8.3f} {stab if stab is not None else float('nan'):9.3f} "
            f"{r['tokens_per_s']:8.0f}"
        )
    print(f"\nwrote {workdir}/results.json and {workdir}/compare_routers.png")


if __name__ == "__main__":
    gpu_defaults.apply()  # XLA/CUDA settings for GPU hosts; nothing elsewhere
    cli.run(main)
