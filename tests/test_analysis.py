"""Routing analysis (issue 15): collection equals what the MoE layers dispatch and leaves the
logits bitwise unchanged; the statistics equal brute-force numpy references on hand-made
routing; the same analysis on a (2, 4, 1) mesh; bad input refused in one sentence; the CLI on a
tiny workdir and on the HF Mixtral fixture."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam_jax import checkpoint, optim, sharding, steps
from glam_jax.analysis import (
    AnalysisError,
    RoutingCollector,
    analyze,
    parse_text_files,
    regex_class,
    select_classes,
)
from glam_jax.analysis import stats as stats_lib
from glam_jax.analysis.texts import TextBatch, read_text, text_batches
from glam_jax.analysis.token_classes import TokenClassifier, token_words
from glam_jax.data.tokenizer import load_tokenizer, train_tokenizer
from glam_jax.model import cast_for_compute
from glam_jax.moe import MoE
from glam_jax.moe import routers as routing
from tests.helpers import ROOT, assert_one_sentence, random_batch, tiny_config

FIXTURE = os.path.join(ROOT, "tests", "testdata", "hf_mixtral_tiny")
SHAKESPEARE = os.path.join(ROOT, "glam_jax", "data", "corpus", "tinyshakespeare.txt")
CODE = os.path.join(ROOT, "glam_jax", "analysis", "*.py")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Two small domains: prose (a slice of Shakespeare) and code (this package's analysis)."""
    folder = tmp_path_factory.mktemp("texts")
    with open(SHAKESPEARE) as f:
        (folder / "prose.txt").write_text(f.read(6000))
    return folder


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory, texts):
    """A 256-piece SentencePiece model (tiny_config's vocabulary) of prose and code."""
    docs = [(texts / "prose.txt").read_text()] + [read_text(p) for p in _code_files()]
    path = tmp_path_factory.mktemp("tok") / "spm.model"
    path.write_bytes(train_tokenizer(docs, vocab_size=256, model_type="unigram", seed=0))
    return str(path)


def _code_files():
    return parse_text_files(f"code={CODE}")[0].files


def _domains(texts):
    return parse_text_files(f"prose={texts / 'prose.txt'},code={CODE}")


def _init(config, seed=0):
    model = steps.build_model(config)
    ids = jnp.zeros((1, config.train.seq_len), jnp.int32)
    return nn.unbox(model.init({"params": jax.random.PRNGKey(seed)}, ids)["params"])


# ---- collection ------------------------------------------------------------------------------
def _np_expert(p, e, x_m):
    """Gated GELU expert (tanh approximation), as MoE builds it."""
    a = x_m @ p["wi_0"][e]
    gelu = 0.5 * a * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (a + 0.044715 * a**3)))
    return (gelu * (x_m @ p["wi_1"][e])) @ p["wo"][e]


def test_collected_routing_is_what_each_moe_layer_dispatches():
    """Scanned model, collected on one device, against the layers called one by one: the
    unrolled twin (same weights) records each MoE layer's input and output; the router called
    directly on that input gives the same ids and gates, and sum_k gate_k * expert_k(x) built
    from the collected routing reproduces the layer's output (capacity large: nothing drops)."""
    config = tiny_config(capacity_factor_eval=8.0)
    params = _init(config)
    batch = random_batch(config)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    _, ids, gates = RoutingCollector(config, mesh, return_logits=False)(
        params, batch["inputs"], batch["segment_ids"], batch["positions"]
    )
    num_blocks = config.model.num_layers // config.moe.every
    assert ids.shape == gates.shape == (num_blocks, 8, 32, 2)

    unrolled = config.copy_and_resolve_references()
    unrolled.model.scan_layers = False
    per_block = {
        f"blocks_{i}": jax.tree.map(lambda a, i=i: a[i], params["blocks"])
        for i in range(num_blocks)
    }
    flat_params = {**{k: v for k, v in params.items() if k != "blocks"}, **per_block}
    seen = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, MoE) and context.method_name == "__call__":
            seen.append((np.asarray(args[0]), np.asarray(out[0])))
        return out

    with nn.intercept_methods(record):
        steps.build_model(unrolled).apply(
            {"params": flat_params}, batch["inputs"], batch["segment_ids"], batch["positions"]
        )
    assert len(seen) == num_blocks
    for layer, (x_btm, y_btm) in enumerate(seen):
        p = jax.tree.map(np.asarray, per_block[f"blocks_{layer}"]["layer_1"]["moe"])
        logits = jnp.einsum("btm,me->bte", x_btm, p["router"])
        direct = routing.gshard_top2(logits, rng=None, train=False, second_expert_policy="all")
        np.testing.assert_array_equal(ids[layer], np.asarray(direct.expert_index))
        np.testing.assert_allclose(gates[layer], direct.combine_weights, rtol=1e-6, atol=1e-7)
        y_ref = np.zeros_like(y_btm)
        for b, t, j in itertools.product(range(8), range(32), range(2)):
            y_ref[b, t] += gates[layer, b, t, j] * _np_expert(p, ids[layer, b, t, j], x_btm[b, t])
        np.testing.assert_allclose(y_ref, y_btm, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scan", [True, False])
def test_collection_leaves_logits_bitwise_unchanged(scan):
    config = tiny_config()
    config.model.scan_layers = scan
    params = _init(config)
    batch = random_batch(config, seed=1)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    model = steps.build_model(config)
    plain = jax.jit(
        lambda p, x, s, q: model.apply({"params": cast_for_compute(p, jnp.float32)}, x, s, q)[0]
    )(params, batch["inputs"], batch["segment_ids"], batch["positions"])
    logits, ids, _ = RoutingCollector(config, mesh, return_logits=True)(
        params, batch["inputs"], batch["segment_ids"], batch["positions"]
    )
    assert np.array_equal(np.asarray(plain), np.asarray(logits))
    assert ids.shape[0] == 2 and ids.min() >= 0 and ids.max() < config.moe.num_experts


# ---- statistics against brute force --------------------------------------------------------
def _np_mi(joint):
    """sum_xy p(x,y) log2 p(x,y) / (p(x) p(y)) by explicit loops."""
    joint = np.asarray(joint, float)
    n = joint.sum()
    px, py = joint.sum(1) / n, joint.sum(0) / n
    total = 0.0
    for x, y in itertools.product(range(joint.shape[0]), range(joint.shape[1])):
        pxy = joint[x, y] / n
        if pxy > 0:
            total += pxy * math.log2(pxy / (px[x] * py[y]))
    return total


def test_repeat_rates_and_mutual_information_match_numpy_references():
    """Hand-made routing of 2 layers, 3 rows (domains a, b, a), 6 tokens, top-2 of 4 experts:
    repeat rates counted pair by pair, chance rates as the mean over all ordered token pairs of
    one domain (independent draws from the observed choices), MI by explicit sums."""
    rng = np.random.RandomState(0)
    l, b, s, k, e, v = 2, 3, 6, 2, 4, 5
    ids = np.stack([rng.permutation(e)[:k] for _ in range(l * b * s)]).reshape(l, b, s, k)
    ids[0, 0, :, 0] = [1, 1, 1, 2, 2, 3]  # long top-1 runs in layer 0, row 0
    ids[0, 0, :, 1] = [0, 2, 3, 0, 1, 0]
    gates = rng.uniform(size=(l, b, s, k))
    tokens = rng.randint(0, v, size=(b, s))
    segment = np.array([[1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    scored = segment > 0
    scored[1, 0] = False  # a BOS
    domain = np.array([0, 1, 0])
    token_class = np.array([0, 1, 1, 2, 0])
    batch = TextBatch(tokens, token_class[tokens], segment, np.zeros_like(tokens), scored, domain)
    st = stats_lib.RoutingStats(
        num_layers=l,
        num_experts=e,
        k=k,
        domains=["a", "b"],
        class_names=["x", "y", "z"],
        vocab_size=v,
    )
    st.update(ids, gates, tokens, token_class[tokens], scored, batch.pairs, domain)
    out = st.summary()

    for layer in range(l):
        pairs = same = overlap = 0
        for r, t in itertools.product(range(b), range(1, s)):
            if scored[r, t] and scored[r, t - 1] and segment[r, t] == segment[r, t - 1]:
                pairs += 1
                same += ids[layer, r, t, 0] == ids[layer, r, t - 1, 0]
                overlap += bool(set(ids[layer, r, t]) & set(ids[layer, r, t - 1]))
        assert out["repeat_rate_top1"][layer] == pytest.approx(same / pairs)
        assert out["repeat_rate_topk"][layer] == pytest.approx(overlap / pairs)

        chance1, chancek, dom_pairs = [], [], []
        for d in range(2):
            toks = [(r, t) for r in range(b) for t in range(s) if scored[r, t] and domain[r] == d]
            sets = [set(ids[layer, r, t]) for r, t in toks]
            top1 = [ids[layer, r, t, 0] for r, t in toks]
            chance1.append(np.mean([x == y for x in top1 for y in top1]))
            chancek.append(np.mean([bool(x & y) for x in sets for y in sets]))
            dom_pairs.append(
                sum(
                    scored[r, t] and scored[r, t - 1] and segment[r, t] == segment[r, t - 1]
                    for r in range(b)
                    if domain[r] == d
                    for t in range(1, s)
                )
            )
        w = np.array(dom_pairs) / sum(dom_pairs)
        assert out["repeat_rate_chance"][layer] == pytest.approx(float(w @ chance1))
        assert out["repeat_rate_topk_chance"][layer] == pytest.approx(float(w @ chancek))
        per_a = out["repeat_rate_per_domain"]["a"]
        assert per_a["top1_chance"][layer] == pytest.approx(chance1[0])

        joint_class, joint_domain = np.zeros((e, 3)), np.zeros((e, 2))
        for r, t in itertools.product(range(b), range(s)):
            if scored[r, t]:
                joint_class[ids[layer, r, t, 0], token_class[tokens[r, t]]] += 1
                joint_domain[ids[layer, r, t, 0], domain[r]] += 1
        assert out["mi_token_class"][layer] == pytest.approx(_np_mi(joint_class))
        assert out["mi_domain"][layer] == pytest.approx(_np_mi(joint_domain))
        joint_dce = np.zeros((2, 3, e))
        for r, t in itertools.product(range(b), range(s)):
            if scored[r, t]:
                joint_dce[domain[r], token_class[tokens[r, t]], ids[layer, r, t, 0]] += 1
        n = joint_dce.sum()
        given_d = sum(m.sum() / n * _np_mi(m) for m in joint_dce)
        given_c = sum(joint_dce[:, c].sum() / n * _np_mi(joint_dce[:, c]) for c in range(3))
        assert out["mi_token_class_given_domain"][layer] == pytest.approx(given_d)
        assert out["mi_domain_given_token_class"][layer] == pytest.approx(given_c)
    assert out["repeat_rate_top1"][0] > out["repeat_rate_chance"][0]  # the planted runs
    assert out["repeat_rate_topk_chance_uniform"] == pytest.approx(1 - 1 / 6)  # C(2,2)/C(4,2)


def test_js_divergence_and_uniform_chance_references():
    p = np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    m = p.mean(0)
    kl = [sum(pi * math.log2(pi / mi) for pi, mi in zip(row, m, strict=True) if pi) for row in p]
    assert stats_lib.js_divergence(p) == pytest.approx(np.mean(kl))
    assert stats_lib.js_divergence(np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(1.0)
    assert stats_lib.uniform_topk_chance(8, 2) == pytest.approx(1 - 15 / 28)  # Mixtral's 46%


def test_token_classes_follow_the_word_a_piece_sits_in(tokenizer_path):
    """Each token of a known line gets the class of its word (or its own text outside words),
    whatever pieces the 256-piece tokenizer cuts; a user class (tried first) takes its words."""
    text = "def foo_bar(x):\n    return 42 + The\nking of myVar"
    expected = {
        "def": "code_keyword",
        "foo_bar": "identifier",
        "x": "other",
        "return": "code_keyword",
        "42": "digits",
        "The": "function_word",
        "king": "vowels",
        "of": "function_word",
        "myVar": "identifier",
    }
    classifier = TokenClassifier(select_classes(extra=[regex_class("vowels=k[aeiou]ng")]))
    assert classifier.names[0] == "vowels" and classifier.names[-2:] == ["other", "special"]
    tok = load_tokenizer(tokenizer_path)
    ids, classes = classifier.encode(tok, text)
    surfaces = [p.surface for p in tok.encode(text, return_type="proto").pieces]
    assert "".join(surfaces) == text and len(ids) == len(classes) == len(surfaces)
    words = token_words(surfaces)
    for surface, word, c in zip(surfaces, words, classes, strict=True):
        name = classifier.names[c]
        if word:
            assert word in expected and name == expected[word], (surface, word, name)
        elif surface.strip():
            assert name == "punctuation", (surface, name)
        else:
            assert name == "whitespace", (surface, name)
    assert set(words) == set(expected) | {""}


# ---- a mesh, and batches ------------------------------------------------------------------
def test_analysis_on_a_2_4_1_mesh_equals_one_device(texts, tokenizer_path):
    config = tiny_config()
    params = _init(config, seed=3)
    tok = load_tokenizer(tokenizer_path)
    kwargs = dict(rows=8, length=32, max_tokens_per_domain=600, progress=False)
    one = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    mesh = sharding.make_mesh((2, 4, 1))
    s1, st1 = analyze(config, params, one, tok, _domains(texts), **kwargs)
    placed = jax.device_put(
        params,
        sharding.named_shardings(
            mesh, steps.param_partition_specs(steps.build_model(config), config)
        ),
    )
    s8, st8 = analyze(config, placed, mesh, tok, _domains(texts), **kwargs)
    assert s1["tokens"] == s8["tokens"] > 1000
    np.testing.assert_array_equal(st1.assign_lde, st8.assign_lde)
    np.testing.assert_array_equal(st1.pairs_ld, st8.pairs_ld)
    np.testing.assert_array_equal(st1.same_top1_ld, st8.same_top1_ld)
    for key in ("repeat_rate_top1", "repeat_rate_chance", "mi_token_class", "mi_domain"):
        assert s1[key] == pytest.approx(s8[key])
    assert s1["tokens_per_domain"][0] <= 600


def test_batches_pack_documents_and_mark_pairs(texts, tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    domains = _domains(texts)
    classifier = TokenClassifier(select_classes())
    batches = list(text_batches(domains, tok, classifier, rows=4, length=64, max_tokens=300))
    tokens = np.concatenate([bt.tokens[bt.domain == 1] for bt in batches])
    first = [tok.bos_id(), *tok.encode(read_text(domains[1].files[0]))]
    assert tokens.ravel()[:300].tolist() == first[:300]  # packed in order, up to the budget
    for bt in batches:
        assert not bt.pairs[:, 0].any()
        assert not (bt.pairs & ~bt.scored).any()
        assert (bt.tokens[bt.scored] != tok.bos_id()).all()
        assert (bt.token_class[bt.tokens == tok.bos_id()] == classifier.special).all()
        jumps = bt.segment_ids[:, 1:] != bt.segment_ids[:, :-1]
        assert not (bt.pairs[:, 1:] & jumps).any()
    assert sum(bt.scored[bt.domain == 0].sum() for bt in batches) <= 300


# ---- bad input -----------------------------------------------------------------------------
def _one_sentence(err) -> str:
    return assert_one_sentence(str(err.value))


def test_bad_input_is_refused_in_one_sentence(tmp_path, tokenizer_path):
    dense = tiny_config(num_experts=0)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    with pytest.raises(AnalysisError) as err:
        RoutingCollector(dense, mesh, return_logits=False)
    assert "no MoE layers (moe.num_experts=0)" in _one_sentence(err)

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    domains = parse_text_files(f"prose={empty}")
    tok = load_tokenizer(tokenizer_path)
    with pytest.raises(AnalysisError) as err:
        list(text_batches(domains, tok, TokenClassifier([]), rows=2, length=16, max_tokens=0))
    assert f"text file {str(empty)!r} is empty" in _one_sentence(err)

    with pytest.raises(AnalysisError) as err:
        select_classes(["punctuation", "verbs"])
    assert "token class 'verbs' is not known; valid: whitespace" in _one_sentence(err)
    with pytest.raises(AnalysisError) as err:
        parse_text_files(f"prose={tmp_path}/nothing*.txt")
    assert "matches no file" in _one_sentence(err)
    with pytest.raises(AnalysisError) as err:
        parse_text_files("just_a_path.txt")
    assert "write it as domain=GLOB" in _one_sentence(err)
    with pytest.raises(AnalysisError) as err:
        RoutingCollector(tiny_config(router="expert_choice"), mesh, return_logits=False)
    assert "expert_choice" in _one_sentence(err)


# ---- the command line ----------------------------------------------------------------------
TINY_FLAGS = [
    "--config=configs/glam_tiny.py",
    "--config.model.vocab_size=256",
    "--config.model.embed_dim=32",
    "--config.model.mlp_dim=64",
    "--config.model.num_heads=2",
    "--config.model.head_dim=16",
    "--config.train.seq_len=32",
    "--config.moe.group_size=32",
]


def _cli(*args, timeout=300):
    script = os.path.join(ROOT, "experiments", "analyze_experts.py")
    return subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=dict(os.environ, MPLBACKEND="Agg"),
    )


def _check_outputs(out, domains, layers):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["domains"] == domains and summary["num_moe_layers"] == layers
    for key in ("repeat_rate_top1", "repeat_rate_chance", "mi_token_class", "mi_domain"):
        assert len(summary[key]) == layers and all(np.isfinite(summary[key]))
    for name in ("expert_share_heatmap.png", "repeat_rate.png", "mutual_information.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "| MoE layer |" in (out / "summary.md").read_text()
    return summary


def test_cli_on_a_tiny_workdir(tmp_path, texts, tokenizer_path):
    """A checkpoint written the way training writes it (step 0 of the tiny config), analysed
    by --workdir and --config like every other tool; then a bad text spec is one line."""
    config = tiny_config()
    for flag in TINY_FLAGS[1:]:  # the same config the CLI will build from the flags
        key, value = flag[len("--config.") :].split("=")
        part, field = key.split(".")
        assert str(config[part][field]) == value
    workdir = tmp_path / "run"
    model, tx = steps.build_model(config), optim.make_optimizer(config.train)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    state, _ = steps.create_train_state(config, model, tx, mesh)
    ckpt = checkpoint.Checkpointer(str(workdir), config)
    ckpt.save(0, state, {})
    ckpt.close()
    out = tmp_path / "out"
    spec = f"--text_files=prose={texts / 'prose.txt'},code={CODE}"
    run = _cli(
        *TINY_FLAGS,
        f"--workdir={workdir}",
        f"--tokenizer={tokenizer_path}",
        spec,
        f"--out={out}",
        "--max_tokens_per_domain=500",
        "--rows=8",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = _check_outputs(out, ["prose", "code"], 2)
    assert summary["source"]["workdir"] == str(workdir)

    bad = _cli(*TINY_FLAGS, f"--workdir={workdir}", "--text_files=prose", f"--out={out}")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [
        "error: text spec 'prose' is not valid; write it as domain=GLOB."
    ]


def test_cli_on_the_hf_mixtral_fixture(tmp_path, texts):
    """--hf_dir with the fixture's own 128-piece vocabulary (a tokenizer.model trained here),
    on the default mesh of 8 CPU devices."""
    hf_dir = tmp_path / "hf"
    shutil.copytree(FIXTURE, hf_dir)
    text = (texts / "prose.txt").read_text()
    (hf_dir / "tokenizer.model").write_bytes(
        train_tokenizer([text], vocab_size=120, model_type="unigram", seed=0)
    )
    out = tmp_path / "out"
    run = _cli(
        f"--hf_dir={hf_dir}",
        f"--text_files=prose={texts / 'prose.txt'},code={CODE}",
        f"--out={out}",
        "--max_tokens_per_domain=400",
        "--rows=8",
        "--seq_len=32",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = _check_outputs(out, ["prose", "code"], 2)
    assert (summary["num_experts"], summary["k"]) == (4, 2)
    assert summary["moe_layer_index"] == [0, 1]
