"""Parameter and FLOP counts computed from abstract shapes (`jax.eval_shape`, no allocation).

Conventions (stated wherever a figure is printed):
- total = every parameter; activated per token = everything except expert FFN weights, plus
  k/E of them (a token visits k of E experts).
- matmul FLOPs per token, forward = 2 x activated matmul weights (the tied output projection
  counted once more, the embedding lookup not) + causal attention 2 x 2 x S/2 x heads x d per
  layer. Training = 3 x forward. Capacity padding and dropped tokens are not counted.
- "two-matrix" counts leave out each FFN's gate matrix `wi_1`: the convention under which the
  GLaM paper's totals come out (docs/moe_reference.md section 3).
- expert weights are the parameters with an `expert` logical axis (not found by their path, so
  a shared expert, a dense FFN inside an MoE layer, is counted as activated for every token).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec

from glam_jax import steps


@dataclasses.dataclass(frozen=True)
class Counts:
    """Parameter and FLOP counts of one config (conventions in the module docstring)."""

    total_params: int
    activated_params: int
    expert_params: int
    embedding_params: int
    total_params_two_matrix: int  # FFN gate matrices (wi_1) left out
    activated_params_two_matrix: int
    flops_per_token_forward: float
    flops_per_token: float  # training: forward + backward = 3 x forward
    seq_len: int


def _path_names(path) -> list[str]:
    """The keys of a pytree path as strings."""
    return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def count(config: ml_collections.ConfigDict, seq_len: int | None = None) -> Counts:
    """Counts for `config`; seq_len (default train.seq_len) sets the attention FLOPs."""
    seq_len = seq_len or config.train.seq_len
    model = steps.build_model(config)
    boxed = steps.abstract_boxed_params(model, config)
    abstract = jax.tree.map(
        lambda x: x.value if hasattr(x, "value") else x,
        boxed,
        is_leaf=lambda x: hasattr(x, "value"),
    )
    axes = jax.tree.leaves(
        nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    moe, mc = config.moe, config.model
    k_over_e = moe.num_selected / moe.num_experts if moe.num_experts else 0.0
    total = expert = embedding = gates = expert_gates = 0
    matmul_activated = 0.0
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    for (path, leaf), logical in zip(flat, axes, strict=True):
        names = _path_names(path)
        n = int(np.prod(leaf.shape))
        total += n
        is_expert = "expert" in tuple(logical)
        if names[-1] == "wi_1":
            gates += n
            expert_gates += n if is_expert else 0
        if is_expert:
            expert += n
        if names[-1] == "embedding":
            embedding += n
        # A matrix by its own axes: the scan's stacked `layers` axis makes a norm scale 2-D.
        own_dims = len([a for a in tuple(logical) if a != "layers"])
        # q/k/v biases [heads, kv] and OLMoE's q/k norm scales [heads, kv] are no matmuls.
        vector = names[-1] == "scale" or names[-1].endswith("_bias")
        if own_dims >= 2 and not vector and names[-1] not in ("embedding", "rel_bias"):
            matmul_activated += n * (k_over_e if is_expert else 1.0)
    if mc.tie_embeddings:
        matmul_activated += embedding  # the output softmax reuses the embedding
    activated = total - expert + round(expert * k_over_e)
    attn = 2 * 2 * (seq_len / 2) * mc.num_heads * mc.head_dim * mc.num_layers
    forward = 2 * matmul_activated + attn
    return Counts(
        total_params=total,
        activated_params=activated,
        expert_params=expert,
        embedding_params=embedding,
        total_params_two_matrix=total - gates,
        activated_params_two_matrix=activated
        - (gates - expert_gates)
        - round(expert_gates * k_over_e),
        flops_per_token_forward=forward,
        flops_per_token=3 * forward,
        seq_len=seq_len,
    )


# Dense bf16 peak FLOP/s per chip by device-kind substring (vendor figures, no sparsity).
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops(device_kind: str, override_tflops: float = 0.0) -> float | None:
    """Per-chip bf16 peak for MFU, or None where unknown (e.g. CPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    for name, peak in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None
