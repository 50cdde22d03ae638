"""Bad configs and bad command lines fail at start-up, in one sentence naming the value."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from glam_jax import config_checks, sharding
from glam_jax.config_checks import ConfigError, check_run
from glam_jax.layers import constrain
from tests.helpers import ROOT, tiny_config


@pytest.mark.parametrize(
    "field, value, mesh, words",
    [
        ("moe.num_experts", 6, (2, 4, 1), "moe.num_experts=6 is not divisible by 4"),
        ("train.batch_size", 12, (2, 4, 1), "train.batch_size=12 is not divisible by 8"),
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


def test_a_kernel_that_cannot_run_here_is_refused_at_start_up():
    config = tiny_config(dispatch="dropless", ragged_matmul="blocked")
    if jax.default_backend() == "gpu":
        config.model.dtype = "float32"  # the kernels take bfloat16/float16 only
    with pytest.raises(ConfigError, match="moe.ragged_matmul='blocked' cannot run here"):
        check_run(config, (1, 1, 1))


def test_the_default_configs_pass():
    for config in (tiny_config(), tiny_config(num_experts=0)):
        check_run(config, (8, 1, 1))


@pytest.mark.parametrize("knob", sorted(config_checks.enumerated_knobs()))
def test_every_enumerated_knob_refuses_a_bad_value_naming_the_valid_ones(knob):
    valid = config_checks.enumerated_knobs()[knob]
    config = tiny_config()
    part, key = knob.split(".")
    assert config[part][key] in valid  # the default is one of the owner's names
    config[part][key] = "no_such_choice"
    with pytest.raises(ConfigError) as info:
        check_run(config, (1, 1, 1))
    message = str(info.value)
    assert message.startswith(f"{knob}='no_such_choice' is not valid")
    assert all(repr(name) in message for name in valid), message
    assert "\n" not in message


@pytest.mark.parametrize(
    "knob, size, axis",
    config_checks.split_sizes(tiny_config()),
    ids=[row[0] for row in config_checks.split_sizes(tiny_config())],
)
def test_every_split_size_must_divide_over_its_mesh_axis(knob, size, axis):
    mesh = next(
        m for m in ((4, 1, 2), (2, 4, 1)) if sharding.ways_on_mesh_shape(axis, m) > 1
    )  # a mesh that splits this axis
    ways = sharding.ways_on_mesh_shape(axis, mesh)
    config = tiny_config()
    check_run(config, mesh)  # the tiny sizes divide
    part, key = knob.split(".")
    config[part][key] = ways + 1 if key != "num_kv_heads" else 1
    if key == "num_experts":
        config.moe.num_selected = 2
    with pytest.raises(ConfigError, match=rf"^{knob}=\d+ is not divisible by {ways}\b") as info:
        check_run(config, mesh)
    assert f"use a multiple of {ways}" in str(info.value)


@pytest.mark.parametrize("knob", sorted(config_checks.LOWER_BOUNDS))
def test_every_count_has_a_lower_bound(knob):
    lowest = config_checks.LOWER_BOUNDS[knob]
    config = tiny_config()
    part, key = knob.split(".")
    config[part][key] = lowest - 1
    with pytest.raises(ConfigError, match=rf"{knob}=-?\d+(\.\d+)? .*(>= ?{lowest}|must be)"):
        check_run(config, (1, 1, 1))


def test_expert_choice_with_dropless_is_refused():
    config = tiny_config(router="expert_choice", dispatch="dropless", num_selected=2)
    with pytest.raises(ConfigError, match="expert_choice"):
        check_run(config, (1, 1, 1))


def test_constrain_refuses_a_misspelt_logical_axis_at_trace_time():
    mesh = sharding.make_mesh((8, 1, 1))
    x = jnp.ones((8, 4))
    with sharding.use_mesh(mesh):
        jax.jit(lambda v: constrain(v, ("batch", "embed")))(x)  # known names trace
        with pytest.raises(sharding.ShardingError, match="unknown logical axis 'batchh'"):
            jax.jit(lambda v: constrain(v, ("batchh", "embed")))(x)


def _cli(tool: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("GLAMJAX_DEBUG", None)
    return subprocess.run(
        [sys.executable, f"{ROOT}/{tool}", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
        env=env,
    )


TRAIN_TABLE = [  # (extra arguments, words the message must contain)
    (["--config.moe.routr=x"], "the config has no field 'routr'; did you mean \"router\"?"),
    (["--config.train.steps=-5"], "train.steps=-5 is not valid"),
    (["--config.train.optimizer=sgd"], "train.optimizer='sgd' is not valid; valid: 'adafactor'"),
    (["--config.train.decay=linear"], "train.decay='linear' is not valid; valid: 'rsqrt'"),
    (["--config.moe.ragged_matmul=blockd"], "moe.ragged_matmul='blockd' is not valid; valid: "),
    (["--config.model.attention_impl=flash"], "model.attention_impl='flash' is not valid; valid"),
    (["--config.model.norm=rms"], "model.norm='rms' is not valid; valid: 'rmsnorm', 'layernorm'"),
    (["--config.model.ffn_activation=swish"], "model.ffn_activation='swish' is not valid"),
    (["--config.data.document_split=para"], "data.document_split='para' is not valid"),
    (
        ["--config.model.num_kv_heads=1", "--config.mesh.shape=(4,1,2)"],
        "model.num_kv_heads=1 is not divisible by 2",
    ),
    (["--config.mesh.shape=(3,1,1)"], "mesh.shape=(3, 1, 1)"),
    (["--config.model.num_layers=2.5"], "num_layers"),
    (["--stepz=3"], "stepz"),
]


def _one_sentence(proc: subprocess.CompletedProcess, words: str) -> None:
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert words in lines[0], lines[0]


@pytest.mark.parametrize("args, words", TRAIN_TABLE, ids=[" ".join(a) for a, _ in TRAIN_TABLE])
def test_train_cli_refuses_bad_input_in_one_sentence(tmp_path, args, words):
    config = f"--config={ROOT}/configs/glam_tiny.py"
    _one_sentence(_cli("experiments/train.py", config, f"--workdir={tmp_path}", *args), words)


def test_workdir_that_is_a_file_is_one_sentence(tmp_path):
    afile = tmp_path / "a_file"
    afile.write_text("not a directory")
    proc = _cli(
        "experiments/train.py", f"--config={ROOT}/configs/glam_tiny.py", f"--workdir={afile}"
    )
    _one_sentence(proc, f"--workdir={afile} is an existing file")


@pytest.mark.parametrize(
    "tool, args, words",
    [
        ("experiments/eval.py", ["--workdir=/nonexistent/run"], "has no checkpoints/ folder"),
        ("glam_jax/param_count.py", ["--config.moe.routr=x"], 'did you mean "router"?'),
        ("experiments/generate.py", ["--workdir=/nonexistent/run"], "/nonexistent/run"),
        ("experiments/export_hf.py", ["--out=/tmp/x"], "no Hugging Face family"),
    ],
)
def test_other_clis_refuse_bad_input_in_one_sentence(tool, args, words):
    _one_sentence(_cli(tool, f"--config={ROOT}/configs/glam_tiny.py", *args), words)


def test_bench_cli_refuses_a_bad_flag_in_one_sentence():
    _one_sentence(_cli("experiments/bench.py", "--iters=abc"), "--iters=abc")


def test_a_missing_config_file_is_one_sentence(tmp_path):
    proc = _cli("experiments/train.py", "--config=/nonexistent/cfg.py", f"--workdir={tmp_path}")
    _one_sentence(proc, "/nonexistent/cfg.py")


def test_glamjax_debug_shows_the_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, GLAMJAX_DEBUG="1")
    proc = subprocess.run(
        [
            sys.executable,
            f"{ROOT}/experiments/train.py",
            f"--config={ROOT}/configs/glam_tiny.py",
            f"--workdir={tmp_path}",
            "--config.train.steps=-5",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
        env=env,
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "train.steps=-5" in proc.stderr
