"""checkpoint.save_run_config / load_run_config: the config a workdir was trained with."""

import json

from configs.glam_tiny import get_config
from glam_jax import checkpoint
from glam_jax.presets.base import get_base_config


def test_run_config_round_trips(tmp_path):
    config = get_config()
    config.model.num_layers = 3
    config.study = {"arm": "moe8"}  # sections the base config lacks survive too
    checkpoint.save_run_config(config, str(tmp_path))
    loaded = checkpoint.load_run_config(str(tmp_path))
    assert loaded.to_dict() == config.to_dict()


def test_fields_added_after_the_workdir_was_written_get_their_defaults(tmp_path):
    config = get_config()
    config.moe.num_experts = 4
    checkpoint.save_run_config(config, str(tmp_path))
    path = tmp_path / checkpoint.RUN_CONFIG
    saved = json.loads(path.read_text())
    del saved["moe"]["expert_bias_update_rate"], saved["model"]["qk_norm"]  # an older workdir
    path.write_text(json.dumps(saved))
    loaded = checkpoint.load_run_config(str(tmp_path))
    base = get_base_config()
    assert loaded.moe.expert_bias_update_rate == base.moe.expert_bias_update_rate
    assert loaded.model.qk_norm == base.model.qk_norm
    assert loaded.moe.num_experts == 4  # what the workdir did record wins
    assert loaded.model.num_layers == config.model.num_layers
