"""Writes an analysis summary to a folder: summary.json, PNG figures and summary.md."""

from __future__ import annotations

import json
import math
import os

import numpy as np

from glam_jax.analysis.errors import AnalysisError

FIGURES = ("expert_share_heatmap.png", "repeat_rate.png", "mutual_information.png")


def write_report(summary: dict, out_dir: str, title: str = "Routing analysis") -> list[str]:
    """summary.json, the figures (when matplotlib is installed) and summary.md; returns paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "summary.json")]
    with open(paths[0], "w") as f:
        json.dump(summary, f, indent=1, allow_nan=True)
    paths += write_figures(summary, out_dir)
    md = os.path.join(out_dir, "summary.md")
    with open(md, "w") as f:
        f.write(markdown(summary, title))
    return paths + [md]


def write_figures(summary: dict, out_dir: str) -> list[str]:
    """Plots of the summary into out_dir; returns the files written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AnalysisError(
            "the figures need matplotlib; pip install matplotlib (or glam_jax[plots])."
        ) from None
    paths = [os.path.join(out_dir, name) for name in FIGURES]
    layers = [f"{i} (L{j})" for i, j in enumerate(summary["moe_layer_index"])]
    x = np.arange(summary["num_moe_layers"])

    # layer x expert share of top-k assignments, one panel per domain, one colour scale
    share = np.asarray(summary["expert_share_per_domain"])  # [L, D, E]
    domains = summary["domains"]
    fig, axes = plt.subplots(
        1, len(domains), figsize=(2.2 + 2.4 * len(domains), 0.6 + 0.35 * len(x)), squeeze=False
    )
    vmax = float(share.max()) if share.size else 1.0
    for d, (ax, name) in enumerate(zip(axes[0], domains, strict=True)):
        im = ax.imshow(share[:, d, :], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(name)
        ax.set_xlabel("expert")
        ax.set_yticks(x, layers if d == 0 else [""] * len(x))
    axes[0][0].set_ylabel("MoE layer (model layer)")
    fig.colorbar(im, ax=axes[0].tolist(), label="share of top-k assignments")
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(x, summary["repeat_rate_top1"], "o-", color="C0", label="top-1 repeat")
    ax.plot(x, summary["repeat_rate_chance"], "o--", color="C0", alpha=0.5, label="top-1 chance")
    k = summary["k"]
    if k > 1:
        ax.plot(x, summary["repeat_rate_topk"], "s-", color="C1", label=f"top-{k} sets overlap")
        ax.plot(
            x,
            summary["repeat_rate_topk_chance"],
            "s--",
            color="C1",
            alpha=0.5,
            label=f"top-{k} chance",
        )
    ax.set_xticks(x, layers)
    ax.set_xlabel("MoE layer (model layer)")
    ax.set_ylabel("share of consecutive tokens")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.savefig(paths[1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(x, summary["mi_token_class"], "o-", label="I(expert; token class)")
    ax.plot(x, summary["mi_domain"], "s-", label="I(expert; domain)")
    ax.plot(x, summary["entropy_expert"], ":", color="gray", label="H(expert), the ceiling")
    ax.set_xticks(x, layers)
    ax.set_xlabel("MoE layer (model layer)")
    ax.set_ylabel("bits (top-1 expert)")
    ax.legend(fontsize=8)
    fig.savefig(paths[2], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


def _f(value: float, digits: int = 3) -> str:
    return (
        "nan"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}"
    )


def markdown(summary: dict, title: str) -> str:
    """A short human-readable account of the numbers in `summary`."""
    s, k = summary, summary["k"]
    per_domain = ", ".join(
        f"{d} {n:,}" for d, n in zip(s["domains"], s["tokens_per_domain"], strict=True)
    )
    lines = [
        f"# {title}",
        "",
        f"{s['tokens']:,} tokens ({per_domain}), "
        f"{s['num_moe_layers']} MoE layers of {s['num_experts']} experts, top-{k}; "
        f"analysed in {s.get('seconds', float('nan')):.1f} s wall "
        f"({s.get('cpu_seconds', float('nan')):.1f} s of CPU time).",
        "",
        "Repeat: share of consecutive tokens of one document whose top-1 expert is the same "
        f"(and whose top-{k} sets overlap), beside the rate for independent tokens of the same "
        "domain with the observed loads (uniform load: "
        f"{_f(s['repeat_rate_chance_uniform'])} and {_f(s['repeat_rate_topk_chance_uniform'])}). "
        "I(·;·): mutual information in bits with the top-1 expert; H(expert) bounds it. JS: "
        "Jensen-Shannon divergence between the domains' expert distributions (bits).",
        "",
        f"| MoE layer | model layer | repeat top-1 | chance | repeat top-{k} | chance | "
        "I(E; class) | I(E; domain) | I(E; class \\| domain) | I(E; domain \\| class) "
        "| I(E; token) | H(expert) | JS domains |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, layer in enumerate(s["moe_layer_index"]):
        lines.append(
            f"| {i} | {layer} | {_f(s['repeat_rate_top1'][i])} | {_f(s['repeat_rate_chance'][i])} "
            f"| {_f(s['repeat_rate_topk'][i])} | {_f(s['repeat_rate_topk_chance'][i])} "
            f"| {_f(s['mi_token_class'][i])} | {_f(s['mi_domain'][i])} "
            f"| {_f(s['mi_token_class_given_domain'][i])} "
            f"| {_f(s['mi_domain_given_token_class'][i])} "
            f"| {_f(s['mi_token_id'][i])} | {_f(s['entropy_expert'][i])} "
            f"| {_f(s['js_domains'][i])} |"
        )
    lines += [
        "",
        f"H(token class) = {_f(s['entropy_token_class'])} bits, H(domain) = "
        f"{_f(s['entropy_domain'])} bits. I(E; token) is biased upwards by about "
        f"{_f(max(s['mi_token_id_bias']))} bits at most (Miller-Madow) at this many tokens.",
        "",
        "## Token classes per domain (share of tokens)",
        "",
        "| domain | " + " | ".join(s["token_classes"]) + " |",
        "|---|" + "---|" * len(s["token_classes"]),
    ]
    for d, row in zip(s["domains"], s["class_share_per_domain"], strict=True):
        lines.append(f"| {d} | " + " | ".join(_f(v, 2) for v in row) + " |")
    lines += ["", "## Experts: main token class and top tokens (top-1 counts)", ""]
    for i, layer in enumerate(s["moe_layer_index"]):
        lines += [
            f"### MoE layer {i} (model layer {layer})",
            "",
            "| expert | share | main class (share of its tokens) "
            "| top tokens: count, share of the token's uses |",
            "|---|---|---|---|",
        ]
        for e in range(s["num_experts"]):
            cls = np.asarray(s["class_share_per_expert"][i][e])
            main = int(np.argmax(cls)) if cls.sum() else 0
            tops = ", ".join(
                f"`{t['token']!r}` {t['count']} ({t['share_of_token']:.0%})"
                for t in s["top_tokens"][i][e][:6]
            )
            lines.append(
                f"| {e} | {_f(s['expert_share_top1'][i][e], 3)} | "
                f"{s['token_classes'][main]} ({cls[main]:.0%}) | {tops} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"
