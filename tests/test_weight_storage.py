"""Issue 19: a config that stores weights below float32 is told what training does with them."""

import jax.numpy as jnp
import optax
import pytest

from configs.glam_tiny import get_config
from glam_jax import optim


def test_float32_weights_get_no_note():
    assert optim.weight_storage_note(get_config()) is None


@pytest.mark.parametrize("dtype, lost_below", [("bfloat16", 256), ("float16", 2048)])
def test_low_precision_weights_are_told_what_rounds_away(dtype, lost_below):
    config = get_config()
    config.model.param_dtype = dtype
    note = optim.weight_storage_note(config)
    assert f"model.param_dtype={dtype!r}" in note and "no float32 master copy" in note
    assert f"1/{lost_below} of a weight" in note and "model.param_dtype='float32'" in note

    # What the note says, in numbers: one AdamW step of 1/1000 (Adam's step is ~lr whatever the
    # gradient's size) moves a float32 weight of 1.0 and leaves a bfloat16 one where it was.
    config.train.update(optimizer="adamw", learning_rate=1e-3, warmup_steps=0, decay="constant")
    config.train.update(weight_decay=0.0, grad_clip_norm=0.0)
    tx = optim.make_optimizer(config.train)
    moved = {}
    for name in ("float32", dtype):
        w = jnp.ones((4,), jnp.dtype(name))
        grads = jnp.full((4,), 0.5, jnp.dtype(name))
        state, start = tx.init(w), w
        for _ in range(2):  # the schedule's first step is the warm-up's learning rate of 0
            updates, state = tx.update(grads, state, w)
            w = optax.apply_updates(w, updates)
        assert w.dtype == start.dtype  # stored in the dtype asked for
        moved[name] = float(jnp.max(jnp.abs(w.astype(jnp.float32) - 1.0)))
    assert moved["float32"] == pytest.approx(1e-3, rel=1e-2)
    expected = 0.0 if 1e-3 < 1 / lost_below else float(jnp.asarray(1 - 1e-3, dtype) - 1)
    assert moved[dtype] == pytest.approx(abs(expected), abs=1e-6)
