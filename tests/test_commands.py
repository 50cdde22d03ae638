"""Preset names for `--config` (glam_jax/presets/names.py) and the console-script programs."""

import os
import subprocess
import sys

import pytest

from glam_jax.errors import GlamError
from glam_jax.presets import glam_tiny, names
from tests.helpers import ROOT

PRESETS = os.path.join(ROOT, "glam_jax", "presets")


def test_preset_names_are_the_preset_modules_with_get_config():
    # every module of glam_jax/presets that defines get_config, and nothing else (base,
    # variants and hf_families are helpers)
    with_get_config = sorted(
        f[:-3]
        for f in os.listdir(PRESETS)
        if f.endswith(".py") and "\ndef get_config(" in open(os.path.join(PRESETS, f)).read()
    )
    assert names.preset_names() == with_get_config
    assert {"glam", "glam_tiny", "mixtral", "olmoe", "qwen_moe"} <= set(with_get_config)


@pytest.mark.parametrize(
    "value, want",
    [
        ("glam_tiny", os.path.join(PRESETS, "glam_tiny.py")),
        ("glam:size=1_7b", os.path.join(PRESETS, "glam.py") + ":size=1_7b"),
        ("configs/glam_tiny.py:experts=4", "configs/glam_tiny.py:experts=4"),  # a path stays
        ("/nonexistent/cfg.py", "/nonexistent/cfg.py"),  # its own error comes later
    ],
)
def test_resolve_turns_a_preset_name_into_its_file_and_keeps_paths(value, want):
    assert names.resolve(value) == want


def test_an_unknown_name_is_one_sentence_listing_the_presets():
    with pytest.raises(GlamError, match=r"'glam_teeny' is neither .* presets: glam, glam_tiny"):
        names.resolve("glam_teeny")


def test_expand_config_args_handles_both_flag_forms():
    got = names.expand_config_args(["prog", "--config=glam_tiny", "--workdir=/w"])
    assert got == ["prog", f"--config={PRESETS}/glam_tiny.py", "--workdir=/w"]
    got = names.expand_config_args(["prog", "--config", "mixtral:size=tiny"])
    assert got == ["prog", "--config", f"{PRESETS}/mixtral.py:size=tiny"]


def test_load_config_equals_the_presets_get_config():
    assert names.load_config("glam_tiny:experts=4") == glam_tiny.get_config("experts=4")
    path = os.path.join(ROOT, "configs", "glam_tiny.py")
    assert names.load_config(path) == glam_tiny.get_config()


def test_a_command_takes_a_preset_name_and_refuses_an_unknown_one(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")

    def param_count(config: str):
        command = [sys.executable, f"{ROOT}/glam_jax/param_count.py", "--json", config]
        return subprocess.run(
            command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=180
        )

    ok = param_count("--config=glam_tiny:experts=4")
    assert ok.returncode == 0 and '"total_params"' in ok.stdout, ok.stderr[-2000:]
    bad = param_count("--config=glam_teeny")
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 1 and len(lines) == 1, bad.stderr[-2000:]
    assert lines[0].startswith("error: --config=glam_teeny: 'glam_teeny' is neither")
