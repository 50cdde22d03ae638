"""The wheel: `pip wheel` of the repository installs in a fresh venv, and its console scripts
train, evaluate, generate and count the tiny GLaM from a directory outside the checkout, on the
tiny Shakespeare corpus shipped inside the wheel.

The venv is made with `--without-pip`; the wheel goes in with this interpreter's pip
(`pip --python`), and the dependencies (jax, flax, ...) come from this test environment's
site-packages through a .pth file, so nothing is downloaded but the build backend. The test
checks that `glam_jax` is imported from the venv, not from the checkout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from glam_jax import flops
from glam_jax.metrics_writer import read_metrics
from glam_jax.presets import glam_tiny
from tests.helpers import ROOT

# --dist loadgroup (pyproject.toml) gives this module to one xdist worker: the wheel and venv
# fixtures are built once, not once per xdist worker.
pytestmark = pytest.mark.xdist_group("wheel")

SCRIPTS = ("glam-train", "glam-eval", "glam-generate", "glam-param-count", "glam-lm-eval")
TRAIN_FLAGS = (
    "--config.train.steps=8",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.eval_batches=2",
    "--config.train.progress_bar=False",
    "--config.train.warmup_steps=4",
    "--config.model.vocab_size=320",  # a quicker SentencePiece training than the preset's 2048
)


def _run(args, cwd, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built by pip from a copy of the checkout's package sources."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(os.path.join(ROOT, "glam_jax"), src / "glam_jax", ignore=ignore)
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)], tmp, timeout=600)
    (path,) = (tmp / "dist").glob("glam_jax-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh venv holding the wheel; the test environment's packages on its path."""
    path = tmp_path_factory.mktemp("venv") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], ROOT, timeout=300)
    python = str(path / "bin" / "python")
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], ROOT)
    # Every site directory this interpreter sees (a venv with --system-site-packages has two).
    parents = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
    for extra in (sysconfig.get_path("purelib"), sysconfig.get_path("platlib")):
        parents += [extra] if extra not in parents else []
    # Plain path lines: the parents' own .pth files (an editable glam_jax) are not processed.
    with open(os.path.join(purelib.strip(), "_test_env.pth"), "w") as f:
        f.write("\n".join(parents) + "\n")  # in this interpreter's order
    pip = [sys.executable, "-m", "pip", "--python", python]
    _run([*pip, "install", "-q", "--no-deps", "--no-index", str(wheel)], ROOT, timeout=300)
    return path


def test_the_wheel_holds_the_corpus_presets_and_console_scripts(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = zf.read(entry_points).decode()
    assert "glam_jax/data/corpus/tinyshakespeare.txt" in names
    assert "glam_jax/presets/glam_tiny.py" in names
    assert not [n for n in names if n.split("/")[0] in ("configs", "experiments", "tests")]
    for script in SCRIPTS:
        assert f"{script} = glam_jax." in scripts, scripts


@pytest.mark.slow
def test_console_scripts_train_the_tiny_model_outside_the_checkout(venv, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    bin_dir = venv / "bin"
    where = _run(
        [str(bin_dir / "python"), "-c", "import glam_jax; print(glam_jax.__file__)"], outside
    )
    assert where.strip().startswith(str(venv)), where  # the wheel's copy, not the checkout's
    for script in SCRIPTS:
        assert (bin_dir / script).is_file(), script

    counts = json.loads(
        _run([str(bin_dir / "glam-param-count"), "--config=glam_tiny", "--json"], outside)
    )
    assert counts["total_params"] == flops.count(glam_tiny.get_config()).total_params

    lm_eval = subprocess.run(
        [str(bin_dir / "glam-lm-eval"), "run", "--help"],
        cwd=outside,
        capture_output=True,
        text=True,
    )
    if importlib.util.find_spec("lm_eval") is None:  # without the [eval] extra: one sentence
        assert lm_eval.returncode == 1 and lm_eval.stderr.startswith("error: glam-lm-eval needs")
    else:
        assert lm_eval.returncode == 0 and "--model_args" in lm_eval.stdout, lm_eval.stderr[-2000:]

    workdir = outside / "run"
    _run(
        [str(bin_dir / "glam-train"), "--config=glam_tiny", f"--workdir={workdir}", *TRAIN_FLAGS],
        outside,
        timeout=600,
    )
    rows = read_metrics(str(workdir))
    losses = [r["loss"] for r in rows if "loss" in r]
    (final_eval,) = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(losses) == 8 and final_eval < losses[0]  # held out, after training < at start
    assert (workdir / "data" / "corpora").is_dir()  # the corpus came out of the wheel

    config = ["--config=glam_tiny", f"--workdir={workdir}", *TRAIN_FLAGS[-1:]]
    result = json.loads(
        _run([str(bin_dir / "glam-eval"), *config, "--batches=2", "--json"], outside)
    )
    assert result["step"] == 8 and result["eval_loss"] == pytest.approx(final_eval, abs=1e-5)
    generated = json.loads(
        _run(
            [str(bin_dir / "glam-generate"), *config, "--prompt=ROMEO:", "--max_new_tokens=3"]
            + ["--ignore_eos", "--warmup=0", "--json"],
            outside,
        )
    )
    assert [len(t) for t in generated["outputs"]] == [3]
