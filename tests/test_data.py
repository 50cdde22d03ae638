"""Data layer: packing invariants, exact resume, splits, char accounting, sharding, errors."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import grain
import numpy as np
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds

from configs.base import get_base_config
from glam_jax.data import DataBundle, DataError, create_datasets, pipeline, text_corpus
from glam_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

# --dist loadgroup (pyproject.toml) gives this module to one xdist worker: the tokenized corpora
# (module fixtures) are built once, not once per xdist worker.
pytestmark = pytest.mark.xdist_group("data")

SEQ_LEN = 64
REPO = Path(__file__).resolve().parents[1]


def make_config(**data):
    """A small config: vocab 512, rows of 64 tokens, 4 rows a batch."""
    config = get_base_config()
    config.model.vocab_size = 512
    config.model.max_len = 128
    config.train.batch_size = 4
    config.train.eval_batch_size = 4
    config.train.seq_len = SEQ_LEN
    config.data.update(data)
    return config


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def decode_stream(batches, tokenizer):
    """Documents in row order, rebuilt from the weighted targets split at EOS, with the number
    of characters their targets claim; the first document must start at the first row."""
    docs, tokens, chars = [], [], 0
    for batch in batches:
        for targets, weights, target_chars in zip(
            batch["targets"], batch["weights"], batch["target_chars"], strict=True
        ):
            real = weights > 0
            for token, char_count in zip(targets[real], target_chars[real], strict=True):
                chars += int(char_count)
                if token == tokenizer.eos_id():
                    docs.append((tokenizer.decode(tokens), chars))
                    tokens, chars = [], 0
                else:
                    tokens.append(int(token))
    return docs


def check_rows(batch, bos, eos):
    """Segment ids/positions consistent, no target crossing a document, padding inert."""
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        "inputs": (np.int32, batch["inputs"].shape),
        "targets": (np.int32, batch["inputs"].shape),
        "segment_ids": (np.int32, batch["inputs"].shape),
        "positions": (np.int32, batch["inputs"].shape),
        "weights": (np.float32, batch["inputs"].shape),
        "target_chars": (np.int32, batch["inputs"].shape),
    }
    for row in range(batch["inputs"].shape[0]):
        seg, pos = batch["segment_ids"][row], batch["positions"][row]
        inputs, targets = batch["inputs"][row], batch["targets"][row]
        np.testing.assert_array_equal(batch["weights"][row], (seg > 0).astype(np.float32))
        n = int((seg > 0).sum())
        assert (seg[:n] > 0).all() and (seg[n:] == 0).all(), "padding only at the row's end"
        for name in ("inputs", "targets", "positions", "target_chars"):
            assert (batch[name][row][n:] == 0).all()
        if n:
            assert seg[0] == 1 and set(np.diff(seg[:n])) <= {0, 1}
        for s in range(1, int(seg.max(initial=0)) + 1):
            (idx,) = np.nonzero(seg == s)
            np.testing.assert_array_equal(idx, np.arange(idx[0], idx[-1] + 1))
            np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
            # Every target is the next input of the same document.
            np.testing.assert_array_equal(inputs[idx][1:], targets[idx][:-1])
            if idx[0] > 0:  # a document starting mid-row starts at its beginning
                assert inputs[idx[0]] == bos
            if idx[-1] < len(seg) - 1:  # a segment followed by another or by padding has ended
                assert targets[idx[-1]] == eos


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def shakespeare(cache):
    return pipeline.build_datasets(make_config(), cache, process_index=0, process_count=1)


@pytest.fixture(scope="module")
def shakespeare_texts(cache):
    config = make_config()
    corpus = text_corpus.prepare_text_corpus(
        [text_corpus.embedded_corpus("tinyshakespeare")],
        label="tinyshakespeare",
        embedded=True,
        document_split=config.data.document_split,
        validation_fraction=config.data.validation_fraction,
        cache_dir=cache,
    )
    return (
        [text_corpus.document_text(e, "text") for e in corpus.train],
        [text_corpus.document_text(e, "text") for e in corpus.validation],
    )


def small_corpus(tmp_path, num_docs=40):
    """One document a line, each distinct, so rebuilt documents name their source line."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    lines = [
        f"doc {i}: " + " ".join(words[(i * k) % 8] for k in range(3 + i % 5))
        for i in range(num_docs)
    ]
    path = tmp_path / "small.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, lines


def test_public_interface(shakespeare):
    assert isinstance(shakespeare, DataBundle)
    tok = shakespeare.tokenizer
    ids = (tok.pad_id(), tok.unk_id(), tok.bos_id(), tok.eos_id())
    assert ids == (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert tok.vocab_size() <= 512
    assert shakespeare.num_train_documents > 10 * shakespeare.num_eval_documents > 0
    text = "ROMEO:\n  Two  spaces,\ttab; £ and 漢字 too.\n"
    assert tok.decode(tok.encode(text)) == text, "trained tokenizers are lossless"


def test_packing_train_rows(shakespeare, shakespeare_texts):
    tok = shakespeare.tokenizer
    batches = take(shakespeare.train_iter, 6)
    for batch in batches:
        assert batch["inputs"].shape == (4, SEQ_LEN)
        check_rows(batch, tok.bos_id(), tok.eos_id())
    assert max(b["segment_ids"].max() for b in batches) >= 3, "rows hold several documents"
    train = set(shakespeare_texts[0])
    docs = decode_stream(batches, tok)
    assert len(docs) >= 5
    for text, chars in docs:
        assert text in train
        assert chars == len(text) + 1, "a document's targets stand for its text plus EOS"


def test_eval_covers_validation_with_char_accounting(shakespeare, shakespeare_texts):
    tok = shakespeare.tokenizer
    batches = list(shakespeare.make_eval_iter())
    for batch in batches:
        assert batch["inputs"].shape == (4, SEQ_LEN)
        check_rows(batch, tok.bos_id(), tok.eos_id())
    assert batches[-1]["weights"].min() == 0, "the last batch is padded"
    validation = shakespeare_texts[1]
    docs = decode_stream(batches, tok)
    assert [text for text, _ in docs] == validation, "whole split, stored order, once"
    total_chars = sum(float((b["target_chars"] * b["weights"]).sum()) for b in batches)
    assert total_chars == sum(len(text) + 1 for text in validation)
    again = list(shakespeare.make_eval_iter())
    for a, b in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_train_validation_disjoint(shakespeare_texts):
    train, validation = shakespeare_texts
    assert not set(train) & set(validation)
    text = text_corpus.embedded_corpus("tinyshakespeare").read_text(encoding="utf-8")
    documents = list(text_corpus.iter_documents(text.splitlines(keepends=True), "blank_line"))
    assert sorted(train + validation) == sorted(documents)
    assert 0.03 < len(validation) / len(documents) < 0.07


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_resume_is_exact(cache):
    config = make_config()
    straight = take(create_datasets(config, cache).train_iter, 6)
    first = create_datasets(config, cache).train_iter
    assert_same_batches(take(first, 3), straight[:3])
    state = json.loads(json.dumps(first.get_state()))
    resumed = create_datasets(config, cache).train_iter
    resumed.set_state(state)
    assert_same_batches(take(resumed, 3), straight[3:])
    # The state before any batch (no partly used document) also survives JSON.
    fresh = create_datasets(config, cache).train_iter
    fresh.set_state(json.loads(json.dumps(fresh.get_state())))
    assert_same_batches(take(fresh, 2), straight[:2])


def test_epochs_reshuffle_and_resume_across_boundary(tmp_path):
    path, lines = small_corpus(tmp_path)
    config = make_config(text_files=str(path), document_split="line", validation_fraction=0.2)
    config.train.seq_len = 16
    config.model.vocab_size = 300  # below byte fallback: a small corpus can't fill more
    bundle = create_datasets(config, tmp_path / "cache")
    n = bundle.num_train_documents
    batches = take(bundle.train_iter, 24)
    docs = [text for text, _ in decode_stream(batches, bundle.tokenizer)]
    assert len(docs) >= 2 * n
    epoch1, epoch2 = docs[:n], docs[n : 2 * n]
    assert sorted(epoch1) == sorted(epoch2) and set(epoch1) <= set(lines)
    assert epoch1 != epoch2, "each epoch is shuffled afresh"
    # Restore after the first epoch boundary and run on across the later ones.
    cut = 8
    assert n < len(decode_stream(batches[:cut], bundle.tokenizer)) < len(docs) - n
    it = create_datasets(config, tmp_path / "cache").train_iter
    take(it, cut)
    state = json.loads(json.dumps(it.get_state()))
    resumed = create_datasets(config, tmp_path / "cache").train_iter
    resumed.set_state(state)
    assert_same_batches(take(resumed, 24 - cut), batches[cut:])


def test_worker_processes_give_the_same_batches(tmp_path):
    path, _ = small_corpus(tmp_path)
    config = make_config(text_files=str(path), document_split="line", validation_fraction=0.2)
    config.model.vocab_size = 300
    in_process = take(create_datasets(config, tmp_path / "cache").train_iter, 4)
    config.data.worker_count = 1
    it = create_datasets(config, tmp_path / "cache").train_iter
    try:
        start = json.loads(json.dumps(it.get_state()))
        assert_same_batches(take(it, 2), in_process[:2])
        middle = json.loads(json.dumps(it.get_state()))
        it.set_state(start)
        assert_same_batches(take(it, 4), in_process)
        it.set_state(middle)
        assert_same_batches(take(it, 2), in_process[2:])
    finally:
        it.close()


def test_tokenizer_trained_on_train_split_only_and_cached(tmp_path):
    secret = "Quixotically"
    lines = []
    for i in range(400):
        doc = f"line {i} of plain words"
        if text_corpus.is_validation(doc + " " + secret, 0.2):
            doc = doc + " " + secret
        lines.append(doc)
    assert any(secret in line for line in lines)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    config = make_config(text_files=str(path), document_split="line", validation_fraction=0.2)
    config.model.vocab_size = 300
    tok = create_datasets(config, tmp_path / "cache").tokenizer
    assert not any("Qui" in tok.id_to_piece(i) for i in range(tok.vocab_size()))
    models = list((tmp_path / "cache" / "tokenizers").glob("*.model"))
    assert len(models) == 1
    mtime = models[0].stat().st_mtime_ns
    create_datasets(config, tmp_path / "cache")
    assert models[0].stat().st_mtime_ns == mtime, "reused, not retrained"
    config.data.spm_model_type = "bpe"
    create_datasets(config, tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.model"))) == 2
    # A given model is loaded as is.
    config.data.tokenizer_path = str(models[0])
    loaded = create_datasets(config, tmp_path / "other_cache").tokenizer
    assert loaded.serialized_model_proto() == tok.serialized_model_proto()


def test_char_accounting_with_a_lossy_loaded_tokenizer(tmp_path):
    """A tokenizer with SentencePiece's defaults (dummy prefix, NFKC, collapsed spaces, unk)
    still charges each document exactly its length plus one for EOS."""
    _, lines = small_corpus(tmp_path)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(tmp_path / "lossy"),
        vocab_size=40,
        minloglevel=2,
    )
    tok = spm.SentencePieceProcessor(model_file=str(tmp_path / "lossy.model"))
    tokenize = pipeline.DocumentTokenizer(tok)
    for text in ["doc 1: alpha beta", "  two  spaces and Ω unknown\nnew line", "ｆｕｌｌ width"]:
        example = tokenize(text)
        assert example["inputs"][0] == tok.bos_id() and example["targets"][-1] == tok.eos_id()
        assert example["target_chars"].sum() == len(text) + 1


def test_pretokenized_batches_equal_tokenizing_on_the_fly(tmp_path):
    """data.pretokenize changes where tokens come from, not which: the same train batches (and
    the same resume point) and the same eval batches, here with two streams and a lossy-free
    trained tokenizer, from a cache built with two SentencePiece threads."""
    path, _ = small_corpus(tmp_path, num_docs=120)
    config = make_config(text_files=str(path), document_split="line", validation_fraction=0.2)
    config.model.vocab_size = 300
    config.data.num_streams = 2
    cache = tmp_path / "cache"
    on_the_fly = create_datasets(config, cache)
    config.data.update(pretokenize=True, tokenize_threads=2)
    pretokenized = create_datasets(config, cache)
    assert len(list((cache / "tokens").iterdir())) == 2, "one cached directory per split"
    assert_same_batches(take(pretokenized.train_iter, 12), take(on_the_fly.train_iter, 12))
    assert_same_batches(list(pretokenized.make_eval_iter()), list(on_the_fly.make_eval_iter()))
    # Resuming a pretokenized run from an on-the-fly state is the same position too.
    state = json.loads(json.dumps(on_the_fly.train_iter.get_state()))
    resumed = create_datasets(config, cache).train_iter
    resumed.set_state(state)
    assert_same_batches(take(resumed, 3), take(on_the_fly.train_iter, 3))


def test_undecodable_files_are_named_or_skipped(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("\n".join(f"line {i} of text" for i in range(60)), encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    config = make_config(text_files=str(tmp_path / "*.txt"), document_split="line")
    config.model.vocab_size = 300
    with pytest.raises(DataError, match="latin1.txt is not UTF-8") as info:
        create_datasets(config, tmp_path / "cache")
    assert "undecodable_files='skip'" in str(info.value) and "\n" not in str(info.value)
    config.data.undecodable_files = "skip"
    bundle = create_datasets(config, tmp_path / "cache")
    assert bundle.num_train_documents + bundle.num_eval_documents == 60


def test_max_document_chars_leaves_long_documents_out(tmp_path):
    short = [f"short line {i}" for i in range(60)]
    long = [f"a much longer line number {i} " * 8 for i in range(20)]
    (tmp_path / "mixed.txt").write_text("\n".join(short + long), encoding="utf-8")
    config = make_config(text_files=str(tmp_path / "mixed.txt"), document_split="line")
    config.model.vocab_size = 300
    config.data.max_document_chars = 100
    bundle = create_datasets(config, tmp_path / "cache")
    assert bundle.num_train_documents + bundle.num_eval_documents == len(short)
    kept = [text for text, _ in decode_stream(take(bundle.train_iter, 20), bundle.tokenizer)]
    assert kept and all(len(text) <= 100 for text in kept)


def test_sharding_is_disjoint_and_covers():
    docs = grain.MapDataset.source(list(range(103)))
    shares = [list(pipeline.shard_documents(docs, shard_index=i, shard_count=3)) for i in range(3)]
    assert sorted(sum(shares, [])) == list(range(103))
    assert all(abs(len(s) - 103 / 3) < 1 for s in shares)


def test_simulated_processes(tmp_path):
    path, _ = small_corpus(tmp_path, num_docs=60)
    config = make_config(text_files=str(path), document_split="line", validation_fraction=0.2)
    config.model.vocab_size = 300
    config.train.seq_len = 16
    single = pipeline.build_datasets(config, tmp_path, process_index=0, process_count=1)
    parts = [
        pipeline.build_datasets(config, tmp_path, process_index=i, process_count=2) for i in (0, 1)
    ]
    # Training: half the rows per process, and the first epochs of the two together are the
    # training split, each document once.
    n = single.num_train_documents
    first_epochs = []
    for i, bundle in enumerate(parts):
        batches = take(bundle.train_iter, 20)
        assert batches[0]["inputs"].shape == (2, 16)
        share = len(range(i, n, 2))
        first_epochs += [text for text, _ in decode_stream(batches, bundle.tokenizer)][:share]
    all_train = [text for text, _ in decode_stream(take(single.train_iter, 60), single.tokenizer)]
    assert sorted(first_epochs) == sorted(all_train[:n])
    # Evaluation: the same number of batches everywhere; rows dealt out in order.
    evals = [list(bundle.make_eval_iter()) for bundle in parts]
    whole = list(single.make_eval_iter())
    assert len(evals[0]) == len(evals[1]) == len(whole)
    for a, b, w in zip(*evals, whole, strict=True):
        for k in w:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), w[k])


@pytest.mark.parametrize("streams", [2, 4])
def test_fixed_streams_give_the_same_global_batches_to_any_process_count(tmp_path, streams):
    """With data.num_streams fixed, one process reads exactly the rows that two read together,
    and a state merged from the two resumes one process (and the other way round)."""
    path, _ = small_corpus(tmp_path, num_docs=60)
    config = make_config(
        text_files=str(path), document_split="line", validation_fraction=0.2, num_streams=streams
    )
    config.model.vocab_size = 300
    config.train.seq_len = 16

    def iterators(count):
        return [
            pipeline.build_datasets(
                config, tmp_path, process_index=i, process_count=count
            ).train_iter
            for i in range(count)
        ]

    (single,) = iterators(1)
    whole = take(single, 8)
    assert whole[0]["inputs"].shape == (4, 16)
    pair = iterators(2)
    halves = [take(it, 8) for it in pair]
    for w, a, b in zip(whole, *halves, strict=True):
        assert a["inputs"].shape == (2, 16)
        for k in w:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), w[k])
    # Two processes' states taken after 3 batches, merged, resume one process...
    pair = iterators(2)
    for it in pair:
        take(it, 3)
    merged = pipeline.TrainIterator.merge_states(
        [json.loads(json.dumps(it.get_state())) for it in reversed(pair)]
    )
    assert sorted(merged["streams"], key=int) == [str(s) for s in range(streams)]
    (resumed,) = iterators(1)
    resumed.set_state(merged)
    assert_same_batches(take(resumed, 5), whole[3:])
    # ... and one process's state resumes each of two, which take their own streams.
    (first,) = iterators(1)
    take(first, 3)
    state = json.loads(json.dumps(first.get_state()))
    for i, it in enumerate(iterators(2)):
        it.set_state(state)
        assert_same_batches(take(it, 5), halves[i][3:])
    # A state of another stream count is refused in one sentence.
    config.data.num_streams = 0  # one stream per process
    (other,) = iterators(1)
    with pytest.raises(DataError, match=f"set data.num_streams={streams}"):
        other.set_state(state)


class TinyCatalogText(tfds.core.GeneratorBasedBuilder):
    """Stands in for a prepared catalog dataset such as lm1b, with its text under 'sentence'."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
        features = tfds.features.FeaturesDict({"sentence": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(0, 50),
            "validation": self._generate_examples(50, 60),
        }

    def _generate_examples(self, start, stop):
        for i in range(start, stop):
            yield i, {"sentence": f"sentence number {i} about the weather"}


def test_prepared_catalog_dataset(tmp_path):
    data_dir = tmp_path / "tfds"
    TinyCatalogText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    config = make_config(
        tfds_name="tiny_catalog_text", tfds_data_dir=str(data_dir), tfds_text_key="sentence"
    )
    config.model.vocab_size = 300
    config.train.seq_len = 16
    bundle = create_datasets(config, tmp_path / "cache")
    assert (bundle.num_train_documents, bundle.num_eval_documents) == (50, 10)
    check_rows(next(bundle.train_iter), bundle.tokenizer.bos_id(), bundle.tokenizer.eos_id())
    docs = [text for text, _ in decode_stream(bundle.make_eval_iter(), bundle.tokenizer)]
    assert sorted(docs) == sorted(f"sentence number {i} about the weather" for i in range(50, 60))
    config.data.tfds_text_key = "text"
    with pytest.raises(DataError, match="sentence"):
        create_datasets(config, tmp_path / "cache")


# Each case: data overrides (given the test's tmp dir, holding blank.txt and two.txt) and a
# word the message must contain.
ERROR_CASES = {
    "missing file": (lambda d: dict(text_files=str(d / "nope.txt")), "nope.txt"),
    "glob": (lambda d: dict(text_files=str(d / "*.nomatch")), "matches no file"),
    "empty corpus": (lambda d: dict(text_files=str(d / "blank.txt")), "empty"),
    "corpus name": (lambda d: dict(corpus="hamlet"), "tinyshakespeare"),
    "tfds name": (lambda d: dict(tfds_name="no_such_dataset_xyz"), "not prepared"),
    "validation empty": (
        lambda d: dict(text_files=str(d / "two.txt"), validation_fraction=0.01),
        "validation",
    ),
    "document split": (lambda d: dict(document_split="page"), "blank_line"),
    "undecodable policy": (lambda d: dict(undecodable_files="ignore"), "skip"),
    "model type": (lambda d: dict(spm_model_type="wordpiece"), "unigram"),
    "tokenizer path": (lambda d: dict(tokenizer_path=str(d / "x.model")), "x.model"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_data_errors(tmp_path, case):
    (tmp_path / "blank.txt").write_text("\n   \n\n", encoding="utf-8")
    (tmp_path / "two.txt").write_text("one document\n\nanother document\n", encoding="utf-8")
    overrides, word = ERROR_CASES[case]
    with pytest.raises(DataError, match=word) as info:
        pipeline.build_datasets(
            make_config(**overrides(tmp_path)), tmp_path / "cache", process_index=0, process_count=1
        )
    error = info.value
    assert isinstance(error, ValueError)
    assert "\n" not in str(error), "one sentence"
    assert error.__suppress_context__ or error.__context__ is None, "no chained traceback"


@pytest.mark.parametrize(
    "train, processes, word",
    [
        (dict(seq_len=256), 1, "max_len"),
        (dict(batch_size=6), 4, "process count"),
        (dict(eval_batch_size=5), 2, "eval_batch_size"),
        (dict(num_streams=3), 1, "num_streams=3"),
        (dict(num_streams=2), 4, "num_streams=2"),
    ],
)
def test_shape_errors(tmp_path, train, processes, word):
    config = make_config()
    train = dict(train)
    config.data.num_streams = train.pop("num_streams", 0)
    config.train.update(train)
    with pytest.raises(DataError, match=word):
        pipeline.build_datasets(config, tmp_path, process_index=0, process_count=processes)


def test_no_tensorflow_import(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        from configs.base import get_base_config
        from glam_jax.data import create_datasets
        config = get_base_config()
        config.model.vocab_size = 512
        config.train.update(batch_size=4, eval_batch_size=4, seq_len=64)
        bundle = create_datasets(config, {str(tmp_path)!r})
        for _ in range(3):
            next(bundle.train_iter)
        sum(1 for _ in bundle.make_eval_iter())
        print(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "[]", "TensorFlow was imported"
