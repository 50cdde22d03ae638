"""The MoE-vs-dense study's report: one run's record from its metrics, the headline ratios,
the markdown table and the plots. Pure functions of JSON-able dicts, so a report can be rebuilt
on any machine from the saved study JSON (experiments/moe_vs_dense.py is the driver).
"""

from __future__ import annotations

import datetime
import json
import statistics
from pathlib import Path

from glam_jax.errors import GlamError

JSON_NAME = "moe_vs_dense.json"


class StudyError(GlamError):
    """A bad flag, a failed run or a run without evaluations; the message is one sentence."""


def run_name(arm: str, seed: int) -> str:
    """A run's name and workdir: arm and seed, e.g. 'moe16_s1'."""
    return f"{arm}_s{seed}"


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of a run's metrics.jsonl."""
    train_rows, eval_rows = [], []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "eval_loss" in row:
                eval_rows.append(row)
            elif "loss" in row:
                train_rows.append(row)
    return train_rows, eval_rows


def arm_record(arm: str, seed: int, config, workdir: Path, process_s: float, cmd: list[str]):
    """Everything the report needs about one finished run, from its config and metrics."""
    from glam_jax import flops

    counts = flops.count(config)
    train_rows, eval_rows = read_metrics(workdir / "metrics.jsonl")
    if not eval_rows:
        raise StudyError(f"run {run_name(arm, seed)} logged no evaluation in {workdir}.")
    tokens_per_step = config.train.batch_size * config.train.seq_len
    # The first window holds the compile; later windows exclude evaluation (train.py resets
    # its clock after each), so their median is the steady step time.
    windows = [tokens_per_step / r["tokens_per_s"] for r in train_rows[1:]] or [
        tokens_per_step / r["tokens_per_s"] for r in train_rows
    ]
    step_time = statistics.median(windows)
    mfus = [r["mfu"] for r in train_rows[1:] if "mfu" in r]
    e = config.moe
    return {
        "arm": arm,
        "seed": seed,
        "experts": int(e.num_experts),
        "router": e.router if e.num_experts else "",
        "k": int(e.num_selected) if e.num_experts else 0,
        "expert_mlp_dim": int(e.expert_mlp_dim or config.model.mlp_dim) if e.num_experts else 0,
        "total_params": counts.total_params,
        "activated_params": counts.activated_params,
        "non_embedding_params": counts.total_params - counts.embedding_params,
        "flops_per_token": counts.flops_per_token,
        "tokens_per_step": tokens_per_step,
        "steps": int(eval_rows[-1]["step"]),
        "tokens": int(eval_rows[-1]["step"]) * tokens_per_step,
        "step_time_s": step_time,
        "train_wallclock_s": step_time * int(eval_rows[-1]["step"]),
        "process_wallclock_s": process_s,
        "mfu": statistics.median(mfus) if mfus else None,
        "final_eval_loss": eval_rows[-1]["eval_loss"],
        "final_eval_bits_per_char": eval_rows[-1].get("eval_bits_per_char"),
        "eval_curve": {
            "step": [int(r["step"]) for r in eval_rows],
            "eval_loss": [r["eval_loss"] for r in eval_rows],
        },
        "train_curve": {
            "step": [int(r["step"]) for r in train_rows],
            "loss": [r["loss"] for r in train_rows],
        },
        "final_expert_load_max": _max_load(train_rows[-1]) if train_rows else None,
        "command": " ".join(cmd),
        "date": datetime.date.today().isoformat(),
    }


def _max_load(row: dict) -> float | None:
    """The busiest expert's share of assignments (1/E when balanced), max over layers."""
    load = row.get("expert_load")
    if load is None:
        return None
    flat = load if isinstance(load[0], float | int) else [x for layer in load for x in layer]
    return max(flat)


def steps_to_reach(curve: dict, target: float) -> float | None:
    """First step where the eval curve reaches `target`, linearly interpolated between evals."""
    steps, losses = curve["step"], curve["eval_loss"]
    for i, (step, loss) in enumerate(zip(steps, losses, strict=True)):
        if loss <= target:
            if i == 0:
                return float(step)
            s0, l0 = steps[i - 1], losses[i - 1]
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
    return None


def summarise(study: dict) -> dict:
    """Adds each run's steps and wall-clock to reach the final loss of the dense run with the
    same seed (seed 0's where that seed has no dense run), and the headline ratios of the best
    MoE arm of seed 0, plus the same ratios for every seed that has both runs."""
    arms = study["arms"]
    dense = {a["seed"]: a for a in arms if a["arm"] == "dense"}
    _summarise_distillation(study)
    _summarise_reruns(study)
    if not dense:
        return study
    base = dense.get(0) or dense[min(dense)]
    study["dense_final_eval_loss"] = base["final_eval_loss"]
    for a in arms:
        ref = dense.get(a["seed"], base)
        steps = steps_to_reach(a["eval_curve"], ref["final_eval_loss"])
        a["dense_reference"] = run_name("dense", ref["seed"])
        a["steps_to_dense_loss"] = steps
        a["wallclock_to_dense_loss_s"] = None if steps is None else steps * a["step_time_s"]
    moes = [a for a in arms if a["arm"] != "dense" and a["seed"] == base["seed"]]
    if moes:
        best = min(moes, key=lambda a: a["final_eval_loss"])
        study["best_moe_arm"] = best["arm"]
        study["steps_ratio_to_dense_loss"], study["wallclock_ratio_to_dense_loss"] = _ratios(
            best, base
        )
        study["paired_seeds"] = [
            dict(
                zip(
                    ("seed", "steps_ratio", "wallclock_ratio", "loss_gap"),
                    (
                        seed,
                        *_ratios(a, dense[seed]),
                        dense[seed]["final_eval_loss"] - a["final_eval_loss"],
                    ),
                    strict=True,
                )
            )
            for seed in sorted(dense)
            for a in arms
            if a["arm"] == best["arm"] and a["seed"] == seed
        ]
    seeds = {}
    for a in arms:
        seeds.setdefault(a["arm"], []).append(a["final_eval_loss"])
    study["seed_spread"] = {
        arm: {"n": len(v), "mean": statistics.fmean(v), "range": max(v) - min(v)}
        for arm, v in seeds.items()
        if len(v) > 1
    }
    return study


# The recipe the issue names as the distillation default (Switch section 5): its run gives the
# headline `distill_retained_fraction`; other recipes are reported beside it.
DEFAULT_DISTILL = dict(hard_weight=0.25, soft_weight=0.75, temperature=1.0, init_from_teacher=True)


def _summarise_distillation(study: dict) -> None:
    """`distill_retained_fraction` from the default-recipe student, else None."""
    runs = study.setdefault("distillation", [])
    default = [d for d in runs if all(d.get(k) == v for k, v in DEFAULT_DISTILL.items())]
    study["distill_retained_fraction"] = default[-1]["retained_fraction"] if default else None


def _summarise_reruns(study: dict) -> None:
    """For each repeat of a run (same arm, seed and command, another process or machine), its
    final loss minus the study's run: run-to-run noise that a seed does not control on GPUs
    (non-deterministic reductions, autotuned kernels)."""
    by_key = {(a["arm"], a["seed"]): a for a in study["arms"]}
    rows = []
    for r in study.setdefault("reruns", []):
        base = by_key.get((r["arm"], r["seed"]))
        if base is not None:
            rows.append(
                {
                    "run": run_name(r["arm"], r["seed"]),
                    "study_loss": base["final_eval_loss"],
                    "rerun_loss": r["final_eval_loss"],
                    "delta": r["final_eval_loss"] - base["final_eval_loss"],
                    "study_step_time_s": base["step_time_s"],
                    "rerun_step_time_s": r["step_time_s"],
                }
            )
    study["rerun_spread"] = rows


def distill_record(result: dict, metrics_path: Path | None) -> dict:
    """A distill_result.json (experiments/distill.py) for the study JSON, with the student's
    held-out curve from the metrics.jsonl written beside it, if any."""
    record = {k: v for k, v in result.items() if k != "fresh_params"}
    record["fresh_param_count"] = len(result.get("fresh_params") or [])
    if metrics_path is not None and metrics_path.is_file():
        _, eval_rows = read_metrics(metrics_path)
        record["eval_curve"] = {
            "step": [int(r["step"]) for r in eval_rows],
            "eval_loss": [r["eval_loss"] for r in eval_rows],
        }
    return record


def merge_distill(study: dict, record: dict) -> None:
    """Replaces the student with the same workdir and recipe, else appends."""

    def key(d):
        return (d["workdir"], *(d.get(k) for k in DEFAULT_DISTILL))

    runs = study.setdefault("distillation", [])
    study["distillation"] = [d for d in runs if key(d) != key(record)] + [record]


def merge_rerun(study: dict, record: dict) -> None:
    """Adds a repeat of a run, unless the same record (arm, seed, command, loss) is there."""

    def key(a):
        return (a["arm"], a["seed"], a["command"], a["final_eval_loss"])

    reruns = study.setdefault("reruns", [])
    if key(record) not in {key(a) for a in reruns}:
        reruns.append(record)


def _ratios(arm: dict, dense: dict) -> tuple[float | None, float | None]:
    """(steps, wall-clock) an arm needs to reach `dense`'s final loss, as fractions of dense's."""
    steps = steps_to_reach(arm["eval_curve"], dense["final_eval_loss"])
    if steps is None:
        return None, None
    return steps / dense["steps"], steps * arm["step_time_s"] / dense["train_wallclock_s"]


def _fmt(value, spec: str) -> str:
    """A table cell: '—' for a figure that does not exist."""
    return "—" if value is None else format(value, spec)


def markdown_table(study: dict) -> str:
    """One row per run: sizes, FLOPs, tokens, speed, final loss, steps/time to dense's loss."""
    head = (
        "| run | experts | router | total params | activated | GFLOP/token | tokens | "
        "step | train wall-clock | MFU | held-out loss | steps to dense loss | "
        "wall-clock (s) to dense loss |\n|" + "---|" * 13 + "\n"
    )
    rows = []
    for a in sorted(study["arms"], key=lambda a: (a["experts"], a["arm"], a["seed"])):
        rows.append(
            f"| {run_name(a['arm'], a['seed'])} | {a['experts'] or '—'} | "
            f"{(a['router'] + ' k=' + str(a['k'])) if a['experts'] else '—'} | "
            f"{a['total_params'] / 1e6:.0f}M | {a['activated_params'] / 1e6:.0f}M | "
            f"{a['flops_per_token'] / 1e9:.3f} | {a['tokens'] / 1e6:.1f}M | "
            f"{a['step_time_s'] * 1e3:.1f} ms | {a['train_wallclock_s']:.0f} s | "
            f"{_fmt(a['mfu'] and 100 * a['mfu'], '.1f')}% | {a['final_eval_loss']:.4f} | "
            f"{_fmt(a.get('steps_to_dense_loss'), '.0f')} | "
            f"{_fmt(a.get('wallclock_to_dense_loss_s'), '.0f')} |"
        )
    return head + "\n".join(rows) + "\n" + _distill_table(study) + _rerun_table(study)


def _distill_table(study: dict) -> str:
    """One row per distilled student: recipe, the three held-out losses, the retained share."""
    runs = study.get("distillation") or []
    if not runs:
        return ""
    head = (
        "\n| student | init from teacher | hard / soft / T | steps | student loss | "
        "teacher loss | dense loss | retained fraction |\n|" + "---|" * 8 + "\n"
    )
    rows = [
        f"| {Path(d['workdir']).name} | {'yes' if d['init_from_teacher'] else 'no'} | "
        f"{d['hard_weight']} / {d['soft_weight']} / {d['temperature']} | {d['steps']} | "
        f"{d['student_eval_loss']:.4f} | {d['teacher_eval_loss']:.4f} | "
        f"{_fmt(d['dense_eval_loss'], '.4f')} | {_fmt(d['retained_fraction'], '.2f')} |"
        for d in runs
    ]
    return head + "\n".join(rows) + "\n"


def _rerun_table(study: dict) -> str:
    """Each repeated run beside the study's: the run-to-run noise of one seed."""
    rows = study.get("rerun_spread") or []
    if not rows:
        return ""
    head = (
        "\n| repeated run | study loss | repeat loss | difference | study step | repeat step |"
        "\n|" + "---|" * 6 + "\n"
    )
    return (
        head
        + "\n".join(
            f"| {r['run']} | {r['study_loss']:.4f} | {r['rerun_loss']:.4f} | "
            f"{r['delta']:+.4f} | {r['study_step_time_s'] * 1e3:.1f} ms | "
            f"{r['rerun_step_time_s'] * 1e3:.1f} ms |"
            for r in rows
        )
        + "\n"
    )


def plot(study: dict, out: Path) -> list[str]:
    """Held-out loss against steps and against training wall-clock, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for x_name, label in (("steps", "training step"), ("wallclock", "training wall-clock (s)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        runs = sorted(study["arms"], key=lambda a: (a["experts"], a["arm"], a["seed"]))
        colours = {arm: f"C{i}" for i, arm in enumerate(dict.fromkeys(a["arm"] for a in runs))}
        for a in runs:  # one colour per arm, a dashed line for each further seed
            steps = a["eval_curve"]["step"]
            xs = steps if x_name == "steps" else [s * a["step_time_s"] for s in steps]
            ax.plot(
                xs,
                a["eval_curve"]["eval_loss"],
                "-" if a["seed"] == 0 else "--",
                color=colours[a["arm"]],
                label=run_name(a["arm"], a["seed"]),
            )
        if "dense_final_eval_loss" in study:
            ax.axhline(study["dense_final_eval_loss"], color="grey", lw=0.8, ls=":")
        losses = [x for a in study["arms"] for x in a["eval_curve"]["eval_loss"]]
        low = min(losses)
        ax.set_ylim(low - 0.05 * abs(low), min(max(losses), low + 2.0))
        ax.legend(fontsize=8)
        path = out / f"moe_vs_dense_loss_vs_{x_name}.png"
        title = f"MoE vs dense at equal activated FLOPs: loss vs {label}"
        written.append(_save(plt, fig, ax, path, (label, "held-out loss (nats/token)"), title))
    gap = _plot_gap(study, out, plt)
    if gap:
        written.append(gap)
    if any("eval_curve" in d for d in study.get("distillation") or []):
        written.append(_plot_distillation(study, out, plt))
    return written


def gaps_to_dense(study: dict) -> dict[str, tuple[list[int], list[float]]]:
    """run name -> (steps, held-out loss minus the same-seed dense run's) for every MoE run that
    has a dense twin, at the evaluations both share."""
    dense = {a["seed"]: a["eval_curve"] for a in study["arms"] if a["experts"] == 0}
    gaps = {}
    for a in sorted(study["arms"], key=lambda a: (a["experts"], a["arm"], a["seed"])):
        if not a["experts"] or a["seed"] not in dense:
            continue
        ref = dict(zip(dense[a["seed"]]["step"], dense[a["seed"]]["eval_loss"], strict=True))
        curve = zip(a["eval_curve"]["step"], a["eval_curve"]["eval_loss"], strict=True)
        pairs = [(s, x - ref[s]) for s, x in curve if s in ref]
        gaps[run_name(a["arm"], a["seed"])] = ([s for s, _ in pairs], [g for _, g in pairs])
    return gaps


def _plot_gap(study: dict, out: Path, plt) -> str | None:
    """gaps_to_dense as lines: gaps of a few hundredths of a nat are invisible on the loss
    plot's scale."""
    gaps = gaps_to_dense(study)
    if not gaps:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    arms = dict.fromkeys(name.rsplit("_s", 1)[0] for name in gaps)
    colours = {arm: f"C{i + 1}" for i, arm in enumerate(arms)}
    for name, (steps, gap) in gaps.items():
        arm, seed = name.rsplit("_s", 1)
        style = "-o" if seed == "0" else "--o"
        ax.plot(steps, gap, style, ms=3, color=colours[arm], label=name)
    ax.axhline(0.0, color="C0", lw=1.0, label="dense (same seed)")
    ax.legend(fontsize=8, ncol=2)
    labels = ("training step", "held-out loss − dense's (nats/token)")
    title = "MoE minus dense at equal activated FLOPs (below 0: MoE ahead)"
    return _save(plt, fig, ax, out / "moe_vs_dense_gap_vs_steps.png", labels, title)


def _save(plt, fig, ax, path: Path, labels: tuple[str, str], title: str) -> str:
    """Axis labels, title and grid, then the PNG; returns its path."""
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _plot_distillation(study: dict, out: Path, plt) -> str:
    """Each student's held-out curve beside the final losses of its teacher and dense run."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    runs = [d for d in study["distillation"] if "eval_curve" in d]
    for i, d in enumerate(runs):
        label = f"student ({'teacher init' if d['init_from_teacher'] else 'from scratch'})"
        ax.plot(
            d["eval_curve"]["step"], d["eval_curve"]["eval_loss"], color=f"C{i + 2}", label=label
        )
    ref = runs[-1]
    ax.axhline(ref["teacher_eval_loss"], color="C1", ls="--", label="teacher (MoE), final")
    if ref["dense_eval_loss"] is not None:
        ax.axhline(ref["dense_eval_loss"], color="C0", ls="--", label="dense baseline, final")
    losses = [x for d in runs for x in d["eval_curve"]["eval_loss"]]
    low = min(losses + [ref["teacher_eval_loss"]])
    ax.set_ylim(low - 0.05 * abs(low), low + 1.0)
    ax.legend(fontsize=8)
    labels = ("student training step", "held-out loss (nats/token)")
    title = "Distilling the MoE teacher into a dense student"
    return _save(plt, fig, ax, out / "moe_vs_dense_distillation.png", labels, title)


def write_report(study: dict, out: Path) -> None:
    """Summarises the study and writes its JSON, and with runs in it the plots and the table."""
    out.mkdir(parents=True, exist_ok=True)
    summarise(study)
    (out / JSON_NAME).write_text(json.dumps(study, indent=1, sort_keys=True) + "\n")
    if study["arms"]:
        plot(study, out)
        (out / "moe_vs_dense_table.md").write_text(markdown_table(study))


def load_study(out: Path) -> dict:
    """The study JSON saved in `out`, or an empty study."""
    path = out / JSON_NAME
    if path.is_file():
        return json.loads(path.read_text())
    return {"arms": []}


def merge_arm(study: dict, record: dict) -> None:
    """Replaces the run with the same (arm, seed), else appends."""
    key = (record["arm"], record["seed"])
    study["arms"] = [a for a in study["arms"] if (a["arm"], a["seed"]) != key] + [record]
