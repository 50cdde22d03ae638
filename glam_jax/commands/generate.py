"""Generates text with a KV cache from a glam_jax workdir, a Hugging Face directory (Mixtral,
OLMoE, Qwen1.5/2/3-MoE: glam_jax/hf_checkpoint.py), or
random weights (for throughput), and reports tokens/s and time per output token
(`glam-generate`, experiments/generate.py).

glam-generate --config=glam_tiny --workdir=/tmp/glam_tiny --prompt="ROMEO:"
python experiments/generate.py --config=configs/glam_tiny.py --workdir=/tmp/glam_tiny \
    --prompt="ROMEO:" --max_new_tokens=64 --temperature=0.8 --top_p=0.9
python experiments/generate.py --hf_dir=/data/Mixtral-8x7B-v0.1 \
    --tokenizer=.../mistral_common/data/tokenizer.model.v1 --prompt="The capital of France is"
python experiments/generate.py --config=configs/mixtral.py:size=8x7b --random_init \
    --config.model.param_dtype=bfloat16 --config.model.dtype=bfloat16 \
    --random_prompts=8 --prompt_len=512 --max_new_tokens=128 --ignore_eos --json

Timings come from the runs after `--warmup` untimed ones (which compile): prefill is the
prompt batch through the model, decode every later step; tokens/s counts new tokens of all
prompts over prefill + decode, and time per output token is decode time per step.
"""

from __future__ import annotations

import json
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from glam_jax import (
    cli,
    config_checks,
    decode,
    gpu_defaults,
    pretrained,
    sharding,
    steps,
)
from glam_jax.errors import GlamError

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file or preset name (optional :variant); required with --workdir/--random_init.",
    lock_config=False,
)
_WORKDIR = flags.DEFINE_string("workdir", "", "A glam_jax training workdir to restore.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: latest).")
_HF_DIR = flags.DEFINE_string(
    "hf_dir", "", "A Hugging Face directory to import (Mixtral, OLMoE, Qwen MoE)."
)
_RANDOM_INIT = flags.DEFINE_bool("random_init", False, "Random weights (throughput only).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "SentencePiece .model (else the source's).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for a batch.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", "", "A file with one prompt per line.")
_RANDOM_PROMPTS = flags.DEFINE_integer("random_prompts", 0, "Use N random-token prompts.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Length of each --random_prompts prompt.")
_BATCH = flags.DEFINE_integer("batch", 0, "Repeat the prompts up to this many rows (0 = as is).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "New tokens per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (and random weights / prompts).")
_IGNORE_EOS = flags.DEFINE_bool("ignore_eos", False, "Always generate max_new_tokens.")
_NO_BOS = flags.DEFINE_bool("no_bos", False, "Do not put the BOS token before each prompt.")
_MESH = flags.DEFINE_list("mesh", [], "Mesh (data,expert,model), e.g. 1,8,1; default config's.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed runs first (they compile).")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed runs; the median is reported.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")


def _load(mesh_shape):
    """(config, params, model state, mesh, tokenizer path or '') from the chosen source."""
    sources = [bool(_WORKDIR.value), bool(_HF_DIR.value), _RANDOM_INIT.value]
    if sum(sources) != 1:
        raise GlamError("pass exactly one of --workdir, --hf_dir and --random_init.")
    # With --hf_dir, --config contributes only dtypes, the attention kernel and the mesh.
    config = pretrained.config_for_source(_CONFIG.value, _HF_DIR.value)
    if config is None:
        raise GlamError("--config is required with --workdir and --random_init.")
    config_checks.check_model(config)
    shape = tuple(int(s) for s in mesh_shape) if mesh_shape else tuple(config.mesh.shape)
    mesh = sharding.make_mesh(sharding.mesh_shape(shape, jax.device_count()))
    tok = _TOKENIZER.value
    model_state = {}  # the expert bias of auxiliary-loss-free balancing, where trained with it
    if _HF_DIR.value:
        config, params = pretrained.params_from_hf(_HF_DIR.value, mesh, config)
        if not _RANDOM_PROMPTS.value:  # token-id prompts need no tokenizer
            tok = tok or pretrained.tokenizer_path(None, hf_dir=_HF_DIR.value)
    elif _WORKDIR.value:
        params, model_state, step = pretrained.state_from_workdir(
            config, _WORKDIR.value, mesh, _STEP.value
        )
        logging.info("restored step %d", step)
        tok = tok or pretrained.tokenizer_path(config, workdir=_WORKDIR.value)
    else:
        gen = decode.Generator(config, mesh)
        model, shardings = gen.model, gen.param_shardings()
        ids = jnp.zeros((1, 1), jnp.int32)
        with sharding.use_mesh(mesh):
            params, model_state = jax.jit(
                lambda r: steps.split_variables(nn.unbox(model.init({"params": r}, ids))),
                out_shardings=(shardings, None),
            )(jax.random.PRNGKey(_SEED.value))
    return config, params, model_state, mesh, tok


def _prompts(tokenizer, vocab_size: int) -> list[list[int]]:
    if _RANDOM_PROMPTS.value:
        rng = np.random.RandomState(_SEED.value)
        ids = rng.randint(4, vocab_size, (_RANDOM_PROMPTS.value, _PROMPT_LEN.value))
        prompts = ids.tolist()
    else:
        texts = list(_PROMPT.value)
        if _PROMPTS_FILE.value:
            with open(_PROMPTS_FILE.value) as f:
                texts += [line.rstrip("\n") for line in f if line.strip()]
        if not texts:
            texts = [""]  # unconditional: BOS only
        if tokenizer is None:
            raise GlamError("text prompts need a tokenizer; pass --tokenizer or --random_prompts.")
        bos = [] if _NO_BOS.value else [tokenizer.bos_id()]
        prompts = [bos + tokenizer.encode(t) for t in texts]
    if _BATCH.value:
        prompts = [prompts[i % len(prompts)] for i in range(_BATCH.value)]
    return prompts


def run() -> dict:
    """Generates for the flags' prompts; the texts, token ids and timings as one dict."""
    config, params, model_state, mesh, tok_path = _load(_MESH.value)
    tokenizer = pretrained.tokenizer(tok_path) if tok_path else None
    if tokenizer is not None and tokenizer.vocab_size() > config.model.vocab_size:
        raise GlamError(
            f"the tokenizer has {tokenizer.vocab_size()} pieces but the model only "
            f"{config.model.vocab_size}; pass the tokenizer the model was trained with."
        )
    prompts = _prompts(tokenizer, config.model.vocab_size)
    limit = tokenizer.vocab_size() if tokenizer is not None else 0  # only ids it can print
    sampling = decode.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, limit).check()
    eos = None if (_IGNORE_EOS.value or tokenizer is None) else tokenizer.eos_id()
    gen = decode.Generator(config, mesh, model_state)
    kwargs = dict(sampling=sampling, seed=_SEED.value, eos_id=eos)
    for _ in range(_WARMUP.value):
        gen.generate(params, prompts, _MAX_NEW.value, **kwargs)
    runs = [
        gen.generate(params, prompts, _MAX_NEW.value, **kwargs)
        for _ in range(max(_REPEATS.value, 1))
    ]
    out = runs[len(runs) // 2] if len(runs) % 2 else runs[-1]
    tokens_per_s = statistics.median(r.tokens_per_s for r in runs)
    tpot = statistics.median(r.time_per_output_token_s for r in runs)
    result = {
        "tokens_per_s": tokens_per_s,
        "time_per_output_token_ms": 1e3 * tpot,
        "decode_tokens_per_s": out.batch / max(tpot, 1e-12),
        "prefill_s": statistics.median(r.prefill_s for r in runs),
        "decode_s": statistics.median(r.decode_s for r in runs),
        "batch": out.batch,
        "prompt_len": out.prompt_len,
        "new_tokens_per_row": out.steps,
        "sampling": dict(
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p
        ),
        "device": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "dtype": config.model.dtype,
        "param_dtype": config.model.param_dtype,
        "repeats": len(runs),
        "outputs": out.tokens,
    }
    if tokenizer is not None:
        result["texts"] = [tokenizer.decode(t) for t in out.tokens]
    return result


def main(argv) -> None:
    """Prints the generated texts and the throughput (one JSON object with --json)."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    result = run()  # user errors become one sentence in glam_jax/cli.py
    if _JSON.value:
        print(json.dumps(result))
        return
    for i, text in enumerate(result.get("texts", result["outputs"])):
        print(f"--- {i}: {text}")
    print(
        f"{result['batch']} x {result['new_tokens_per_row']} new tokens: "
        f"{result['tokens_per_s']:.1f} tokens/s, "
        f"{result['time_per_output_token_ms']:.2f} ms per output token, "
        f"prefill {result['prefill_s'] * 1e3:.1f} ms ({result['device']} x{result['num_devices']})"
    )


def entry() -> None:
    """The `glam-generate` console script."""
    gpu_defaults.apply()  # XLA/CUDA settings for GPU hosts; nothing elsewhere
    cli.run(main)
