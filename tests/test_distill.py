"""Distillation: the loss against numpy, the student's size and initialisation, bad input in one
sentence, and an end-to-end run from a tiny trained MoE teacher."""

import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam_jax import checkpoint, distill, flops, sharding, steps, train
from glam_jax.data import tokenizer as tokenizer_lib
from glam_jax.data.text_corpus import embedded_corpus
from glam_jax.distill import DistillError, DistillSettings
from glam_jax.metrics_writer import read_metrics
from glam_jax.optim import make_optimizer
from tests.helpers import ROOT, tiny_config

# --dist loadgroup (pyproject.toml) gives this module to one xdist worker: the teacher fixtures
# are built once, not once per xdist worker.
pytestmark = pytest.mark.xdist_group("distill")

# ---- the loss against numpy -------------------------------------------------------------------


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference(z, t, targets, w, hard, soft, temp, t2):
    """(loss, d loss / d z) of the mix, by hand in float64."""
    z, t, w = z.astype(np.float64), t.astype(np.float64), w.astype(np.float64)
    denom = max(w.sum(), 1.0)
    logq1 = _log_softmax(z)
    onehot = np.eye(z.shape[-1])[targets]
    hard_ce = -(onehot * logq1).sum(-1)
    p = np.exp(_log_softmax(t / temp))
    logq = _log_softmax(z / temp)
    soft_ce = -(p * logq).sum(-1)
    scale = temp**2 if t2 else 1.0
    loss = (hard * (hard_ce * w).sum() + soft * scale * (soft_ce * w).sum()) / denom
    grad = (w / denom)[..., None] * (
        hard * (np.exp(logq1) - onehot) + soft * scale * (np.exp(logq) - p) / temp
    )
    kl = soft_ce + (p * np.log(p)).sum(-1)
    return (
        loss,
        grad,
        (hard_ce * w).sum() / denom,
        (soft_ce * w).sum() / denom,
        (kl * w).sum() / denom,
    )


@pytest.mark.parametrize(
    "hard, soft, temp, t2",
    [
        (0.25, 0.75, 1.0, False),
        (0.5, 0.3, 2.0, True),
        (0.1, 0.9, 0.5, False),
        (1.0, 0.0, 3.0, True),
    ],
)
def test_distillation_loss_matches_numpy_in_value_and_gradient(hard, soft, temp, t2):
    rng = np.random.RandomState(0)
    b, s, v = 2, 5, 11
    z = rng.normal(0, 2, (b, s, v)).astype(np.float32)
    t = rng.normal(0, 2, (b, s, v)).astype(np.float32)
    targets = rng.randint(0, v, (b, s)).astype(np.int32)
    w = np.ones((b, s), np.float32)
    w[0, 3:] = 0.0  # padding counts in neither term
    settings = DistillSettings(hard, soft, temp, t2)

    def loss(z_, t_):
        return distill.distillation_loss(z_, t_, jnp.asarray(targets), jnp.asarray(w), settings)

    (value, parts), (dz, dt) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(z, t)
    ref_loss, ref_grad, ref_hard, ref_soft, ref_kl = _reference(
        z, t, targets, w, hard, soft, temp, t2
    )
    np.testing.assert_allclose(float(value), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(float(parts["ce_loss"]), ref_hard, rtol=1e-5)
    np.testing.assert_allclose(float(parts["soft_loss"]), ref_soft, rtol=1e-5)
    np.testing.assert_allclose(float(parts["soft_kl"]), ref_kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dz), ref_grad, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(dz)[0, 3:] == 0.0)
    assert np.all(np.asarray(dt) == 0.0)  # nothing flows into the teacher


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"hard_weight": 1.5}, "hard_weight=1.5 is outside [0, 1]"),
        ({"soft_weight": -0.1}, "soft_weight=-0.1 is outside [0, 1]"),
        ({"hard_weight": 0.0, "soft_weight": 0.0}, "leave nothing to train on"),
        ({"temperature": 0.0}, "temperature=0.0 is not a positive number"),
    ],
)
def test_bad_settings_are_refused(kwargs, words):
    with pytest.raises(DistillError, match=words.replace("[", r"\[").replace("]", r"\]")):
        DistillSettings(**kwargs)


# ---- the student's size and initialisation ----------------------------------------------------


def moe_teacher_config(**moe):
    """tiny_config top-2 with half-width experts: FLOP-matched to the dense model of its widths."""
    config = tiny_config(**{"expert_mlp_dim": 32, **moe})  # mlp_dim 64
    config.model.vocab_size = 320
    return config


@pytest.mark.parametrize(
    "moe, width",
    [
        ({}, 64),  # top-2, experts of half width
        ({"router": "switch_top1", "num_selected": 1, "expert_mlp_dim": 0}, 64),  # Switch
        ({"expert_mlp_dim": 0}, 96),  # GLaM top-2 full width: (64 + 2 * 64) / 2
        ({"every": 1, "moe_index_in_block": 0, "expert_mlp_dim": 48}, 96),  # every layer MoE
    ],
)
def test_student_has_the_teachers_activated_ffn_flops(moe, width):
    teacher = moe_teacher_config(**moe)
    student = distill.student_config(teacher)
    assert student.moe.num_experts == 0 and student.model.mlp_dim == width
    assert student.model.num_layers == teacher.model.num_layers
    # Activated FLOPs per token agree up to the router (3 x 2 x M x E per MoE layer).
    moe_layers = teacher.model.num_layers // teacher.moe.every
    router = 3 * 2 * teacher.model.embed_dim * teacher.moe.num_experts * moe_layers
    t, s = flops.count(teacher), flops.count(student)
    assert t.flops_per_token - s.flops_per_token == router
    assert teacher.moe.num_experts == 8  # the teacher's config is left alone


def _sharded_params(config, seed):
    """Fresh params as training creates them: sharded over the 8 test devices."""
    config = config.copy_and_resolve_references()
    config.seed = seed
    model = steps.build_model(config)
    mesh = sharding.make_mesh(sharding.mesh_shape((-1, 1, 1), jax.device_count()))
    state, _ = steps.create_train_state(config, model, make_optimizer(config.train), mesh)
    return state.params


def _random_params(config, seed):
    """Random numpy params of the model's shapes (no compilation)."""
    rng = np.random.RandomState(seed)
    abstract = nn.unbox(steps.abstract_boxed_params(steps.build_model(config), config))
    return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)


def _flat(params):
    return {
        "/".join(str(p.key) for p in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def test_student_init_copies_every_non_expert_weight_exactly():
    teacher_config = moe_teacher_config()
    teacher = _sharded_params(teacher_config, seed=1)
    student = _sharded_params(distill.student_config(teacher_config), seed=2)
    fresh_before = _flat(student)
    params, fresh = distill.init_student_from_teacher(student, teacher)
    got, want = _flat(params), _flat(teacher)
    moe_position = ["blocks/layer_1/ffn/wi_0", "blocks/layer_1/ffn/wi_1", "blocks/layer_1/ffn/wo"]
    assert sorted(fresh) == moe_position
    copied = sorted(set(got) - set(moe_position))
    for name in (
        "embed/embedding",
        "blocks/layer_0/attention/rel_bias",
        "blocks/layer_1/attention/query",
        "blocks/layer_1/pre_ffn_norm/scale",
        "blocks/layer_0/ffn/wi_0",  # the dense FFN layers
        "final_norm/scale",
    ):
        assert name in copied
    for name in copied:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        assert not np.array_equal(fresh_before[name], want[name]) or name.endswith("scale")
    for name in moe_position:  # the MoE position keeps the student's own fresh FFN
        np.testing.assert_array_equal(got[name], fresh_before[name])
        assert not any(np.array_equal(got[name], leaf) for leaf in want.values())
    # Copies live in the student's sharding and are new buffers: the train step donates the
    # student's, and the teacher's must outlive that.
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(student), strict=True)
    assert all(a.sharding == b.sharding for a, b in pairs)
    jax.tree.map(lambda leaf: leaf.delete(), params)
    assert np.isfinite(np.asarray(teacher["embed"]["embedding"])).all()


def test_student_init_with_wider_ffn_leaves_the_dense_ffns_fresh_too():
    teacher_config = moe_teacher_config(expert_mlp_dim=0)  # GLaM-style: student FFN 96 wide
    teacher = _random_params(teacher_config, 1)
    student = _random_params(distill.student_config(teacher_config), 2)
    params, fresh = distill.init_student_from_teacher(student, teacher)
    assert sorted(n.split("/")[1] for n in fresh) == ["layer_0"] * 3 + ["layer_1"] * 3
    got, want = _flat(params), _flat(teacher)
    for name in set(got) - set(fresh):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_student_init_refuses_other_non_ffn_shapes():
    teacher_config = moe_teacher_config()
    other = distill.student_config(teacher_config)
    other.model.head_dim = 8
    with pytest.raises(DistillError, match="attention/.* cannot come from the teacher"):
        distill.init_student_from_teacher(
            _random_params(other, 2), _random_params(teacher_config, 1)
        )


# ---- end to end from a tiny trained teacher ---------------------------------------------------


def _train_config(steps_, cache, **moe):
    config = moe_teacher_config(**moe)
    config.data.cache_dir = cache
    t = config.train
    t.steps, t.log_every, t.eval_every, t.eval_batches, t.checkpoint_every = steps_, 1, 0, 2, 0
    t.progress_bar = False
    t.optimizer, t.learning_rate, t.warmup_steps = "adamw", 1e-2, 3
    t.decay = "constant"
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MoE teacher (dropless dispatch) trained 20 steps, and a dense model trained 5."""
    root = tmp_path_factory.mktemp("distill")
    cache = str(root / "data")
    teacher = _train_config(20, cache, dispatch="dropless")
    train.train_and_evaluate(teacher, str(root / "teacher"))
    dense = _train_config(5, cache, num_experts=0)
    train.train_and_evaluate(dense, str(root / "dense"))
    return root


def _final_eval(workdir):
    return [r for r in read_metrics(str(workdir)) if "eval_loss" in r][-1]["eval_loss"]


def test_distillation_end_to_end(trained, tmp_path):
    workdir = tmp_path / "student"
    result = distill.train_student(
        str(trained / "teacher"),
        str(workdir),
        config_overrides={"train.steps": 12},
        dense_baseline_workdir=str(trained / "dense"),
    )
    with open(workdir / distill.RESULT_FILE) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(result))
    numbers = [v for v in saved.values() if isinstance(v, int | float) and not isinstance(v, bool)]
    assert numbers and all(math.isfinite(v) for v in numbers)
    assert saved["steps"] == 12 and saved["tokens"] == 12 * 8 * 32
    assert (saved["hard_weight"], saved["soft_weight"], saved["init_from_teacher"]) == (
        0.25,
        0.75,
        True,
    )
    assert saved["student"]["num_experts"] == 0 and saved["teacher"]["num_experts"] == 8
    # Teacher and dense baseline are scored on the held-out batches of their own final evals.
    assert abs(saved["teacher_eval_loss"] - _final_eval(trained / "teacher")) < 1e-5
    assert abs(saved["dense_eval_loss"] - _final_eval(trained / "dense")) < 1e-5
    assert abs(saved["student_eval_loss"] - _final_eval(workdir)) < 1e-9
    dense, student, teacher = (saved[f"{k}_eval_loss"] for k in ("dense", "student", "teacher"))
    assert teacher < dense
    assert saved["retained_fraction"] == pytest.approx((dense - student) / (dense - teacher))
    # The student's losses fall (means of the first and last 4 steps), and it started from the
    # teacher: its first CE is far below a fresh model's ln V, its output close to the teacher's
    # (the fresh FFNs in the MoE positions start near zero).
    rows = [r for r in read_metrics(str(workdir)) if "loss" in r]
    assert len(rows) == 12
    for key in ("loss", "ce_loss"):
        first, last = (np.mean([r[key] for r in part]) for part in (rows[:4], rows[-4:]))
        assert last < first, key
    assert saved["train_ce_loss_first"] == rows[0]["ce_loss"] < math.log(320) - 0.3
    assert 0 <= rows[0]["soft_kl"] < 0.01
    assert len(saved["fresh_params"]) == 3


# ---- bad input in one sentence ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_teacher(tmp_path_factory):
    """A teacher workdir as far as the checks before training read it: config.json naming a
    tokenizer, and a checkpoint step directory; plus a second, different tokenizer."""
    root = tmp_path_factory.mktemp("fake")
    text = embedded_corpus("tinyshakespeare").read_text()[:100_000].split("\n\n")
    for kind in ("unigram", "bpe"):
        model = tokenizer_lib.train_tokenizer(text, vocab_size=320, model_type=kind, seed=0)
        (root / f"{kind}.model").write_bytes(model)
    config = moe_teacher_config()
    config.data.tokenizer_path = str(root / "unigram.model")
    for name in ("teacher", "dense"):
        os.makedirs(root / name / "checkpoints" / "20")
        checkpoint.save_run_config(config, str(root / name))
    os.makedirs(root / "empty")
    return root


def test_student_refuses_another_tokenizer(fake_teacher, tmp_path):
    with pytest.raises(DistillError, match="is another tokenizer than the teacher's"):
        distill.train_student(
            str(fake_teacher / "teacher"),
            str(tmp_path / "student"),
            config_overrides={"data.tokenizer_path": str(fake_teacher / "bpe.model")},
        )


def test_dense_baseline_with_another_vocabulary_is_refused(fake_teacher, tmp_path):
    dense = str(tmp_path / "dense")
    os.makedirs(os.path.join(dense, "checkpoints", "5"))
    config = checkpoint.load_run_config(str(fake_teacher / "dense"))
    config.model.vocab_size = 512
    checkpoint.save_run_config(config, dense)
    with pytest.raises(DistillError, match="dense baseline has model.vocab_size=512"):
        distill.train_student(
            str(fake_teacher / "teacher"), str(tmp_path / "student"), dense_baseline_workdir=dense
        )


def test_dense_baseline_with_another_tokenizer_is_refused(fake_teacher, tmp_path):
    dense = str(tmp_path / "dense")
    os.makedirs(os.path.join(dense, "checkpoints", "5"))
    config = checkpoint.load_run_config(str(fake_teacher / "dense"))
    config.data.tokenizer_path = str(fake_teacher / "bpe.model")
    checkpoint.save_run_config(config, dense)
    with pytest.raises(DistillError, match="dense baseline's tokenizer .*bpe.model is another"):
        distill.train_student(
            str(fake_teacher / "teacher"), str(tmp_path / "student"), dense_baseline_workdir=dense
        )


@pytest.mark.parametrize(
    "args, words",
    [
        (
            ["--teacher_workdir={root}/nowhere"],
            "teacher_workdir='{root}/nowhere' is not a directory",
        ),
        (["--teacher_workdir={root}/empty"], "teacher_workdir='{root}/empty' holds no checkpoint"),
        (["--hard_weight=1.5"], "hard_weight=1.5 is outside [0, 1]"),
        (["--config.model.vocab_size=512"], "student has model.vocab_size=512 but the teacher 320"),
        (
            ["--config.data.tokenizer_path={root}/bpe.model"],
            "is another tokenizer than the teacher's",
        ),
    ],
)
def test_cli_refuses_bad_input_in_one_sentence(fake_teacher, args, words):
    root = str(fake_teacher)
    argv = [f"--teacher_workdir={root}/teacher", f"--workdir={root}/never"]
    proc = subprocess.run(
        [
            sys.executable,
            f"{ROOT}/experiments/distill.py",
            *argv,
            *(a.format(root=root) for a in args),  # a later flag wins
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert words.format(root=root) in lines[0]
    assert not os.path.exists(f"{root}/never")
