"""Text generation: prefill, then one token at a time through the layer-stacked KV cache.

Prompts of different lengths are left-padded to one length P. Slot s of row r holds prompt
token s - pad_r with position s - pad_r (RoPE) and segment id 1 (0 marks padding), so every
real token attends to exactly the keys of its own unpadded sequence; the relative-position
bias only depends on slot differences, which equal position differences. One cache index
serves the whole batch, and the next-token logits of every row sit at the last slot.

MoE layers never drop a token while decoding (`decode_config`): the decode dispatch is
`moe.decode_dispatch` ('dropless', or 'einsum'/'sort' with capacity = all tokens of a group),
so a token's output does not depend on the rest of the batch and the cached steps equal a
full forward pass. Expert-choice routing is not causal and is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from glam_jax import sharding
from glam_jax.errors import GlamError
from glam_jax.model import Transformer
from glam_jax.moe import dispatch, routers

# Routing groups as large as the tokens each batch shard holds (capacity paths: capacity = T).
DECODE_GROUP_SIZE = 1 << 30


class DecodeError(GlamError):
    """A generation request that cannot run, reported in one sentence."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is picked: temperature 0 is greedy; top_k 0 and top_p 1 are off.

    vocab_limit > 0 never picks ids >= vocab_limit (a model vocabulary padded past its
    tokenizer's pieces).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    vocab_limit: int = 0

    def check(self) -> Sampling:
        """self, or one sentence naming the first out-of-range setting."""
        if self.temperature < 0:
            raise DecodeError(f"temperature={self.temperature} must be >= 0 (0 = greedy).")
        if self.top_k < 0:
            raise DecodeError(f"top_k={self.top_k} must be >= 0 (0 = off).")
        if not 0.0 < self.top_p <= 1.0:
            raise DecodeError(f"top_p={self.top_p} must be in (0, 1] (1 = off).")
        if self.vocab_limit < 0:
            raise DecodeError(f"vocab_limit={self.vocab_limit} must be >= 0 (0 = off).")
        return self


def decode_config(config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
    """The run config with decoding settings: no dropout, no remat, MoE that never drops."""
    if isinstance(config, ml_collections.FrozenConfigDict):
        c = config.as_configdict()
    else:
        c = copy.deepcopy(config)
    moe = c.moe
    if moe.num_experts and not routers.get_router(moe.router).causal:
        raise DecodeError(
            f"moe.router={moe.router!r} picks tokens using later tokens of the group, so it "
            "cannot decode one token at a time; use a token-choice router."
        )
    if moe.decode_dispatch not in dispatch.DISPATCHES:
        raise DecodeError(
            f"moe.decode_dispatch={moe.decode_dispatch!r} is not valid; "
            f"valid: {dispatch.DISPATCHES}."
        )
    moe.dispatch = moe.decode_dispatch
    moe.group_size = DECODE_GROUP_SIZE
    moe.capacity_factor_eval = float(max(moe.num_experts, 1))  # capacity = group tokens
    moe.capacity_convention = "gshard"
    moe.min_capacity = 1
    c.model.dropout_rate = 0.0
    c.model.remat_policy = "none"
    return ml_collections.FrozenConfigDict(c)


def sample_logits(logits_bv: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """Next token ids [batch] from logits [batch, vocab] (float32 maths).

    Temperature 0 is argmax. Otherwise logits / temperature, then top-k keeps the k largest,
    top-p keeps the smallest set of most likely tokens whose probability reaches p (the most
    likely token always stays), and a categorical draw picks among the rest.
    """
    logits_bv = logits_bv.astype(jnp.float32)
    if 0 < sampling.vocab_limit < logits_bv.shape[-1]:
        ids_v = jnp.arange(logits_bv.shape[-1])
        logits_bv = jnp.where(ids_v < sampling.vocab_limit, logits_bv, -jnp.inf)
    if sampling.temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv / sampling.temperature
    if sampling.top_k > 0:
        kth_b1 = jax.lax.top_k(logits_bv, min(sampling.top_k, logits_bv.shape[-1]))[0][..., -1:]
        logits_bv = jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)
    if sampling.top_p < 1.0:
        sorted_bv = jnp.sort(logits_bv, axis=-1)[..., ::-1]
        probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
        mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
        kept_bv = mass_before_bv < sampling.top_p  # the first token always has mass_before 0
        cutoff_b1 = jnp.min(jnp.where(kept_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
        logits_bv = jnp.where(logits_bv < cutoff_b1, -jnp.inf, logits_bv)
    return jax.random.categorical(rng, logits_bv, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class PaddedPrompts:
    """Left-padded prompt batch; rows past `num_prompts` only fill the batch for the mesh."""

    tokens: np.ndarray  # [batch, P] int32, pad_id on the left
    segment_ids: np.ndarray  # [batch, P] int32, 1 for prompt tokens, 0 for padding
    positions: np.ndarray  # [batch, P] int32, 0.. over the prompt, 0 on padding
    lengths: np.ndarray  # [batch] int32 prompt lengths
    num_prompts: int


def pad_prompts(
    prompts: Sequence[Sequence[int]],
    row_multiple: int = 1,
    pad_id: int = 0,
    *,
    length: int | None = None,
    rows: int | None = None,
) -> PaddedPrompts:
    """Left-pads token lists to `length` (default: the longest prompt); adds copies of prompt 0
    as filler rows up to `rows` (default: as many as prompts), rounded up to a multiple of
    `row_multiple` (the mesh's batch split). Fixed `length` and `rows` let many batches share
    one compiled shape; padding never changes a prompt's tokens (see the module docstring)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise DecodeError("every prompt needs at least one token (a BOS token will do).")
    longest = max(len(p) for p in prompts)
    if length is not None and length < longest:
        raise DecodeError(f"prompt length {length} is shorter than the longest prompt {longest}.")
    count = max(rows or 0, len(prompts))
    filled = list(prompts) + [prompts[0]] * (count - len(prompts) + (-count % row_multiple))
    length = length or longest
    b = len(filled)
    tokens = np.full((b, length), pad_id, np.int32)
    segment_ids = np.zeros((b, length), np.int32)
    positions = np.zeros((b, length), np.int32)
    lengths = np.array([len(p) for p in filled], np.int32)
    for r, p in enumerate(filled):
        pad = length - len(p)
        tokens[r, pad:] = np.asarray(p, np.int32)
        segment_ids[r, pad:] = 1
        positions[r, pad:] = np.arange(len(p))
    return PaddedPrompts(tokens, segment_ids, positions, lengths, len(prompts))


@dataclasses.dataclass
class Generation:
    """New tokens per prompt (cut before the first EOS) and where the time went."""

    tokens: list[list[int]]
    prefill_s: float  # prefill of the prompt batch, first-token logits included
    decode_s: float  # every decode step after the prefill (sampling included)
    steps: int  # tokens produced per row (the fused loop stops early when every row hit EOS)
    batch: int  # prompts in the batch (filler rows not counted)
    prompt_len: int  # padded prompt length P
    logits: np.ndarray | None = None  # [prompts, steps, vocab] float32 when asked for

    @property
    def new_tokens(self) -> int:
        """Tokens produced over all rows."""
        return self.batch * self.steps

    @property
    def tokens_per_s(self) -> float:
        """Output tokens per second over prefill + decode (all rows)."""
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)

    @property
    def time_per_output_token_s(self) -> float:
        """Decode time per step after the first token (one token for every row each step)."""
        return self.decode_s / max(self.steps - 1, 1)


class Generator:
    """Jitted prefill and fused sampling loop of one model on one mesh."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: Mesh | None = None,
        model_state: dict | None = None,
    ):
        """model_state: the trained model's non-parameter variables (TrainState.model_state,
        the expert bias of auxiliary-loss-free balancing), read by every call; {} without."""
        self.config = decode_config(config)
        self.model = Transformer(self.config)
        self.mesh = mesh or sharding.make_mesh((1, 1, 1), jax.devices()[:1])
        self.model_state = model_state or {}
        self._jitted: dict = {}

    # ---- shapes and shardings -----------------------------------------------------------
    def _abstract(self, batch: int, length: int):
        """Boxed abstract params and cache of the decode model for a [batch, length] cache."""
        ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)  # no array: nothing compiles
        return jax.eval_shape(
            lambda rng, ids: self.model.init({"params": rng}, ids, ids, ids, decode=True),
            jax.eval_shape(lambda: jax.random.PRNGKey(0)),  # the key's shape, whatever the impl
            ids,
        )

    def param_shardings(self):
        """NamedShardings of the parameters (the same as in training)."""
        specs = sharding.logical_specs(self._abstract(1, 1)["params"])
        return sharding.named_shardings(self.mesh, specs)

    def _cache_shardings(self, batch: int, length: int):
        abstract = self._abstract(batch, length)["cache"]
        specs = sharding.logical_specs(abstract)
        return nn.unbox(abstract), sharding.named_shardings(self.mesh, specs)

    def rows_multiple(self) -> int:
        """Batch rows must be a multiple of this (the mesh's data x expert split)."""
        return sharding.data_parallel_size(self.mesh)

    def init_cache(self, batch: int, length: int):
        """An empty cache of `length` slots for `batch` rows, placed in its shardings."""
        if length > self.config.model.max_len:
            raise DecodeError(
                f"prompt plus new tokens need {length} positions but model.max_len="
                f"{self.config.model.max_len}; ask for fewer new tokens or a shorter prompt."
            )
        if batch % self.rows_multiple():
            raise DecodeError(
                f"batch of {batch} rows is not a multiple of the mesh's batch split "
                f"{self.rows_multiple()}; pad it with pad_prompts(row_multiple=...)."
            )
        key = ("init_cache", batch, length)
        if key not in self._jitted:  # a new jit (and compile) per call otherwise
            shapes, shardings = self._cache_shardings(batch, length)
            self._jitted[key] = jax.jit(
                lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes),
                out_shardings=shardings,
            )
        return self._jitted[key]()

    # ---- jitted pieces ------------------------------------------------------------------
    def _apply(self, params, cache, tokens_bt, segment_ids_bt, positions_bt):
        """Runs tokens through the model at the cache index: (last logits [b, V], cache)."""
        (logits_b1v, _), variables = self.model.apply(
            {"params": params, "cache": cache, **self.model_state},
            tokens_bt,
            segment_ids_bt,
            positions_bt,
            decode=True,
            last_logits_only=True,
            mutable=["cache"],
        )
        return logits_b1v[:, 0].astype(jnp.float32), variables["cache"]

    def prefill(self, params, cache, prompts: PaddedPrompts):
        """(next-token logits [batch, vocab] float32, cache) after the whole prompt batch."""
        fn = self._compiled("prefill", cache)
        with sharding.use_mesh(self.mesh):
            return fn(params, cache, prompts.tokens, prompts.segment_ids, prompts.positions)

    def _compiled(self, name: str, cache, *loop_options):
        """jit with parameter, cache and batch shardings, cache donated; one per shape set."""
        key = (name, jax.tree.structure(cache), loop_options)
        if key in self._jitted:
            return self._jitted[key]
        cache_sh = jax.tree.map(lambda a: a.sharding, cache)
        param_sh = self.param_shardings()
        batch_sh = sharding.batch_sharding(self.mesh)
        row_sh = NamedSharding(self.mesh, sharding.logical_to_spec(("batch",)))
        logits_sh = NamedSharding(self.mesh, sharding.logical_to_spec(("batch", "vocab")))
        if name == "prefill":
            fn = jax.jit(
                self._apply,
                in_shardings=(param_sh, cache_sh, batch_sh, batch_sh, batch_sh),
                out_shardings=(logits_sh, cache_sh),
                donate_argnums=1,
            )
        else:  # the fused sampling loop
            sampling, steps, keep_logits = loop_options
            step_logits_sh = NamedSharding(
                self.mesh, sharding.logical_to_spec(("batch", "length", "vocab"))
            )
            fn = jax.jit(
                lambda *a: self._loop(*a, sampling=sampling, steps=steps, keep_logits=keep_logits),
                in_shardings=(param_sh, cache_sh, logits_sh, row_sh, row_sh, None, None),
                out_shardings=(batch_sh, None, step_logits_sh if keep_logits else None, cache_sh),
                donate_argnums=1,
            )
        self._jitted[key] = fn
        return fn

    def _loop(
        self,
        params,
        cache,
        logits_bv,
        positions_b,
        active_b,
        rng,
        eos_id,
        *,
        sampling: Sampling,
        steps: int,
        keep_logits: bool,
    ):
        """Samples `steps` tokens per row in one while loop; stops early once every active row
        has produced EOS (eos_id < 0: never). Returns (tokens [b, steps], steps run, the logits
        each token was drawn from [b, steps, V] or None, cache)."""
        b, v = logits_bv.shape
        pad = jnp.maximum(eos_id, 0)
        tok_b = sample_logits(logits_bv, jax.random.fold_in(rng, 0), sampling)
        out_bn = jnp.full((b, steps), pad, jnp.int32).at[:, 0].set(tok_b)
        seen_bnv = jnp.zeros((b, steps if keep_logits else 0, v), jnp.float32)
        if keep_logits:
            seen_bnv = seen_bnv.at[:, 0].set(logits_bv)
        done_b = ~active_b | (tok_b == eos_id)

        def cond(carry):
            i, _, _, _, done_b, _, _ = carry
            return (i < steps) & ~jnp.all(done_b)

        def body(carry):
            i, cache, tok_b, pos_b, done_b, out_bn, seen_bnv = carry
            ones_b1 = jnp.ones((b, 1), jnp.int32)
            logits_bv, cache = self._apply(params, cache, tok_b[:, None], ones_b1, pos_b[:, None])
            new_b = sample_logits(logits_bv, jax.random.fold_in(rng, i), sampling)
            new_b = jnp.where(done_b, pad, new_b)
            out_bn = jax.lax.dynamic_update_slice(out_bn, new_b[:, None], (0, i))
            if keep_logits:
                seen_bnv = jax.lax.dynamic_update_slice(seen_bnv, logits_bv[:, None], (0, i, 0))
            done_b = done_b | (new_b == eos_id)
            return i + 1, cache, new_b, pos_b + 1, done_b, out_bn, seen_bnv

        carry = (jnp.int32(1), cache, tok_b, positions_b, done_b, out_bn, seen_bnv)
        n, cache, _, _, _, out_bn, seen_bnv = jax.lax.while_loop(cond, body, carry)
        return out_bn, n, seen_bnv if keep_logits else None, cache

    # ---- the whole thing ----------------------------------------------------------------
    def generate(
        self,
        params,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        *,
        seed: int = 0,
        eos_id: int | None = None,
        pad_id: int = 0,
        return_logits: bool = False,
        prompt_length: int | None = None,
        batch_rows: int | None = None,
    ) -> Generation:
        """Generates up to `max_new_tokens` per prompt (stopping a row at `eos_id`);
        return_logits also returns the float32 logits each new token was drawn from.
        prompt_length and batch_rows fix the padded batch shape (`pad_prompts`), so batches of
        other lengths and sizes reuse one compiled prefill and loop; greedy tokens do not
        change (sampled ones depend on the batch's shape, as they do on its rows)."""
        sampling.check()
        if max_new_tokens < 1:
            raise DecodeError(f"max_new_tokens={max_new_tokens} must be >= 1.")
        padded = pad_prompts(
            prompts, self.rows_multiple(), pad_id, length=prompt_length, rows=batch_rows
        )
        b, p = padded.tokens.shape
        cache = self.init_cache(b, p + max_new_tokens)
        eos = -1 if eos_id is None else int(eos_id)
        loop = self._compiled("loop", cache, sampling, max_new_tokens, return_logits)
        active = np.arange(b) < padded.num_prompts

        start = time.perf_counter()
        logits_bv, cache = self.prefill(params, cache, padded)
        logits_bv = jax.block_until_ready(logits_bv)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        with sharding.use_mesh(self.mesh):
            out_bn, n, seen_bnv, cache = loop(
                params,
                cache,
                logits_bv,
                padded.lengths,
                active,
                jax.random.PRNGKey(seed),
                np.int32(eos),
            )
        out_bn = np.asarray(jax.device_get(out_bn))
        decode_s = time.perf_counter() - start
        n = int(n)
        seen = None if seen_bnv is None else np.asarray(seen_bnv)[: padded.num_prompts, :n]
        tokens = []
        for row in out_bn[: padded.num_prompts, :n].tolist():
            tokens.append(row[: row.index(eos)] if eos in row else row)
        return Generation(tokens, prefill_s, decode_s, n, padded.num_prompts, p, seen)
