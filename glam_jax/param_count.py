"""python -m glam_jax.param_count --config=configs/glam_1_7b_64e.py [--json]
glam-param-count --config=glam:size=1_7b  (the installed console script; a preset name)

Total and activated-per-token parameters and training FLOPs per token, from abstract shapes,
printed beside the published figures where the config carries them (config.paper). A paper
row compares with the rows of its own convention (`config.paper.convention`): 'two_matrix'
(GLaM, the default) or 'as_built' (Mixtral counts its three-matrix SwiGLU experts).
"""

from __future__ import annotations

import dataclasses
import json

from absl import flags
from ml_collections import config_flags

from glam_jax import cli, flops

# Flags are defined only when run as a program, so importing this module (tests, notebooks)
# never clashes with another module's `--config`.
_FLAGS: dict = {}


def _define_flags() -> dict:
    """The command-line flags of this program."""
    return dict(
        config=config_flags.DEFINE_config_file(
            "config", None, "Model config file.", lock_config=False
        ),
        json=flags.DEFINE_bool("json", False, "Print one JSON object instead of a table."),
    )


def report(config) -> dict:
    """The counts of `config` with their convention and, where known, the paper's figures."""
    counts = flops.count(config)
    out = dataclasses.asdict(counts)
    out["convention"] = (
        "total: every parameter; activated: non-expert + k/E of expert weights; "
        "two_matrix: FFN gate matrices wi_1 left out (the GLaM paper's convention); "
        "flops_per_token: training (3 x forward) matmul + causal attention FLOPs"
    )
    paper = config.get("paper")
    if paper is not None:
        out["paper"] = {
            "name": paper.name,
            "convention": paper.get("convention", "two_matrix"),
            "total_params": paper.total_params,
            "activated_params": paper.activated_params,
            "ratio_total_as_built": counts.total_params / paper.total_params,
            "ratio_activated_as_built": counts.activated_params / paper.activated_params,
            "ratio_total_two_matrix": counts.total_params_two_matrix / paper.total_params,
            "ratio_activated_two_matrix": counts.activated_params_two_matrix
            / paper.activated_params,
        }
    return out


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return f"{n:.0f}"


def main(argv) -> None:
    """Prints the report of --config (a table, or JSON with --json)."""
    del argv
    out = report(_FLAGS["config"].value)
    if _FLAGS["json"].value:
        print(json.dumps(out))
        return
    paper = out.get("paper")
    rows = [
        ("total params (as built, gated FFN)", out["total_params"], "total_params", "as_built"),
        ("total params (two-matrix FFN)", out["total_params_two_matrix"], "total_params", None),
        ("activated/token (as built)", out["activated_params"], "activated_params", "as_built"),
        (
            "activated/token (two-matrix FFN)",
            out["activated_params_two_matrix"],
            "activated_params",
            None,
        ),
    ]
    print(f"{'quantity':38s} {'glam_jax':>12s} {'paper':>10s} {'ratio':>7s}")
    for label, value, key, convention in rows:
        # An as-built paper figure is not compared with the two-matrix rows (GLaM-specific).
        shown = paper and (paper["convention"] == "two_matrix" or convention == "as_built")
        ref = paper[key] if shown else None
        ratio = f"{value / ref:7.3f}" if ref else ""
        print(f"{label:38s} {_fmt(value):>12s} {_fmt(ref) if ref else '':>10s} {ratio}")
    print(f"{'expert params':38s} {_fmt(out['expert_params']):>12s}")
    print(
        f"{'train FLOPs/token (seq ' + str(out['seq_len']) + ')':38s} "
        f"{_fmt(out['flops_per_token']):>12s}"
    )
    if paper:
        print(f"paper row: {paper['name']}")
    print(f"convention: {out['convention']}")


def entry() -> None:
    """The `glam-param-count` console script (and `python -m glam_jax.param_count`)."""
    _FLAGS.update(_define_flags())
    flags.mark_flag_as_required("config")
    cli.run(main)


if __name__ == "__main__":
    entry()
