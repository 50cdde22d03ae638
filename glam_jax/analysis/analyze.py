"""The analysis loop: labelled text -> routing of every MoE layer -> streaming statistics.

Memory stays bounded whatever the amount of text: batches are read, routed, counted and
dropped one at a time (see stats.RoutingStats for what is kept).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import ml_collections
from jax.sharding import Mesh

from glam_jax import sharding
from glam_jax.analysis import texts as texts_lib
from glam_jax.analysis import token_classes as classes_lib
from glam_jax.analysis.collect import RoutingCollector
from glam_jax.analysis.errors import AnalysisError
from glam_jax.analysis.stats import RoutingStats


def moe_layer_indices(config: ml_collections.ConfigDict) -> list[int]:
    """The transformer-layer index of each MoE layer, in order."""
    moe = config.moe
    blocks = config.model.num_layers // moe.every
    return [b * moe.every + moe.moe_index_in_block for b in range(blocks)]


def analyze(
    config: ml_collections.ConfigDict,
    params: Any,
    mesh: Mesh,
    tokenizer,
    domains: Sequence[texts_lib.Domain],
    *,
    classes: Sequence[classes_lib.TokenClass] | None = None,
    rows: int = 16,
    length: int = 0,
    max_tokens_per_domain: int = 50_000,
    top_tokens: int = 10,
    progress: bool = True,
) -> tuple[dict, RoutingStats]:
    """(summary dict, the RoutingStats it came from) for `domains` routed by `params`."""
    length = length or config.train.seq_len
    if length > config.model.max_len:
        raise AnalysisError(
            f"rows of {length} tokens exceed model.max_len={config.model.max_len}; "
            "pass a shorter sequence length."
        )
    shards = sharding.data_parallel_size(mesh)
    if rows % shards:
        raise AnalysisError(
            f"{rows} rows per batch do not split over the mesh's {shards} batch shards; "
            f"use a multiple of {shards}."
        )
    if tokenizer.vocab_size() > config.model.vocab_size:
        raise AnalysisError(
            f"the tokenizer has {tokenizer.vocab_size()} pieces but the model only "
            f"{config.model.vocab_size}; pass the tokenizer the model was trained with."
        )
    collector = RoutingCollector(config, mesh, return_logits=False)
    classes = classes_lib.select_classes() if classes is None else classes
    classifier = classes_lib.TokenClassifier(classes)
    layers = moe_layer_indices(config)
    stats = RoutingStats(
        num_layers=len(layers),
        num_experts=config.moe.num_experts,
        k=config.moe.num_selected,
        domains=[d.name for d in domains],
        class_names=classifier.names,
        vocab_size=config.model.vocab_size,
    )
    bar = None
    if progress:
        from tqdm import tqdm

        total = texts_lib.estimate_tokens(domains, max_tokens_per_domain)
        bar = tqdm(total=total, unit="tok", unit_scale=True, dynamic_ncols=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    batches = texts_lib.text_batches(
        domains, tokenizer, classifier, rows=rows, length=length, max_tokens=max_tokens_per_domain
    )
    try:
        for batch in batches:
            _, ids, gates = collector(params, batch.tokens, batch.segment_ids, batch.positions)
            stats.update(
                ids, gates, batch.tokens, batch.token_class, batch.scored, batch.pairs, batch.domain
            )
            if bar is not None:
                bar.update(int(batch.scored.sum()))
    finally:
        if bar is not None:
            bar.close()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    summary = stats.summary()
    summary["moe_layer_index"] = layers
    summary["seconds"] = seconds  # wall time of the loop (reading, routing, counting)
    summary["cpu_seconds"] = cpu_seconds  # CPU time of this process over the loop, all threads
    summary["top_tokens"] = [
        [
            [
                {
                    "token": tokenizer.id_to_piece(t) if t < tokenizer.vocab_size() else str(t),
                    "count": n,
                    "share_of_token": share,
                }
                for t, n, share in stats.top_tokens(layer, e, top_tokens)
            ]
            for e in range(stats.num_experts)
        ]
        for layer in range(stats.num_layers)
    ]
    return summary, stats
