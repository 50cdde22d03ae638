"""glam_jax models in EleutherAI's lm-evaluation-harness: the `glam_jax` model of `lm_eval`.

    pip install -e ".[eval]"
    glam-lm-eval --model glam_jax --model_args workdir=/tmp/glam_tiny --tasks hellaswag \
        --num_fewshot 5
    glam-lm-eval --model glam_jax --model_args hf_dir=/data/Mixtral-8x7B-v0.1,mesh=1x8x1 ...

lm-eval (0.4.x) finds a model only in its registry, which holds the models of modules that
were imported; it reads no entry points. So `glam-lm-eval` (glam_jax/commands/lm_eval.py) is
lm-eval's own command line with this module imported first (same flags as `lm_eval`), and from
Python, `import glam_jax.lm_eval_model` before `lm_eval.simple_evaluate(model="glam_jax", ...)`.

Model arguments (`--model_args k=v,...`): exactly one of `workdir` (a training workdir; its
config.json says the model) and `hf_dir` (a Hugging Face Mixtral directory); optionally
`config` (a config file or preset name: needed for a workdir without config.json; for an HF
directory only its dtypes, attention kernel and mesh count), `step`, `tokenizer` (a
SentencePiece .model, else the source's), `mesh` (e.g. 1x8x1), `max_length` (<= model.max_len)
and `batch_size` (rows per forward). Anything else is refused in one sentence.

lm-eval splits the model_args string at commas. Its command line (0.4.13) keeps commas inside
quotes or brackets (`--model_args 'hf_dir="/data/a,b",mesh=1x8x1'`) and also takes JSON
(`--model_args '{"hf_dir": "/data/a,b"}'`); `simple_evaluate` splits a string at every comma,
so pass a dict there. A fragment a comma cut off is refused, naming the value it cut.

Tokens: a text is BOS + its SentencePiece pieces, as in training (documents are BOS ... EOS).
`loglikelihood(context, continuation)` follows lm-eval's causal models (TemplateLM): encode
context and context + continuation, score the tokens past the context's, the last max_length + 1
tokens kept. `loglikelihood_rolling` scores a whole text after BOS in disjoint windows of
max_length tokens; `generate_until` is greedy (or sampled) KV-cache decoding (glam_jax/decode.py)
cut at the first stop string, in batches left-padded to power-of-two lengths (few compiles).
"""

from __future__ import annotations

import dataclasses

import jax
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from glam_jax import checkpoint, config_checks, decode, pretrained, scoring, sharding
from glam_jax.errors import GlamError
from glam_jax.presets import names

MODEL_ARGS = ("workdir", "hf_dir", "config", "step", "tokenizer", "mesh", "max_length")
HARNESS_ARGS = ("batch_size", "max_batch_size", "device")  # lm-eval passes these itself
DEFAULT_BATCH = 16
DEFAULT_GEN_TOKENS = 64
COMMA_HINT = (
    "lm-eval splits --model_args at every comma outside quotes, so quote a value that holds "
    "one (--model_args 'hf_dir=\"/data/a,b\"'), pass the arguments as JSON, or from Python "
    "as a dict; config variants also take '+' between parts (glam:size=1_7b+experts=64)"
)


class LMEvalError(GlamError):
    """A model argument or request the adapter cannot serve, in one sentence."""


@dataclasses.dataclass
class Loaded:
    """What the adapter evaluates: config, parameters, mesh and tokenizer of one model."""

    config: object
    params: object
    mesh: object
    tokenizer: object


def _mesh_shape(value, config) -> tuple[int, ...]:
    if value in (None, ""):
        return tuple(config.mesh.shape)
    try:
        shape = tuple(int(s) for s in str(value).replace(",", "x").split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise LMEvalError(f"mesh={value!r} is not three sizes like 1x8x1 (data x expert x model).")
    return shape


def _check_keys(args: dict) -> None:
    """Refuses unknown keys, and names the value a comma cut: lm-eval's string form of
    model_args turns the text after a comma that has no '=' into a key with the value ''."""
    keys = list(args)
    for i, key in enumerate(keys):
        if key not in MODEL_ARGS and args[key] == "" and i > 0:
            before = keys[i - 1]
            raise LMEvalError(
                f"--model_args holds {key!r} without '=value', so a comma cut the value "
                f"{before}={args[before]!r}; {COMMA_HINT}."
            )
    unknown = sorted(set(args) - set(MODEL_ARGS))
    if unknown:
        raise LMEvalError(
            f"unknown glam_jax model argument(s) {', '.join(unknown)}; "
            f"valid: {', '.join(MODEL_ARGS)}, batch_size (if a comma split a value: {COMMA_HINT})."
        )


def load(args: dict) -> Loaded:
    """The model the arguments name (see the module docstring), on this host's devices."""
    _check_keys(args)
    workdir, hf_dir = str(args.get("workdir") or ""), str(args.get("hf_dir") or "")
    if bool(workdir) == bool(hf_dir):
        raise LMEvalError(
            "pass exactly one of workdir=<training workdir> and hf_dir=<HF Mixtral directory> "
            f"in --model_args (got workdir={workdir!r}, hf_dir={hf_dir!r})."
        )
    config = names.load_config(str(args["config"])) if args.get("config") else None
    if workdir and config is None:
        config = checkpoint.load_run_config(workdir)
    config = pretrained.config_for_source(config, hf_dir)
    config_checks.check_model(config)
    shape = _mesh_shape(args.get("mesh"), config)
    mesh = sharding.make_mesh(sharding.mesh_shape(shape, jax.device_count()))
    if hf_dir:
        config, params = pretrained.params_from_hf(hf_dir, mesh, config)
    else:
        params, _ = pretrained.params_from_workdir(config, workdir, mesh, args.get("step"))
    tok_path = str(args.get("tokenizer") or "") or pretrained.tokenizer_path(
        config, workdir=workdir, hf_dir=hf_dir
    )
    tok = pretrained.tokenizer(tok_path)
    if tok.vocab_size() > config.model.vocab_size:
        raise LMEvalError(
            f"tokenizer {tok_path!r} has {tok.vocab_size()} pieces but the model only "
            f"{config.model.vocab_size}; pass the tokenizer the model was trained with."
        )
    return Loaded(config, params, mesh, tok)


def _positive_int(name: str, value, default: int) -> int:
    if value in (None, "", "auto") or str(value).startswith("auto"):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise LMEvalError(f"{name}={value!r} must be a positive integer.")
    return number


@register_model("glam_jax")
class GlamLM(TemplateLM):
    """A glam_jax model (workdir or HF directory) as an lm-evaluation-harness language model."""

    def __init__(self, batch_size=None, max_batch_size=None, device=None, **model_args):
        super().__init__()
        del max_batch_size, device  # one batch size; JAX places the model on its own devices
        rows = _positive_int("batch_size", batch_size, DEFAULT_BATCH)  # before the slow load
        self.loaded = load(model_args)
        config = self.loaded.config
        self.scorer = scoring.Scorer(config, self.loaded.params, self.loaded.mesh, rows)
        self.sp = self.loaded.tokenizer
        limit = int(config.model.max_len)
        self._max_length = _positive_int("max_length", model_args.get("max_length"), limit)
        if self._max_length > limit:
            raise LMEvalError(
                f"max_length={self._max_length} exceeds the model's model.max_len={limit}."
            )

    # ---- tokens -------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        """EOS ends every training document."""
        return self.sp.eos_id()

    @property
    def prefix_token_id(self) -> int:
        """BOS starts every training document (the context of an empty context)."""
        return self.sp.bos_id()

    @property
    def max_length(self) -> int:
        """Tokens one forward pass sees (model.max_len unless max_length= lowers it)."""
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer in lm-eval's cache keys."""
        return f"sentencepiece-{self.sp.vocab_size()}"

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        """BOS + pieces (pieces only with add_special_tokens=False)."""
        pieces = self.sp.encode(string)
        return pieces if add_special_tokens is False else [self.sp.bos_id(), *pieces]

    def tok_decode(self, tokens: list[int]) -> str:
        """Text of token ids."""
        return self.sp.decode(list(tokens))

    # ---- scores -------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(sum log p(continuation | context), continuation is greedy) per (key, ctx, cont)."""
        rows, scored = [], []
        for _, context_enc, continuation_enc in requests:
            if len(continuation_enc) > self.max_length:
                raise LMEvalError(
                    f"a continuation of {len(continuation_enc)} tokens exceeds max_length="
                    f"{self.max_length}."
                )
            rows.append((list(context_enc) + list(continuation_enc))[-(self.max_length + 1) :])
            scored.append(len(continuation_enc))
        results = [(s.logprob, s.greedy) for s in self.scorer.score(rows, scored)]
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts after BOS, in disjoint windows of max_length tokens."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text, add_special_tokens=False)
            for context, target in map(
                make_disjoint_window,
                get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1),
            ):
                windows.append((None, context, target))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, cut before the first stop string (`until`).

        Requests with the same generation settings share batches of `batch_size` prompts,
        longest first; a batch is left-padded to a power-of-two length (`scoring.bucket_length`)
        and filled to `batch_size` rows, so XLA compiles one prefill and one decode loop per
        length bucket and settings, not per prompt length. Padding is masked exactly
        (glam_jax/decode.py), so greedy tokens equal those of each prompt decoded alone."""
        groups: dict = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            settings = self._settings(dict(gen_kwargs))
            groups.setdefault(settings, []).append((i, context))
        generator, rows = self.scorer.generator, self.scorer.batch_size
        out = [""] * len(requests)
        for (until, new, sampling, seed), items in groups.items():
            limit = self.max_length - new  # prompt tokens kept (the last ones)
            encoded = [(i, self.tok_encode(c)[-limit:]) for i, c in items]
            encoded.sort(key=lambda item: -len(item[1]))  # similar lengths share a batch
            for start in range(0, len(encoded), rows):
                chunk = encoded[start : start + rows]
                prompts = [p for _, p in chunk]
                generation = generator.generate(
                    self.loaded.params,
                    prompts,
                    new,
                    sampling,
                    seed=seed,
                    eos_id=self.sp.eos_id(),
                    prompt_length=scoring.bucket_length(len(prompts[0]), limit),
                    batch_rows=rows,
                )
                for (i, _), tokens in zip(chunk, generation.tokens, strict=True):
                    text = self.tok_decode(tokens)
                    for stop in until:
                        text = text.split(stop, 1)[0] if stop else text
                    out[i] = text
        for req, text in zip(requests, out, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def _settings(self, gen_kwargs: dict) -> tuple:
        """(stop strings, new tokens, Sampling, seed) of lm-eval's generation arguments."""
        until = gen_kwargs.pop("until", None) or []
        until = (until,) if isinstance(until, str) else tuple(until)
        new = int(gen_kwargs.pop("max_gen_toks", DEFAULT_GEN_TOKENS))
        temperature = float(gen_kwargs.pop("temperature", 0.0))
        if not gen_kwargs.pop("do_sample", temperature > 0):
            temperature = 0.0
        sampling = decode.Sampling(
            temperature,
            int(gen_kwargs.pop("top_k", 0) or 0),
            float(gen_kwargs.pop("top_p", 1.0) or 1.0),
            self.sp.vocab_size(),
        ).check()
        seed = int(gen_kwargs.pop("seed", 0) or 0)
        return until, min(new, self.max_length - 1), sampling, seed
