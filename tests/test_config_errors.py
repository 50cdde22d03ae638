"""Bad configs fail before anything is built, with one sentence naming the value."""

import subprocess
import sys

import pytest

from glam_jax.config_checks import ConfigError, check_run
from tests.helpers import ROOT, tiny_config


@pytest.mark.parametrize(
    "field, value, mesh, words",
    [
        ("moe.num_experts", 6, (2, 4, 1), "not divisible by the mesh expert axis"),
        ("train.batch_size", 12, (2, 4, 1), "not divisible by mesh data x expert"),
        ("moe.capacity_factor_train", 0.0, (1, 1, 1), "capacity_factor_train=0.0 must be > 0"),
        ("moe.capacity_factor_eval", -1.0, (1, 1, 1), "must be > 0"),
        ("moe.every", 0, (1, 1, 1), "moe.every=0 must be >= 1"),
        ("model.num_layers", 5, (1, 1, 1), "multiple of moe.every"),
        ("moe.router", "top3", (1, 1, 1), "moe.router='top3' is not valid"),
        ("moe.dispatch", "alltoall", (1, 1, 1), "moe.dispatch='alltoall' is not valid"),
        ("train.seq_len", 4096, (1, 1, 1), "larger than model.max_len"),
        ("moe.num_selected", 1, (1, 1, 1), "always picks 2"),
    ],
)
def test_bad_config_is_refused(field, value, mesh, words):
    config = tiny_config()
    part, key = field.split(".")
    config[part][key] = value
    with pytest.raises(ConfigError, match=words) as info:
        check_run(config, mesh)
    assert "\n" not in str(info.value)


def test_expert_choice_with_dropless_is_refused():
    config = tiny_config(router="expert_choice", dispatch="dropless", num_selected=2)
    with pytest.raises(ConfigError, match="expert_choice"):
        check_run(config, (1, 1, 1))


def test_cli_prints_one_line_not_a_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            f"{ROOT}/experiments/train.py",
            f"--config={ROOT}/configs/glam_tiny.py",
            f"--workdir={tmp_path}",
            "--config.moe.every=0",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "error: moe.every=0 must be >= 1" in proc.stderr
