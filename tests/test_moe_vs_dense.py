"""The MoE-vs-dense study: a tiny two-arm run of the driver end to end, the report maths
(glam_jax/study_report.py), bad flags."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from glam_jax import study_report

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments/moe_vs_dense.py"


def run_driver(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd
    )


def test_tiny_study_writes_json_plots_and_table(tmp_path):
    out = tmp_path / "out"
    result = run_driver(
        "--scale=tiny",
        "--runs=dense,moe8",
        f"--workdir={tmp_path / 'study'}",
        f"--out={out}",
        "--keep=moe8",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    study = json.loads((out / "moe_vs_dense.json").read_text())
    arms = {a["arm"]: a for a in study["arms"]}
    assert set(arms) == {"dense", "moe8"}
    dense, moe = arms["dense"], arms["moe8"]
    # Equal activated FLOPs per token: half-width top-2 experts do one dense FFN's work; the
    # router's [M, E] weights are the only difference.
    assert moe["total_params"] > dense["total_params"]
    assert abs(moe["flops_per_token"] / dense["flops_per_token"] - 1) < 0.01
    for arm in arms.values():
        assert arm["steps"] == 20 and arm["tokens"] == 20 * arm["tokens_per_step"]
        assert arm["eval_curve"]["step"] == [10, 20]
        assert arm["final_eval_loss"] == arm["eval_curve"]["eval_loss"][-1]
    assert study["dense_final_eval_loss"] == dense["final_eval_loss"]
    assert study["best_moe_arm"] == "moe8"
    assert "distill_retained_fraction" in study
    table = (out / "moe_vs_dense_table.md").read_text()
    assert "| dense_s0 |" in table and "| moe8_s0 |" in table
    for name in ("loss_vs_steps", "loss_vs_wallclock", "gap_vs_steps"):
        assert (out / f"moe_vs_dense_{name}.png").stat().st_size > 10_000

    # checkpoint_every=-1 keeps nothing, --keep keeps the final checkpoint.
    def saved_steps(run):
        directory = tmp_path / "study" / run / "checkpoints"
        return sorted(p.name for p in directory.iterdir()) if directory.exists() else []

    assert saved_steps("dense_s0") == [] and saved_steps("moe8_s0") == ["20"]
    # The report rebuilds from the JSON alone, merging runs from another study file.
    other = tmp_path / "other.json"
    extra = dict(moe, seed=1, final_eval_loss=moe["final_eval_loss"] + 0.5)
    other.write_text(json.dumps({"arms": [extra]}))
    rebuilt = run_driver("--report_only", f"--out={out}", f"--merge={other}")
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    merged = json.loads((out / "moe_vs_dense.json").read_text())
    assert sorted((a["arm"], a["seed"]) for a in merged["arms"]) == [
        ("dense", 0),
        ("moe8", 0),
        ("moe8", 1),
    ]
    assert merged["seed_spread"]["moe8"]["range"] == pytest.approx(0.5)


def curve(losses, every=100):
    return {"step": [every * (i + 1) for i in range(len(losses))], "eval_loss": losses}


def test_steps_to_reach_interpolates_between_evaluations():
    c = curve([5.0, 4.0, 3.0, 2.5])
    assert study_report.steps_to_reach(c, 4.0) == 200
    assert study_report.steps_to_reach(c, 3.5) == pytest.approx(250)
    assert study_report.steps_to_reach(c, 2.75) == pytest.approx(350)
    assert study_report.steps_to_reach(c, 6.0) == 100
    assert study_report.steps_to_reach(c, 2.0) is None


def test_headline_ratios_pair_each_seed_with_its_dense_run():

    def run(arm, seed, losses, step_time):
        return {
            "arm": arm,
            "seed": seed,
            "eval_curve": curve(losses),
            "final_eval_loss": losses[-1],
            "steps": 100 * len(losses),
            "step_time_s": step_time,
            "train_wallclock_s": 100 * len(losses) * step_time,
        }

    study = {
        "arms": [
            run("dense", 0, [5.0, 4.0, 3.0, 2.0], 0.1),
            run("dense", 1, [5.0, 4.0, 3.0, 2.2], 0.1),
            run("moe16", 0, [4.0, 3.0, 2.0, 1.5], 0.2),
            run("moe16", 1, [4.5, 3.5, 2.7, 2.1], 0.2),
            run("moe64", 0, [4.5, 3.5, 2.5, 1.9], 0.3),
        ]
    }
    study_report.summarise(study)
    assert study["best_moe_arm"] == "moe16"
    assert study["steps_ratio_to_dense_loss"] == pytest.approx(300 / 400)
    assert study["wallclock_ratio_to_dense_loss"] == pytest.approx(300 * 0.2 / 40)
    seed1 = study["paired_seeds"][1]
    # moe16 seed 1 reaches dense seed 1's 2.2 between steps 300 (2.7) and 400 (2.1).
    assert seed1["seed"] == 1 and seed1["steps_ratio"] == pytest.approx((300 + 500 / 6) / 400)
    assert seed1["loss_gap"] == pytest.approx(0.1)
    assert study["seed_spread"]["dense"]["range"] == pytest.approx(0.2)
    for a in study["arms"]:
        a["experts"] = 0 if a["arm"] == "dense" else int(a["arm"][3:])
    gaps = study_report.gaps_to_dense(study)
    assert list(gaps) == ["moe16_s0", "moe16_s1", "moe64_s0"]  # each MoE run with a dense twin
    steps, gap = gaps["moe16_s1"]  # against dense seed 1, not seed 0
    assert steps == [100, 200, 300, 400]
    assert gap == pytest.approx([-0.5, -0.5, -0.3, -0.1])


def test_distillation_and_repeats_join_the_report(tmp_path):
    """The default-recipe student gives the headline fraction; repeats are compared with the
    study's run of the same arm and seed; both reach the table and a plot."""
    base = {
        "arm": "dense",
        "seed": 0,
        "experts": 0,
        "router": "",
        "k": 0,
        "total_params": 1e6,
        "activated_params": 1e6,
        "flops_per_token": 6e6,
        "tokens": 1000,
        "steps": 200,
        "step_time_s": 0.1,
        "train_wallclock_s": 20.0,
        "mfu": 0.4,
        "eval_curve": curve([4.0, 3.0]),
        "final_eval_loss": 3.0,
        "command": "train dense",
    }
    repeat = dict(base, final_eval_loss=2.9, step_time_s=0.11, eval_curve=curve([4.0, 2.9]))
    student = {
        "workdir": "/runs/student",
        "hard_weight": 0.25,
        "soft_weight": 0.75,
        "temperature": 1.0,
        "init_from_teacher": True,
        "steps": 200,
        "student_eval_loss": 2.95,
        "teacher_eval_loss": 2.8,
        "dense_eval_loss": 3.0,
        "retained_fraction": 0.25,
        "fresh_params": ["blocks_0/layer_1/ffn/wo"],
    }
    other = dict(student, workdir="/runs/scratch", init_from_teacher=False, retained_fraction=0.1)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        json.dumps({"step": 100, "loss": 4.1})
        + "\n"
        + json.dumps({"step": 100, "eval_loss": 3.3})
        + "\n"
        + json.dumps({"step": 200, "eval_loss": 2.95})
        + "\n"
    )
    study = {"arms": [base]}
    study_report.merge_rerun(study, repeat)
    study_report.merge_rerun(study, repeat)  # the same record twice is kept once
    study_report.merge_distill(study, study_report.distill_record(other, None))
    study_report.merge_distill(study, study_report.distill_record(student, metrics))
    study_report.merge_distill(study, study_report.distill_record(student, metrics))
    study_report.write_report(study, tmp_path)

    saved = json.loads((tmp_path / study_report.JSON_NAME).read_text())
    assert saved["distill_retained_fraction"] == 0.25  # the default recipe's, not the other's
    assert len(saved["distillation"]) == 2 and len(saved["reruns"]) == 1
    assert saved["distillation"][1]["eval_curve"] == curve([3.3, 2.95])
    assert saved["distillation"][1]["fresh_param_count"] == 1
    (row,) = saved["rerun_spread"]
    assert row["run"] == "dense_s0" and row["delta"] == pytest.approx(-0.1)
    table = (tmp_path / "moe_vs_dense_table.md").read_text()
    assert "| student | yes | 0.25 / 0.75 / 1.0 | 200 | 2.9500 | 2.8000 | 3.0000 | 0.25 |" in table
    assert "| dense_s0 | 3.0000 | 2.9000 | -0.1000 |" in table
    assert (tmp_path / "moe_vs_dense_distillation.png").stat().st_size > 0


@pytest.mark.parametrize(
    "args, words",
    [
        (["--runs=dense:x", "--workdir=/tmp/unused_mvd"], "arm or arm:seed"),
        (["--runs=mixtral", "--scale=tiny", "--workdir=/tmp/unused_mvd"], "not known"),
        (["--scale=huge", "--workdir=/tmp/unused_mvd"], "not one of"),
        (["--runs=dense"], "--workdir is required"),
        (["--scale=tiny", "--set=data.vocab_size=512", "--workdir=/tmp/unused_mvd"], "not a field"),
        (["--report_only", "--merge=/nonexistent/study.json"], "not an existing file"),
        (["--report_only", "--distill_results=/nonexistent.json"], "not an existing file"),
    ],
)
def test_bad_flags_get_one_sentence(tmp_path, args, words):
    result = run_driver(f"--out={tmp_path}", *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], result.stderr
