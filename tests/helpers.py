"""Small shared builders for tests: a tiny float32 config, random packed batches, a model's
logits, a checkpoint directory's tensors, and the check that a user's error is one sentence."""

from __future__ import annotations

import os

import numpy as np
import pytest

from configs.glam_tiny import get_config
from glam_jax.errors import GlamError
from glam_jax.model import frozen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**moe_overrides):
    """The glam_tiny config made exact and small: float32, 4 layers, 8 experts, short rows."""
    config = get_config()
    config.model.dtype = "float32"
    config.model.vocab_size = 256
    config.model.embed_dim = 32
    config.model.mlp_dim = 64
    config.model.num_heads = 2
    config.model.head_dim = 16
    config.train.batch_size = 8
    config.train.eval_batch_size = 8
    config.train.seq_len = 32
    config.moe.group_size = 32
    for key, value in moe_overrides.items():
        config.moe[key] = value
    return config


def exact_moe_config(embed: int, mlp: int, **moe):
    """Frozen glam_tiny in float32 at widths embed/mlp with the given moe.* fields, for tests
    that compare the MoE module with numpy references."""
    c = get_config()
    c.model.dtype = "float32"
    c.model.embed_dim, c.model.mlp_dim = embed, mlp
    c.model.init_std = 0.3  # O(1) expert outputs so 1e-5 tolerances mean something
    c.moe.update(moe)
    return frozen(c)


def random_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch in the data pipeline's layout with two packed documents per row."""
    rng = np.random.RandomState(seed)
    b, s, v = config.train.batch_size, config.train.seq_len, config.model.vocab_size
    tokens = rng.randint(1, v, size=(b, s + 1)).astype(np.int32)
    split = s // 2
    segment_ids = np.where(np.arange(s) < split, 1, 2)[None].repeat(b, 0).astype(np.int32)
    positions = np.where(np.arange(s) < split, np.arange(s), np.arange(s) - split)
    weights = np.ones((b, s), np.float32)
    weights[:, split - 1] = 0.0  # the last token of document 1 does not predict document 2
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segment_ids,
        "positions": positions[None].repeat(b, 0).astype(np.int32),
        "weights": weights,
        "target_chars": np.full((b, s), 3, np.int32),
    }


def assert_one_sentence(message: str) -> str:
    """A user's error: one line, one sentence, ending in a full stop."""
    assert "\n" not in message and message.endswith(".") and message.count(". ") == 0, message
    return message


def refused(call, error: type[GlamError], match: str) -> str:
    """call() raises `error` (a GlamError) matching `match`, in one sentence; its message."""
    with pytest.raises(error, match=match) as err:
        call()
    assert isinstance(err.value, GlamError)
    return assert_one_sentence(str(err.value))


def model_logits(config, params, ids) -> np.ndarray:
    """The Transformer's logits for token ids [B, T] (one jitted forward)."""
    import jax

    from glam_jax.model import Transformer

    model = Transformer(config)
    return np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x)[0])(params, ids))


def safetensors_in(path: str) -> dict[str, np.ndarray]:
    """Every tensor of the .safetensors files in directory `path`, by name."""
    from safetensors import safe_open

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="np") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out
