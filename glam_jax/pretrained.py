"""Parameters and tokenizer of a trained model, for inference: from a glam_jax workdir (orbax
checkpoints written by training) or from a Hugging Face Mixtral directory.

The workdir route restores the whole train state through `checkpoint.Checkpointer` (so a
config that does not match the checkpoint fails in one sentence) and keeps the parameters.
Nothing here imports the data pipeline (grain, TFDS): inference hosts need not have it.
"""

from __future__ import annotations

import glob
import os

import jax
import ml_collections
import sentencepiece as spm
from absl import logging
from jax.sharding import Mesh

from glam_jax import checkpoint, hf_checkpoint, optim, steps
from glam_jax.errors import GlamError


class PretrainedError(GlamError):
    """Trained weights or a tokenizer that cannot be found, in one sentence."""


def params_from_workdir(
    config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, step: int | None = None
):
    """(params, step) restored into their training shardings on `mesh` (latest step default)."""
    params, _, restored = state_from_workdir(config, workdir, mesh, step)
    return params, restored


def state_from_workdir(
    config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, step: int | None = None
):
    """(params, model_state, step): params_from_workdir plus the non-parameter variables the
    model routes with (the expert bias of auxiliary-loss-free balancing; {} without it)."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise PretrainedError(f"{workdir} has no checkpoints/ folder; is it a training workdir?")
    model = steps.build_model(config)
    tx = optim.make_optimizer(config.train)
    ckpt = checkpoint.Checkpointer(workdir, config, is_primary=False)
    try:
        abstract, _ = steps.abstract_state(config, model, tx, mesh)
        state, _ = ckpt.restore(abstract, step)
    finally:
        ckpt.close()
    for bad, reason in ckpt.unreadable:  # newer than the one restored (train moves them aside)
        logging.warning(
            "Checkpoint step %d under %s is unreadable (%s).", bad, ckpt.directory, reason
        )
    return state.params, state.model_state, int(jax.device_get(state.step))


def config_for_source(
    config: ml_collections.ConfigDict | None, hf_dir: str
) -> ml_collections.ConfigDict | None:
    """The model config of `hf_dir`'s config.json, taking only the dtypes, attention kernel and
    mesh from `config` (an HF checkpoint fixes the model); without `hf_dir`, `config` itself."""
    if not hf_dir:
        return config
    hf_config = hf_checkpoint.config_from_hf(hf_checkpoint.read_config(hf_dir))
    if config is not None:
        for key in ("dtype", "param_dtype", "attention_impl"):
            hf_config.model[key] = config.model[key]
        hf_config.mesh.shape = config.mesh.shape
    return hf_config


def params_from_hf(path: str, mesh: Mesh, config: ml_collections.ConfigDict | None = None):
    """(config, params) of a Hugging Face directory of any supported family (see hf_checkpoint)."""
    return hf_checkpoint.load(path, mesh, config)


def tokenizer_path(
    config: ml_collections.ConfigDict | None, workdir: str = "", hf_dir: str = ""
) -> str:
    """The SentencePiece model that belongs to a workdir or HF directory.

    A workdir's tokenizer is `data.tokenizer_path` if the run set one, else the model training
    cached under <cache_dir or workdir/data>/tokenizers/spm-*-<type>-<vocab>.model. An HF
    directory's is its `tokenizer.model`.
    """
    if hf_dir:
        path = os.path.join(hf_dir, "tokenizer.model")
        if os.path.isfile(path):
            return path
        raise PretrainedError(
            f"{hf_dir} has no SentencePiece tokenizer.model (OLMoE and Qwen ship a BPE "
            "tokenizer.json, which glam_jax does not read); pass --tokenizer=path/to/"
            "tokenizer.model (e.g. mistral_common/data/tokenizer.model.v1 for Mixtral) or "
            "token-id prompts with --random_prompts."
        )
    data = config.data
    if data.tokenizer_path:
        return data.tokenizer_path
    cache = data.cache_dir or os.path.join(workdir, "data")
    pattern = os.path.join(
        cache, "tokenizers", f"spm-*-{data.spm_model_type}-{config.model.vocab_size}.model"
    )
    found = sorted(glob.glob(pattern))
    if len(found) != 1:
        what = "no tokenizer matches" if not found else f"{len(found)} tokenizers match"
        raise PretrainedError(
            f"{what} {pattern}; pass --tokenizer=path/to/the.model used in training."
        )
    return found[0]


def tokenizer(path: str) -> spm.SentencePieceProcessor:
    """A SentencePiece model with BOS and EOS (prompts start with BOS, generation stops at EOS)."""
    if not os.path.isfile(path):
        raise PretrainedError(f"tokenizer {path!r} is not an existing file.")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (OSError, RuntimeError):
        raise PretrainedError(f"tokenizer {path!r} is not a SentencePiece model.") from None
    if sp.bos_id() < 0 or sp.eos_id() < 0:
        raise PretrainedError(f"tokenizer {path!r} has no BOS or EOS piece; generation needs both.")
    return sp
