"""A router added by one entry in `routers.ROUTERS` works everywhere, with no other edit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam_jax import config_checks, decode, train
from glam_jax.metrics_writer import read_metrics
from glam_jax.moe import routers
from tests.helpers import tiny_config


def _last_expert(r: routers.RouterInputs) -> routers.Routing:
    """Every token to the last expert, weighted by its probability under logits + x W_bias."""
    logits_gte = r.logits_gte + jnp.einsum("gtm,me->gte", r.x_gtm, r.params["router_bias"])
    probs_gte = jax.nn.softmax(logits_gte, axis=-1)
    e = probs_gte.shape[-1]
    idx_gtk = jnp.full(probs_gte.shape[:2] + (1,), e - 1, jnp.int32)
    zero = jnp.zeros((), jnp.float32)
    return routers.Routing(
        expert_index=idx_gtk,
        combine_weights=probs_gte[..., -1:],
        dispatch_mask=jnp.ones(idx_gtk.shape, jnp.bool_),
        probs=probs_gte,
        aux_loss=routers.load_balancing_loss(probs_gte, idx_gtk[..., 0]),
        z_loss=routers.router_z_loss(logits_gte),
        importance_loss=zero,
        load_loss=zero,
    )


SPEC = routers.RouterSpec(
    _last_expert, fixed_k=1, causal=False, params=(routers.RouterParam("router_bias"),)
)


def test_router_registry_one_entry_is_checked_trained_and_reported(monkeypatch, tmp_path):
    config = tiny_config(router="last_expert", num_selected=1, dispatch="dropless")
    config.model.vocab_size = 320
    with pytest.raises(config_checks.ConfigError, match="'last_expert' is not valid"):
        config_checks.check_model(config)  # not registered yet
    monkeypatch.setitem(routers.ROUTERS, "last_expert", SPEC)
    config_checks.check_model(config)  # registered: accepted
    config.moe.num_selected = 2
    with pytest.raises(config_checks.ConfigError, match="always picks 1 expert"):
        config_checks.check_model(config)  # the spec's fixed_k is enforced
    config.moe.num_selected = 1
    with pytest.raises(decode.DecodeError, match="last_expert"):
        decode.decode_config(config)  # the spec's causal=False refuses decoding

    t = config.train
    t.steps, t.log_every, t.eval_every, t.eval_batches = 30, 1, 0, 1
    t.checkpoint_every, t.progress_bar, t.learning_rate, t.warmup_steps = 30, False, 0.05, 5
    train.train_and_evaluate(config, str(tmp_path))
    rows = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
    assert len(rows) == 30
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses
    moe_layers = config.model.num_layers // config.moe.every
    want = np.zeros((moe_layers, config.moe.num_experts))
    want[:, -1] = 1.0  # the metrics show this router's choices: all load on the last expert
    for row in rows:
        np.testing.assert_array_equal(np.asarray(row["expert_load"]), want)
        assert row["dropped_fraction"] == [0.0] * moe_layers
