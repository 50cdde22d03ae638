"""Optimisers and learning-rate schedules from config.train (GLaM's Adafactor recipe, AdamW)."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("adafactor", "adamw")
DECAYS = ("rsqrt", "cosine", "constant")


def learning_rate_schedule(tc: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to train.learning_rate, then rsqrt (GLaM), cosine or constant."""
    peak, warmup = tc.learning_rate, max(int(tc.warmup_steps), 1)
    if tc.decay not in DECAYS:
        raise ValueError(f"train.decay={tc.decay!r} is not valid; valid: {DECAYS}.")
    warm = optax.linear_schedule(0.0, peak, warmup)
    if tc.decay == "rsqrt":
        after = lambda step: peak * (warmup / (step + warmup)) ** 0.5  # noqa: E731
    elif tc.decay == "cosine":
        after = optax.cosine_decay_schedule(
            peak, max(tc.steps - warmup, 1), alpha=tc.min_learning_rate / max(peak, 1e-12)
        )
    else:
        after = optax.constant_schedule(peak)
    return optax.join_schedules([warm, after], [warmup])


def make_optimizer(tc: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping followed by Adafactor (factored, no momentum) or AdamW."""
    schedule = learning_rate_schedule(tc)
    if tc.optimizer == "adafactor":
        opt = optax.adafactor(
            learning_rate=schedule,
            decay_rate=tc.adafactor_decay_rate,
            clipping_threshold=tc.adafactor_clip_threshold,
            momentum=None,
            multiply_by_parameter_scale=True,
            factored=True,
            weight_decay_rate=tc.weight_decay or None,
        )
    elif tc.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=tc.adam_b1, b2=tc.adam_b2, weight_decay=tc.weight_decay)
    else:
        raise ValueError(f"train.optimizer={tc.optimizer!r} is not valid; valid: {OPTIMIZERS}.")
    if tc.grad_clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(tc.grad_clip_norm), opt)
    return opt


def weight_storage_note(config: ml_collections.ConfigDict) -> str | None:
    """What training does with weights stored below float32, said once at start-up.

    There is no separate bf16 storage for expert weights with a float32 master copy inside the
    optimizer: on an H200 the E=64 GLaM step reaches 46.6% MFU with float32 weights and
    Adafactor (docs/performance.md), so the only lever is model.param_dtype, for every weight.
    """
    dtype = config.model.param_dtype
    if dtype == "float32":
        return None
    lost_below = round(2 / float(jnp.finfo(jnp.dtype(dtype)).eps))  # half a unit in the last place
    return (
        f"model.param_dtype={dtype!r}: every weight, the experts' included, is stored and "
        f"updated in {dtype} with no float32 master copy, so updates smaller than about "
        f"1/{lost_below} of a weight round away; there is no bf16 expert storage with a float32 "
        "master, so for full-precision updates keep model.param_dtype='float32' (compute stays "
        "in model.dtype)."
    )
