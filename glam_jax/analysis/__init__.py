"""What do experts learn? Routing analysis of any glam_jax MoE model (or imported HF Mixtral).

collect.py   the model's own jitted forward with every MoE layer's top-k ids and gates sown
texts.py     `domain=GLOB` text -> packed, labelled batches (bounded, streamed)
token_classes.py  punctuation, digits, whitespace, function words, ... (user-extensible)
stats.py     streaming counts -> repeat rates, mutual information, JS divergence (numpy)
analyze.py   the loop tying them together; report.py: summary.json, figures, summary.md
corpus.py    the multi-domain mix every machine has (embedded Shakespeare, stdlib code)

CLI: experiments/analyze_experts.py; study: docs/research/what_experts_learn.md.
"""

from glam_jax.analysis.analyze import analyze, moe_layer_indices
from glam_jax.analysis.collect import RoutingCollector
from glam_jax.analysis.errors import AnalysisError
from glam_jax.analysis.report import write_report
from glam_jax.analysis.texts import Domain, parse_text_files
from glam_jax.analysis.token_classes import TokenClass, regex_class, select_classes

__all__ = [
    "AnalysisError",
    "Domain",
    "RoutingCollector",
    "TokenClass",
    "analyze",
    "moe_layer_indices",
    "parse_text_files",
    "regex_class",
    "select_classes",
    "write_report",
]
