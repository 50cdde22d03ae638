"""Auxiliary-loss-free balancing (DeepSeek-V3 section 2.1.2): the per-expert bias is state.

It balances a deliberately skewed router where the same run without it stays skewed, follows
b += gamma * sign(mean load - load) exactly, gets no gradient, survives a checkpoint restore
bitwise onto another mesh, and is updated the same with remat or unrolled layers.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import pytest
from flax import struct

from glam_jax import checkpoint, config_checks, optim, sharding, steps, train
from glam_jax.moe.capacity import MoEError
from tests.helpers import random_batch, tiny_config

# --dist loadgroup (pyproject.toml) gives this module to one xdist worker: the two training runs
# (a module fixture) are computed once, not per xdist worker.
pytestmark = pytest.mark.xdist_group("expert_bias")

GAMMA = 0.01  # high for a 20-step test (DeepSeek-V3 used 0.001 over a long run)
SKEW = 0.15  # added to every entry of expert 0's router column: max/mean load ~1.4-1.6


def bias_config(rate=GAMMA, **model):
    """The tiny model with Mixtral routing, no balancing loss, and a slow learning rate, so the
    router stays where the skew put it unless the bias moves the choice."""
    c = tiny_config(
        router="topk_softmax",
        num_selected=2,
        expert_bias_update_rate=rate,
        aux_loss_weight=0.0,
        z_loss_weight=0.0,
    )
    c.train.learning_rate = 0.002
    c.model.update(model)
    return c


def skewed_state(config, mesh_shape=(1, 1, 1)):
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    model, tx = steps.build_model(config), optim.make_optimizer(config.train)
    state, shardings = steps.create_train_state(config, model, tx, mesh)

    def skew(path, x):
        return x.at[..., 0].add(SKEW) if path[-1].key == "router" else x

    state = state.replace(params=jax.tree_util.tree_map_with_path(skew, state.params))
    step = steps.make_train_step(config, model, tx, mesh, shardings)
    return state, step, mesh, shardings


def run(config, n, mesh_shape=(1, 1, 1)):
    """(final state, per-step metrics) of n steps on one fixed batch."""
    state, step, mesh, _ = skewed_state(config, mesh_shape)
    batch = steps.global_batch(random_batch(config), mesh)
    history = []
    for _ in range(n):
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return state, history


N_STEPS = 10  # the bias balances by step 5 (max/mean 1.59 -> 1.17) and stays below 1.2


@pytest.fixture(scope="module")
def runs():
    return {rate: run(bias_config(rate), N_STEPS) for rate in (GAMMA, 0.0)}


def test_bias_balances_a_skewed_router_the_same_run_without_stays_skewed(runs):
    _, biased = runs[GAMMA]
    _, plain = runs[0.0]
    ratio_biased = np.array([m["expert_load_max_over_mean"] for m in biased])  # [steps, layers]
    ratio_plain = np.array([m["expert_load_max_over_mean"] for m in plain])
    assert ratio_biased[0].max() == ratio_plain[0].max() > 1.4  # skewed at the start
    below = ratio_biased.max(axis=1) < 1.2
    assert below.any() and below[below.argmax() :].all(), ratio_biased.max(axis=1)
    assert ratio_plain.max(axis=1).min() > 1.4, ratio_plain.max(axis=1)
    assert "expert_bias" not in plain[-1]


def assert_sign_rule(history):
    """metrics['expert_bias'] is the bias each step chose with; the next step's is
    b + gamma * sign(mean load - load) with this step's load."""
    assert not np.any(history[0]["expert_bias"])  # starts at zero
    for now, later in zip(history, history[1:], strict=False):
        load = np.asarray(now["expert_load"], np.float32)
        step = np.float32(GAMMA) * np.sign(load.mean(-1, keepdims=True) - load)
        np.testing.assert_allclose(later["expert_bias"], now["expert_bias"] + step, atol=1e-7)
    assert np.abs(history[-1]["expert_bias"]).max() > 0


def test_bias_follows_the_sign_rule_from_each_steps_load(runs):
    assert_sign_rule(runs[GAMMA][1])


def test_bias_is_state_not_a_parameter(runs):
    state, _ = runs[GAMMA]

    def paths(tree):
        return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]

    assert not [p for p in paths((state.params, state.opt_state)) if "expert_bias" in p]
    (bias,) = jax.tree.leaves(state.model_state)
    assert bias.shape == (2, 8) and bias.dtype == np.float32  # [MoE layers of the scan, E]
    plain, _ = runs[0.0]
    assert plain.model_state == {}


def test_bias_survives_a_restore_bitwise_onto_another_mesh(tmp_path):
    config = bias_config()
    state, *_ = skewed_state(config, (8, 1, 1))
    bias = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)  # any values
    state = state.replace(model_state=jax.tree.map(lambda b: b + bias, state.model_state))
    ckpt = checkpoint.Checkpointer(str(tmp_path), config)
    ckpt.save(3, state, {})
    ckpt.wait()
    mesh = sharding.make_mesh((2, 2, 2), jax.devices()[:8])
    model, tx = steps.build_model(config), optim.make_optimizer(config.train)
    abstract, shardings = steps.abstract_state(config, model, tx, mesh)
    restored, _ = ckpt.restore(abstract)
    ckpt.close()
    (got,) = jax.tree.leaves(restored.model_state)
    assert np.asarray(got).tobytes() == bias.tobytes()
    assert got.sharding == jax.tree.leaves(shardings.model_state)[0]  # on the (2, 2, 2) mesh
    assert len(got.sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_remat_block_updates_the_same_bias(runs):
    """The scan body rematerialised: the same parameters, the same bias step by step."""
    _, reference = runs[GAMMA]
    _, history = run(bias_config(remat_policy="full", remat_scope="block"), 3)
    for got, want in zip(history, reference[:3], strict=True):
        np.testing.assert_array_equal(got["expert_bias"], want["expert_bias"])


def test_unrolled_layers_with_a_rematerialised_moe_update_the_bias():
    """Blocks one by one (other parameter names, so other init) and nn.remat around the MoE
    layer itself: the bias still follows the rule in every layer."""
    config = bias_config(scan_layers=False, remat_policy="full", remat_scope="ffn")
    state, history = run(config, 3)
    assert sorted(state.model_state["moe_state"]) == ["blocks_0", "blocks_1"]
    assert_sign_rule(history)


def test_applying_without_the_bias_is_one_sentence(runs):
    config = bias_config()
    model = steps.build_model(config)
    state, _ = runs[GAMMA]
    tokens = np.zeros((1, 8), np.int32)
    with pytest.raises(MoEError, match="without its 'moe_state' collection") as err:
        model.apply({"params": state.params}, tokens)
    assert "\n" not in str(err.value)
    logits, _ = model.apply(steps.model_variables(state.params, state.model_state), tokens)
    assert logits.shape == (1, 8, config.model.vocab_size)


def test_a_router_that_ignores_the_bias_is_refused():
    config = bias_config()
    config.moe.router, config.moe.num_selected = "gshard_top2", 2
    with pytest.raises(config_checks.ConfigError, match="expert_bias_update_rate=0.01 needs"):
        config_checks.check_model(config)


def test_metrics_rows_carry_the_bias_and_the_max_over_mean_load(runs):
    metrics = runs[GAMMA][1][-1]
    row = train._log_row(metrics, 1.0, 1, None)
    load = np.asarray(metrics["expert_load"])
    np.testing.assert_allclose(row["expert_load_max_over_mean"], load.max(-1) / load.mean(-1))
    bias = np.asarray(metrics["expert_bias"])
    assert np.array_equal(row["expert_bias"].astype(np.float32), bias)  # the same float32s
    assert len(json.dumps(row["expert_bias"].tolist())) < len(json.dumps(bias.tolist()))


def test_a_checkpoint_from_before_model_state_restores_where_the_bias_is_off(tmp_path):
    """A TrainState saved without the model_state field (every checkpoint before issue 17)."""

    @struct.dataclass
    class OldTrainState:
        step: Any
        params: Any
        opt_state: Any
        rng: Any
        nonfinite_steps: Any
        nonfinite_streak: Any

    config = tiny_config()
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    model, tx = steps.build_model(config), optim.make_optimizer(config.train)
    state, _ = steps.create_train_state(config, model, tx, mesh)
    old = OldTrainState(**{f: getattr(state, f) for f in OldTrainState.__dataclass_fields__})
    ckpt = checkpoint.Checkpointer(str(tmp_path), config)
    ckpt.save(1, old, {})
    ckpt.wait()
    abstract, _ = steps.abstract_state(config, model, tx, mesh)
    restored, _ = ckpt.restore(abstract)
    ckpt.close()
    assert ckpt.unreadable == [] and restored.model_state == {}
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
