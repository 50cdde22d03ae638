"""Training end to end: exact resume, documents kept apart, no TensorFlow, clear input errors."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam_jax import steps, train
from glam_jax.errors import GlamError
from glam_jax.metrics_writer import read_metrics
from tests.helpers import ROOT, tiny_config


def train_config(steps_: int, **train_overrides):
    config = tiny_config()
    config.model.vocab_size = 320
    config.train.steps = steps_
    config.train.log_every = 1
    config.train.eval_every = 0
    config.train.eval_batches = 2
    config.train.checkpoint_every = 10
    config.train.progress_bar = False
    config.train.learning_rate = 0.05
    config.train.warmup_steps = 5
    config.train.update(train_overrides)
    return config


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if "loss" in r}


def test_resume_reproduces_the_unbroken_run_bitwise(tmp_path):
    cache = str(tmp_path / "data")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    config = train_config(20)
    config.data.cache_dir = cache
    train.train_and_evaluate(config, str(straight))
    first = train_config(10)
    first.data.cache_dir = cache
    train.train_and_evaluate(first, str(broken))  # stops (and checkpoints) at step 10
    assert sorted(_losses(broken)) == list(range(1, 11))
    train.train_and_evaluate(config, str(broken))  # resumes from step 10 up to 20
    a, b = _losses(straight), _losses(broken)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert [a[s] for s in range(1, 21)] == [b[s] for s in range(1, 21)]  # bitwise equal floats
    assert a[20] < a[1]
    # experiments/eval.py's entry point restores the final checkpoint and reproduces its eval.
    last_eval = [r for r in read_metrics(str(straight)) if "eval_loss" in r][-1]
    again = train.evaluate_checkpoint(config, str(straight), max_batches=2)
    assert again["step"] == 20
    assert abs(again["eval_loss"] - last_eval["eval_loss"]) < 1e-6


def test_resume_refuses_a_workdir_of_another_model_shape(tmp_path):
    config = train_config(2)
    config.data.cache_dir = str(tmp_path / "data")
    train.train_and_evaluate(config, str(tmp_path / "run"))
    config.model.embed_dim = 48
    with pytest.raises(
        GlamError, match="different model .*model.embed_dim: checkpoint 32 vs config 48"
    ):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_packed_documents_do_not_see_each_other():
    """A token's logits do not change when another document of the same row changes."""
    config = tiny_config()
    config.moe.capacity_factor_eval = float(config.moe.num_experts)  # nothing drops
    model = steps.build_model(config)
    s = config.train.seq_len
    rng = np.random.RandomState(0)
    tokens = rng.randint(1, config.model.vocab_size, (1, s)).astype(np.int32)
    cut = 13
    segment_ids = np.where(np.arange(s) < cut, 1, 2)[None].astype(np.int32)
    positions = np.where(np.arange(s) < cut, np.arange(s), np.arange(s) - cut)[None]
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(tokens))["params"]

    def logits(t):
        out, _ = model.apply({"params": params}, jnp.asarray(t), segment_ids, positions)
        return np.asarray(out)

    base = logits(tokens)
    other_first = tokens.copy()
    other_first[0, :cut] = rng.randint(1, config.model.vocab_size, cut)
    np.testing.assert_allclose(logits(other_first)[0, cut:], base[0, cut:], atol=1e-6)
    other_second = tokens.copy()
    other_second[0, cut:] = rng.randint(1, config.model.vocab_size, s - cut)
    np.testing.assert_allclose(logits(other_second)[0, :cut], base[0, :cut], atol=1e-6)
    # Without segment ids, the second document does see the first: the test can fail.
    unmasked = model.apply({"params": params}, jnp.asarray(other_first))[0]
    plain = model.apply({"params": params}, jnp.asarray(tokens))[0]
    assert np.max(np.abs(np.asarray(unmasked)[0, cut:] - np.asarray(plain)[0, cut:])) > 1e-4


def test_training_never_imports_tensorflow(tmp_path):
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]);"
        "from tests.test_train import train_config; from glam_jax import train;"
        "c = train_config(2); train.train_and_evaluate(c, sys.argv[2]);"
        "print(json.dumps('tensorflow' in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, ROOT, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) is False


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("data.text_files", "/nonexistent/corpus.txt", "/nonexistent/corpus.txt"),
        ("data.tfds_name", "no_such_dataset_xyz", "no_such_dataset_xyz"),
        ("train.seq_len", 4096, "larger than model.max_len"),
        ("data.corpus", "war_and_peace", "war_and_peace"),
    ],
)
def test_bad_training_input_is_one_clear_sentence(tmp_path, field, value, words):
    config = train_config(1)
    part, key = field.split(".")
    config[part][key] = value
    with pytest.raises(GlamError, match=words) as info:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert "\n" not in str(info.value)


def test_empty_corpus_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    config = train_config(1)
    config.data.text_files = str(empty)
    with pytest.raises(GlamError, match="empty"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
