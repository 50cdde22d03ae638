"""A layer stack of two segments: 2 dense layers, then (dense, MoE) blocks; one scan each."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from glam_jax import config_checks, optim, sharding, sharding_report, steps
from tests.helpers import random_batch, tiny_config

SEGMENTS = "(dense)*2 (dense,moe)*3"


def two_segment_config():
    config = tiny_config()
    config.model.num_layers = 8
    config.model.segments = SEGMENTS
    config.train.optimizer = "adamw"
    config.train.learning_rate = 1e-2
    config.train.warmup_steps = 2
    return config


def while_loops(config) -> int:
    """Top-level while loops of the compiled forward pass of `config`'s model (the loops in
    the ENTRY computation; loops nested inside a scan body, e.g. a searchsorted, not counted)."""
    batch = random_batch(config)
    model = steps.build_model(config)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch["inputs"])["params"]
    lowered = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(
        nn.unbox(params), batch["inputs"]
    )
    text = lowered.compile().as_text()
    entry = text[text.index("\nENTRY ") :]
    entry = entry[: entry.index("\n}")]
    return entry.count(" while(")


def test_two_segments_train_compile_one_loop_each_and_keep_expert_placement():
    config = two_segment_config()
    config_checks.check_model(config)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    model = steps.build_model(config)
    tx = optim.make_optimizer(config.train)
    state, shardings = steps.create_train_state(config, model, tx, mesh)
    blocks = {k: jax.tree.map(lambda x: x.shape[0], v) for k, v in state.params.items()}
    assert set(state.params) == {"embed", "final_norm", "segment_0", "segment_1"}
    assert set(state.params["segment_0"]) == {"layer_0"}  # (dense) x 2
    assert set(state.params["segment_1"]["layer_1"]) >= {"moe"}  # (dense, moe) x 3
    assert jax.tree.leaves(blocks["segment_0"]) == [2] * len(jax.tree.leaves(blocks["segment_0"]))
    assert set(jax.tree.leaves(blocks["segment_1"])) == {3}

    train_step = steps.make_train_step(config, model, tx, mesh, shardings)
    batch = steps.global_batch(random_batch(config), mesh)
    losses = []
    for _ in range(20):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["ce_loss"]))
    assert losses[-1] < losses[0] - 0.3, losses  # it learns (the one batch, by heart)
    assert metrics["expert_load"].shape == (3, config.moe.num_experts)  # one row per MoE layer

    uniform = tiny_config()
    uniform.model.num_layers = 8
    assert (while_loops(uniform), while_loops(config)) == (1, 2)

    report = sharding_report.report(config, (2, 4, 1))
    placement = report["expert_placement"]
    assert len(placement) == 8
    for device, layers in placement.items():
        assert len(layers) == 3 and all(ids == layers[0] for ids in layers), (device, layers)
        assert len(layers[0]) == config.moe.num_experts // 4


def test_segments_unrolled_match_scanned():
    """model.scan_layers=False builds the same segments block by block: same eval loss."""
    config = two_segment_config()
    config.moe.capacity_factor_eval = float(config.moe.num_experts)
    batch = random_batch(config)
    scanned = steps.build_model(config)
    params = nn.unbox(scanned.init(jax.random.PRNGKey(0), batch["inputs"])["params"])
    unrolled_params = {k: v for k, v in params.items() if not k.startswith("segment_")}
    for seg, repeats in (("segment_0", 2), ("segment_1", 3)):
        for i in range(repeats):
            unrolled_params[f"{seg}_{i}"] = jax.tree.map(lambda x, i=i: x[i], params[seg])
    config.model.scan_layers = False
    unrolled = steps.build_model(config)

    def loss(model, p):
        return steps.loss_and_metrics(p, batch, None, model, config, False)[0]

    np.testing.assert_allclose(
        float(jax.jit(lambda p: loss(unrolled, p))(unrolled_params)),
        float(jax.jit(lambda p: loss(scanned, p))(params)),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "segments, layers, match",
    [
        ("(dense)*2 (dense,moe)*3", 6, "has 8 layers"),
        ("(dense,attention)*4", 8, "FFN kinds"),
        ("dense*8", 8, "is not a list"),
    ],
)
def test_bad_segments_are_refused_in_one_sentence(segments, layers, match):
    config = tiny_config()
    config.model.num_layers, config.model.segments = layers, segments
    with pytest.raises(config_checks.ConfigError, match=match):
        config_checks.check_model(config)
