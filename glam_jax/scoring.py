"""Log-probabilities of token sequences under a trained model: batched, sharded, one jit per shape.

The scoring forward is the decoding model's (`decode.decode_config`: no dropout, and MoE layers
that never drop a token), so a row's scores do not depend on the other rows of its batch.
Rows are right-padded with segment id 0 (real tokens never attend to padding), batched to a
multiple of the mesh's batch split and padded in length to a power of two (fewer compiles).
Everything the lm-evaluation-harness adapter asks for (glam_jax/lm_eval_model.py) is built on
`Scorer.score`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from glam_jax import decode, sharding
from glam_jax.errors import GlamError

MIN_BUCKET = 16  # shortest padded length: short requests share one compiled shape


@dataclasses.dataclass(frozen=True)
class Score:
    """Scores of the last `num_scored` tokens of one sequence."""

    logprob: float  # sum of log p(token | every earlier token), natural log
    greedy: bool  # every scored token was the model's argmax


def bucket_length(length: int, max_len: int) -> int:
    """The padded length of a batch whose longest row is `length` (a power of two, capped)."""
    return min(max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length()), max_len)


class Scorer:
    """Scores token sequences with one model on one mesh."""

    def __init__(self, config: ml_collections.ConfigDict, params, mesh: Mesh, batch_size: int = 16):
        if batch_size < 1:
            raise GlamError(f"batch_size={batch_size} must be >= 1.")
        self.generator = decode.Generator(config, mesh)  # decode settings, shardings, mesh
        self.params = params
        self.max_len = int(config.model.max_len)
        rows = self.generator.rows_multiple()
        self.batch_size = -(-batch_size // rows) * rows  # rounded up to the mesh's batch split
        self._fn = None

    def _compiled(self):
        """The jitted per-token scorer (parameters and batch in their shardings)."""
        if self._fn is None:
            model = self.generator.model
            batch_sh = sharding.batch_sharding(self.generator.mesh)

            def token_scores(params, tokens_bt, targets_bt, segment_ids_bt):
                logits_btv, _ = model.apply({"params": params}, tokens_bt, segment_ids_bt)
                logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
                logp_bt = jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
                greedy_bt = jnp.argmax(logits_btv, axis=-1) == targets_bt
                return logp_bt, greedy_bt

            self._fn = jax.jit(
                token_scores,
                in_shardings=(self.generator.param_shardings(), batch_sh, batch_sh, batch_sh),
                out_shardings=(batch_sh, batch_sh),
            )
        return self._fn

    def token_logprobs(self, rows: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each row of tokens t_0..t_n: (log p(t_i | t_<i), t_i was the argmax) for i >= 1,
        as float32 and bool arrays of length n. Rows may hold at most max_len + 1 tokens."""
        for row in rows:
            if not 2 <= len(row) <= self.max_len + 1:
                raise GlamError(
                    f"a scored sequence has {len(row)} tokens; it needs 2 to "
                    f"model.max_len + 1 = {self.max_len + 1}."
                )
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths batch
        out: list = [None] * len(rows)
        fn = self._compiled()
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            length = bucket_length(max(len(rows[i]) - 1 for i in chunk), self.max_len)
            tokens = np.zeros((self.batch_size, length), np.int32)
            targets = np.zeros_like(tokens)
            segment_ids = np.zeros_like(tokens)
            # Filler rows repeat the chunk's first row: no row is all padding (whose attention
            # would see no key at all).
            for r, i in enumerate(chunk + [chunk[0]] * (self.batch_size - len(chunk))):
                row = np.asarray(rows[i], np.int32)
                tokens[r, : len(row) - 1] = row[:-1]
                targets[r, : len(row) - 1] = row[1:]
                segment_ids[r, : len(row) - 1] = 1
            with sharding.use_mesh(self.generator.mesh):
                logp, greedy = fn(self.params, tokens, targets, segment_ids)
            logp, greedy = np.asarray(logp), np.asarray(greedy)
            for r, i in enumerate(chunk):
                n = len(rows[i]) - 1
                out[i] = (logp[r, :n], greedy[r, :n])
        return out

    def score(self, rows: Sequence[Sequence[int]], num_scored: Sequence[int]) -> list[Score]:
        """Summed log-probability and greediness of the last num_scored[i] tokens of rows[i]."""
        scores = []
        for (logp, greedy), k in zip(self.token_logprobs(rows), num_scored, strict=True):
            tail = slice(len(logp) - k, None)
            scores.append(
                Score(float(np.sum(logp[tail], dtype=np.float64)), bool(greedy[tail].all()))
            )
        return scores
