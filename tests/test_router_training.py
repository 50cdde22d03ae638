"""Every valid router x dispatch combination trains the tiny model: the loss falls in 50 steps."""

import itertools

import jax
import numpy as np
import pytest

from glam_jax import config_checks, optim, sharding, steps
from glam_jax.data import create_datasets
from glam_jax.moe import routers as routing
from glam_jax.moe.dispatch import DISPATCHES
from tests.helpers import tiny_config

COMBOS = list(itertools.product(routing.ROUTERS, DISPATCHES))
STEPS = 50


def combo_config(router, dispatch):
    config = tiny_config(router=router, dispatch=dispatch)
    config.model.vocab_size = 320
    config.moe.num_selected = 1 if router == "switch_top1" else 2
    config.train.learning_rate = 0.05
    config.train.warmup_steps = 5
    return config


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    config = combo_config("gshard_top2", "einsum")
    bundle = create_datasets(config, cache_dir=str(tmp_path_factory.mktemp("data")))
    return [next(bundle.train_iter) for _ in range(STEPS)]


@pytest.mark.parametrize("router, dispatch", COMBOS)
def test_combination_trains_or_is_refused(router, dispatch, batches):
    config = combo_config(router, dispatch)
    if router == "expert_choice" and dispatch == "dropless":
        with pytest.raises(config_checks.ConfigError, match="expert_choice"):
            config_checks.check_model(config)
        return
    config_checks.check_model(config)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    model = steps.build_model(config)
    tx = optim.make_optimizer(config.train)
    state, shardings = steps.create_train_state(config, model, tx, mesh)
    train_step = steps.make_train_step(config, model, tx, mesh, shardings)
    losses = []
    for batch in batches:
        state, metrics = train_step(state, steps.global_batch(batch, mesh))
        losses.append(float(metrics["ce_loss"]))
    assert np.all(np.isfinite(losses))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < first - 0.15, (router, dispatch, first, last)
