"""Every MoE layer's routing (top-k expert ids and combine weights per token) from the model's
own jitted forward pass.

The MoE layer `sow`s its routing into the 'intermediates' collection; here the forward pass is
applied with that collection mutable, which adds outputs but changes no computation, so the
logits are bitwise those of the plain forward (a test checks it). Works for scanned and
unrolled layer stacks and on any mesh.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from glam_jax import sharding, steps
from glam_jax.analysis.errors import AnalysisError
from glam_jax.layers import dtype_of
from glam_jax.model import cast_for_compute

ROUTING = "routing"  # the name MoE.sow uses


def check_analysable(config: ml_collections.ConfigDict) -> None:
    """Refuses models whose routing has no per-token top-k choice to analyse."""
    moe = config.moe
    if moe.num_experts <= 0:
        raise AnalysisError(
            f"this model has no MoE layers (moe.num_experts={moe.num_experts}); the routing "
            "analysis needs a model with experts."
        )
    if moe.router == "expert_choice":
        raise AnalysisError(
            "moe.router='expert_choice' lets experts pick tokens, so tokens have no top-k "
            "experts to analyse; use a token-choice router (gshard_top2, switch_top1, ...)."
        )


def _block_index(path: tuple[str, ...]) -> int:
    """Order of a sown leaf in the layer stack: 'blocks' (scanned) or 'blocks_<i>'."""
    match = re.fullmatch(r"blocks(?:_(\d+))?", path[0])
    if match is None:
        raise AnalysisError(f"unexpected routing location {'/'.join(path)} in the model.")
    return int(match.group(1) or 0)


def routing_from_intermediates(
    intermediates: dict, batch: int, length: int
) -> tuple[jax.Array, jax.Array]:
    """(ids, gates) [L, B, S, k] in layer order from the sown 'intermediates' tree."""
    flat = traverse_util.flatten_dict(intermediates)
    found = sorted((p for p in flat if p[-1] == ROUTING), key=_block_index)
    if not found:
        raise AnalysisError("the model sowed no routing; does it have token-choice MoE layers?")
    ids, gates = [], []
    for path in found:
        ((expert_index, combine_weights),) = flat[path]  # sow appends to a tuple
        k = expert_index.shape[-1]
        ids.append(expert_index.reshape(-1, batch, length, k))  # scanned: [blocks, ...]
        gates.append(combine_weights.reshape(-1, batch, length, k))
    return jnp.concatenate(ids).astype(jnp.int32), jnp.concatenate(gates)


class RoutingCollector:
    """jit(params, tokens, segment_ids, positions) -> (logits or None, ids, gates) on a mesh.

    ids and gates are [L, B, S, k] numpy-ready arrays, replicated (every process can read them).
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, *, return_logits: bool):
        check_analysable(config)
        self.config, self.mesh = config, mesh
        self.model = steps.build_model(config)
        dtype = dtype_of(config.model.dtype)
        model = self.model

        def forward(params, tokens_bs, segment_ids_bs, positions_bs):
            (logits_bsv, _), variables = model.apply(
                {"params": cast_for_compute(params, dtype)},
                tokens_bs,
                segment_ids_bs,
                positions_bs,
                mutable=["intermediates"],
            )
            b, s = tokens_bs.shape
            ids, gates = routing_from_intermediates(variables["intermediates"], b, s)
            return (logits_bsv if return_logits else None), ids, gates

        self._batch_sharding = batch = sharding.batch_sharding(mesh)
        rep = sharding.replicated(mesh)
        self._forward = jax.jit(
            forward,
            in_shardings=(None, batch, batch, batch),
            out_shardings=(batch if return_logits else None, rep, rep),
        )

    def __call__(self, params: Any, tokens_bs, segment_ids_bs, positions_bs):
        """One batch through the jitted forward; returns the routing the MoE layers sowed."""
        inputs = (
            jax.device_put(np.asarray(a, np.int32), self._batch_sharding)
            for a in (tokens_bs, segment_ids_bs, positions_bs)
        )
        with sharding.use_mesh(self.mesh):
            logits, ids, gates = self._forward(params, *inputs)
        return logits, np.asarray(ids), np.asarray(gates)
