"""The lm-evaluation-harness adapter (glam_jax/lm_eval_model.py), offline.

The model is the tiny Hugging Face Mixtral fixture (tests/testdata/hf_mixtral_tiny, 8 CPU
devices) with a 120-piece SentencePiece model trained here on tiny Shakespeare. Every score the
adapter or the harness reports is checked against log-probabilities computed directly from the
model's logits, one unpadded sequence at a time, with numpy's log-softmax.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

# --dist loadgroup (pyproject.toml) gives this module to one xdist worker: the lm-eval model (a
# module fixture) is compiled once, not once per xdist worker.
pytestmark = pytest.mark.xdist_group("lm_eval")

lm_eval = pytest.importorskip("lm_eval", reason="the [eval] extra (lm-eval) is not installed")

from glam_jax import decode, sharding  # noqa: E402
from glam_jax.data.tokenizer import train_tokenizer  # noqa: E402
from glam_jax.errors import GlamError  # noqa: E402
from tests.helpers import ROOT  # noqa: E402

FIXTURE = os.path.join(ROOT, "tests", "testdata", "hf_mixtral_tiny")
TASK_DIR = os.path.join(ROOT, "tests", "testdata", "lm_eval")
TASK = "glam_line_endings"


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No network for the Hugging Face libraries lm-eval uses; their caches in a temp dir."""
    cache = tmp_path_factory.mktemp("hf_cache")
    env = dict(
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(cache),
        HF_DATASETS_CACHE=str(cache / "datasets"),
        TRANSFORMERS_OFFLINE="1",
    )
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "mixtral_tiny"
    shutil.copytree(FIXTURE, path)
    with open(os.path.join(ROOT, "glam_jax", "data", "corpus", "tinyshakespeare.txt")) as f:
        text = f.read(30_000)
    proto = train_tokenizer([text], vocab_size=120, model_type="unigram", seed=0)
    (path / "tokenizer.model").write_bytes(proto)
    return str(path)


@pytest.fixture(scope="module")
def lm(offline, hf_dir):
    from glam_jax import lm_eval_model

    return lm_eval_model.GlamLM(hf_dir=hf_dir, batch_size=4)


class Direct:
    """log p of tokens from the model's logits: one row on one device, numpy log-softmax.

    Rows are right-padded to one length (one compile): with causal attention and MoE layers
    that never drop a token (decode settings), tokens after a position do not change it."""

    def __init__(self, lm):
        self.lm = lm
        gen = decode.Generator(lm.loaded.config)  # a 1-device mesh
        self.mesh = gen.mesh
        self.params = jax.tree.map(np.asarray, lm.loaded.params)
        self.forward = jax.jit(lambda p, t: gen.model.apply({"params": p}, t)[0])

    def logits(self, row: list[int]) -> np.ndarray:
        """Logits [len(row), vocab] after each token of `row`."""
        padded = np.zeros((1, self.lm.max_length), np.int32)
        padded[0, : len(row)] = row
        with sharding.use_mesh(self.mesh):
            return np.asarray(self.forward(self.params, padded))[0, : len(row)]

    def logprobs(self, row: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(log p(row[i] | row[:i]), row[i] is the argmax) for i >= 1."""
        logits = self.logits(row[:-1]).astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        targets = np.array(row[1:])
        return logp[np.arange(len(targets)), targets], logits.argmax(-1) == targets

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """lm-eval's causal rule: trailing context spaces move to the continuation, tokens
        past the context's own are the continuation, the last max_length + 1 tokens kept."""
        sp, bos, limit = self.lm.sp, self.lm.sp.bos_id(), self.lm.max_length
        if not context:
            ctx, cont = [bos], sp.encode(continuation)
        else:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole, ctx = [bos, *sp.encode(context + continuation)], [bos, *sp.encode(context)]
            cont = whole[len(ctx) :]
        logp, greedy = self.logprobs((ctx + cont)[-(limit + 1) :])
        return float(logp[-len(cont) :].sum()), bool(greedy[-len(cont) :].all())


@pytest.fixture(scope="module")
def direct(lm):
    return Direct(lm)


def _requests(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


LONG = "ROMEO: " + "But soft, what light through yonder window breaks? " * 12


def test_loglikelihood_equals_summed_logprobs_from_our_logits(lm, direct):
    pairs = [
        ("To be, or not to be:", " that is the question"),
        ("First Citizen:\nBefore we proceed any further, hear me ", "speak."),  # trailing space
        ("", "All: Speak, speak."),  # empty context: BOS is the context
        ("ROMEO:", " O"),
        (LONG, " It is the east, and Juliet is the sun."),  # longer than max_length
    ]
    assert len(lm.tok_encode(LONG)) > lm.max_length  # the left truncation is exercised
    got = lm.loglikelihood(_requests("loglikelihood", pairs))
    want = [direct.loglikelihood(c, x) for c, x in pairs]
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=0, atol=1e-5)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert all(g[0] < 0 for g in got)


def test_a_greedy_continuation_is_reported_greedy(lm, direct):
    prompt = [lm.sp.bos_id(), *lm.sp.encode("KING RICHARD III:")]
    logp, _ = direct.logprobs(prompt + [0])
    row = list(prompt)
    for _ in range(3):  # the model's own argmax tokens, one at a time
        logits = direct.logits(row)[-1]
        row.append(int(logits.argmax()))
    (score, greedy), (_, not_greedy) = lm._loglikelihood_tokens(
        [(None, prompt, row[len(prompt) :]), (None, prompt, [int(np.argmin(logits))] * 3)]
    )
    assert greedy and not not_greedy
    np.testing.assert_allclose(score, direct.logprobs(row)[0][-3:].sum(), atol=1e-5)


def test_loglikelihood_rolling_scores_every_token_in_disjoint_windows(lm, direct):
    texts = ["Thou art a villain.", LONG]
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
    limit = lm.max_length
    for text, score in zip(texts, got, strict=True):
        full = [lm.sp.bos_id(), *lm.sp.encode(text)]
        n = len(full) - 1
        want = 0.0
        for start in range(0, n, limit):  # window [start, end) of the text's tokens
            end = min(start + limit, n)
            logp, _ = direct.logprobs(full[max(0, end - limit) : end + 1])
            want += logp[-(end - start) :].sum()
        np.testing.assert_allclose(score, want, rtol=0, atol=1e-5)
    assert len(lm.tok_encode(LONG, add_special_tokens=False)) > 2 * limit  # three windows


def _greedy_text(lm, direct, context: str, steps: int) -> str:
    """Greedy decoding from full forward passes, over the tokenizer's pieces (the model's
    vocabulary is larger), stopping at EOS."""
    row = [lm.sp.bos_id(), *lm.sp.encode(context)]
    new = []
    for _ in range(steps):
        token = int(direct.logits(row)[-1][: lm.sp.vocab_size()].argmax())
        if token == lm.sp.eos_id():
            break
        row.append(token)
        new.append(token)
    return lm.sp.decode(new)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(lm, direct):
    """Two prompts of different lengths share a batch; a stop string cuts the text."""
    contexts = ["MENENIUS:", "First Citizen:\nWe are accounted poor citizens"]
    texts = [_greedy_text(lm, direct, c, 6) for c in contexts]
    stop = texts[0].strip()[1:3]
    assert len(stop) == 2 and stop in texts[0]
    got = lm.generate_until(
        _requests(
            "generate_until",
            [
                (contexts[0], {"until": [], "max_gen_toks": 6}),
                (contexts[0], {"until": [stop], "max_gen_toks": 6}),
                (contexts[1], {"until": [], "max_gen_toks": 6}),
            ],
        )
    )
    assert got == [texts[0], texts[0].split(stop, 1)[0], texts[1]]


@contextlib.contextmanager
def _count_compiles():
    """A one-item list holding the number of XLA compilations while the block runs."""
    count = [0]

    def listener(event, duration, **kwargs):
        count[0] += event == "/jax/core/compile/backend_compile_duration"

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


RICHARD = "Now is the winter of our discontent made glorious summer by this sun of York so"


def test_generate_until_pads_prompts_to_few_shapes_and_keeps_every_token(lm, direct):
    """Batches are left-padded to power-of-two lengths, so prompts of new lengths reuse the
    compiled prefill, loop and cache of their length bucket (one prompt at a time compiles them
    per length); the tokens are those of each prompt decoded alone (set A) and of greedy full
    forward passes (set B, more prompts than a batch holds)."""
    words, new = RICHARD.split(), 5
    set_a = [" ".join(words[:n]) for n in (1, 5, 8, 12)]  # one batch, padded to 64
    set_b = [" ".join(words[:n]) for n in (2, 3, 4, 6, 7, 9, 10, 11, 13, 14, 15, 16)]
    set_c = [c + " and" for c in set_b]  # new lengths, the same buckets as set B's batches
    lengths = [len(lm.tok_encode(c)) for c in set_a + set_b + set_c]
    assert len(set(lengths)) > 20 and max(lengths) <= 64 < lm.max_length - new
    assert lm.scorer.batch_size == 8  # set B: 8 prompts of 24-57 tokens, then 4 of 4-12
    alone = decode.Generator(lm.loaded.config, lm.loaded.mesh)  # today's per-prompt path
    sampling = decode.Sampling(vocab_limit=lm.sp.vocab_size())
    with _count_compiles() as alone_compiles:
        want = [
            lm.tok_decode(
                alone.generate(
                    lm.loaded.params, [lm.tok_encode(c)], new, sampling, eos_id=lm.sp.eos_id()
                ).tokens[0]
            )
            for c in set_a
        ]
    assert alone_compiles[0] >= 2 * len(set_a)  # a prefill and a loop per length
    kwargs = {"until": [], "max_gen_toks": new}
    compiles = []
    for contexts in (set_a, set_b, set_c):
        with _count_compiles() as count:
            got = lm.generate_until(_requests("generate_until", [(c, kwargs) for c in contexts]))
        compiles.append(count[0])
        if contexts is set_a:
            assert got == want
        elif contexts is set_b:
            assert got == [_greedy_text(lm, direct, c, new) for c in set_b]
    # A: bucket 64 (cache, prefill, loop); B: bucket 64 again, then 16; C: both compiled
    assert 0 < compiles[0] <= 3 and 0 < compiles[1] <= 3 and compiles[2] == 0, compiles


def test_local_task_scores_equal_scores_from_our_logits(lm, direct, monkeypatch):
    """The YAML task over tests/testdata's JSON lines, through lm_eval.simple_evaluate, zero- and
    two-shot: accuracy and length-normalised accuracy equal those of our own log-probabilities
    of the very prompts the harness built."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)  # the task's data_files path is relative to the repository root
    with open(os.path.join(TASK_DIR, "line_endings.jsonl")) as f:
        docs = [json.loads(line) for line in f]
    manager = TaskManager(include_path=TASK_DIR, include_defaults=False)
    for shots in (0, 2):
        out = simple_evaluate(
            model=lm, tasks=[TASK], num_fewshot=shots, task_manager=manager, log_samples=True
        )
        samples = out["samples"][TASK]
        assert len(samples) == len(docs)
        acc, acc_norm = [], []
        for sample in sorted(samples, key=lambda s: s["doc_id"]):
            doc = docs[sample["doc_id"]]
            pairs = [tuple(a) for a in sample["arguments"]]
            assert [c for _, c in pairs] == [" " + c for c in doc["choices"]]
            assert pairs[0][0].endswith(doc["context"])
            assert pairs[0][0].count("\n") == shots  # the shots, one line each
            lls = np.array([direct.loglikelihood(c, x)[0] for c, x in pairs])
            np.testing.assert_allclose([r[0][0] for r in sample["resps"]], lls, atol=1e-5)
            acc.append(np.argmax(lls) == doc["label"])
            lengths = np.array([len(c) for c in doc["choices"]], float)  # lm-eval's acc_norm
            acc_norm.append(np.argmax(lls / lengths) == doc["label"])
        result = out["results"][TASK]
        assert result["acc,none"] == pytest.approx(np.mean(acc))
        assert result["acc_norm,none"] == pytest.approx(np.mean(acc_norm))


@pytest.mark.parametrize(
    "args, words",
    [
        (dict(hf_dir="HF", colour="red"), "unknown glam_jax model argument(s) colour"),
        (dict(), "pass exactly one of workdir="),
        (dict(hf_dir="HF", workdir="/tmp"), "pass exactly one of workdir="),
        (dict(workdir="/nonexistent/run", config="glam_tiny"), "has no checkpoints/ folder"),
        (dict(workdir="/nonexistent/run"), "has no config.json"),
        (dict(hf_dir="HF", config="glam_teeny"), "'glam_teeny' is neither a config file"),
        (dict(hf_dir="HF", mesh="8x1"), "mesh='8x1' is not three sizes"),
        (dict(hf_dir="HF", batch_size=0), "batch_size=0 must be a positive integer"),
        (dict(hf_dir="HF", max_length=4096), "max_length=4096 exceeds the model's"),
        (dict(hf_dir="HF", tokenizer="/nonexistent.model"), "is not an existing file"),
    ],
)
def test_bad_model_args_are_refused_in_one_sentence(offline, hf_dir, args, words):
    from glam_jax import lm_eval_model

    args = {k: (hf_dir if v == "HF" else v) for k, v in args.items()}
    with pytest.raises(GlamError) as err:
        lm_eval_model.GlamLM(**args)
    message = str(err.value)
    assert words in message, message
    assert message[-1] in ".?" and "\n" not in message and ". " not in message.rstrip(".")


def test_the_harness_finds_the_model_by_name_and_refuses_bad_model_args(offline, hf_dir):
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model

    from glam_jax import lm_eval_model

    assert get_model("glam_jax") is lm_eval_model.GlamLM
    with pytest.raises(GlamError, match="unknown glam_jax model argument"):
        simple_evaluate(model="glam_jax", model_args=f"hf_dir={hf_dir},colour=red", tasks=[TASK])


def test_a_value_a_comma_cut_is_refused_naming_the_value(offline, hf_dir):
    """lm-eval's string form splits at every comma: `mesh=8,1,1` arrives as mesh=8 plus keys
    '1' with no value."""
    from glam_jax import lm_eval_model

    with pytest.raises(GlamError) as err:
        lm_eval_model.GlamLM.create_from_arg_string(f"hf_dir={hf_dir},mesh=8,1,1")
    message = str(err.value)
    assert "holds '1' without '=value', so a comma cut the value mesh=8;" in message, message
    assert message.endswith(".") and ". " not in message and "\n" not in message
    with pytest.raises(GlamError, match=r"\(s\) experts; valid: .*if a comma split a value"):
        lm_eval_model.GlamLM.create_from_arg_string(
            f"hf_dir={hf_dir},config=glam_tiny:k=2,experts=4"
        )


def test_commas_pass_quoted_or_as_json_on_the_command_line(offline, hf_dir, tmp_path, monkeypatch):
    """The README's ways through lm-eval's own command-line parser: a quoted value and JSON keep
    their commas (a model directory with a comma in its name, mesh=8,1,1)."""
    import sys

    from lm_eval._cli import HarnessCLI

    from glam_jax import lm_eval_model

    comma_dir = str(tmp_path / "mixtral,tiny")
    shutil.copytree(hf_dir, comma_dir)
    parsed = []
    for value in (
        f'hf_dir="{comma_dir}",mesh="8,1,1",batch_size=2',
        json.dumps({"hf_dir": comma_dir, "mesh": "8,1,1", "batch_size": 2}),
    ):
        argv = ["glam-lm-eval", "--model", "glam_jax", "--model_args", value, "--tasks", TASK]
        monkeypatch.setattr(sys, "argv", argv)
        parsed.append(HarnessCLI().parse_args().model_args)
    assert parsed[0] == parsed[1] == {"hf_dir": comma_dir, "mesh": "8,1,1", "batch_size": 2}
    lm = lm_eval_model.GlamLM.create_from_arg_obj(parsed[0])
    assert tuple(lm.loaded.mesh.shape.values()) == (8, 1, 1) and lm.scorer.batch_size == 8
