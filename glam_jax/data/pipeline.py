"""Grain input pipeline: documents -> SentencePiece tokens -> packed rows -> per-process batches,
with a small JSON-safe iterator state that a checkpoint stores beside params and optimizer.

Each document becomes [BOS] + pieces + [EOS], shifted by one into inputs/targets, so every target
is the next token of the same document. Documents are concatenated and split into rows of
`seq_len` (grain's ConcatThenSplit packing): a row holds several documents, and a document longer
than a row continues in the next one as a new chunk. Every batch is a dict of numpy arrays of
shape [per_process_batch, seq_len]:

  inputs        int32    token ids (padding slots hold 0, the pad id of trained tokenizers)
  targets       int32    next token of the same document
  segment_ids   int32    1, 2, 3... per document chunk in the row, 0 for padding; attention must
                         not cross segments
  positions     int32    position inside the chunk, restarting at 0 for each chunk
  weights       float32  1 where the target is a real token, 0 for padding
  target_chars  int32    characters of text the target stands for (its piece's length; for a
                         lossy loaded tokenizer, the original characters up to the piece's end);
                         EOS counts 1 (the document separator), so a whole document's targets add
                         up to len(text) + 1 and bits per char = sum(nll*w) / ln 2 / sum(chars*w)

Trained tokenizers use pad 0, unk 1, bos 2, eos 3 (see tokenizer.py); a loaded one keeps its own
bos/eos ids.

Training data is read as `data.num_streams` independent streams S (0, the default, means one per
process). Stream s packs documents s, s+S, s+2S, ... of the training split, shuffled afresh each
epoch and repeated forever, and fills rows [s*B/S, (s+1)*B/S) of every global batch of B rows.
Process i of P reads streams [i*S/P, (i+1)*S/P), that is rows [i*B/P, (i+1)*B/P), and nothing
else, so for a fixed num_streams the global batches do not depend on how many processes read
them: a single process with num_streams=2 sees exactly what two processes see together. The
iterator state is kept per stream, so the states of all processes merge into one
(`TrainIterator.merge_states`) that any process count dividing S can resume from.

Evaluation packs the whole validation split in a fixed order and deals each global batch out by
rows, so every process sees the same number of batches; the last is padded with weight 0.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import sentencepiece as spm
from absl import flags
from grain.experimental import ConcatThenSplitIterDataset

from glam_jax.data import text_corpus, token_cache
from glam_jax.data import tokenizer as tokenizer_lib
from glam_jax.data.text_corpus import DataError

Batch = dict[str, np.ndarray]
_PACKED_FEATURES = ("inputs", "targets", "target_chars")
# Read in the calling thread: grain's prefetch threads cost more than they save for this
# Python-bound work (data.worker_count gives real parallelism).
_READ_INLINE = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@dataclasses.dataclass(frozen=True)
class DataBundle:
    """Everything the training loop needs from the data layer."""

    tokenizer: spm.SentencePieceProcessor
    train_iter: TrainIterator  # this process's rows of each batch, forever; checkpoint the
    # states of all processes merged (TrainIterator.merge_states)
    make_eval_iter: Callable[[], Iterator[Batch]]  # a fresh pass over the validation split
    num_train_documents: int  # in the whole split, all processes together
    num_eval_documents: int


class TrainIterator:
    """Endless training batches of this process's streams, stacked in stream order, whose
    `get_state()` survives a JSON round trip exactly."""

    def __init__(self, streams: dict[int, grain.IterDataset], *, num_streams: int):
        self.num_streams = num_streams
        self._iterators = {index: iter(streams[index]) for index in sorted(streams)}

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Batch:
        parts = [next(iterator) for iterator in self._iterators.values()]
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def get_state(self) -> dict[str, Any]:
        """The position after the last batch returned, per stream, as plain JSON types."""
        return {
            "num_streams": self.num_streams,
            "streams": {
                str(index): json.loads(json.dumps(iterator.get_state()))
                for index, iterator in self._iterators.items()
            },
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues right after the batch at which `state` was taken; `state` may hold other
        processes' streams too (a merged state), each process takes its own."""
        if not isinstance(state, dict) or "streams" not in state:
            raise DataError(
                "the saved data-iterator state has no per-stream positions (an older format); "
                "start a new --workdir."
            )
        saved = state.get("num_streams")
        if saved != self.num_streams:
            raise DataError(
                f"the saved data-iterator state has {saved} streams but this run reads "
                f"{self.num_streams} (data.num_streams, 0 = one per process); set "
                f"data.num_streams={saved} to resume it."
            )
        missing = [index for index in self._iterators if str(index) not in state["streams"]]
        if missing:
            raise DataError(f"the saved data-iterator state lacks streams {missing}.")
        for index, iterator in self._iterators.items():
            iterator.set_state(_restore_slices(state["streams"][str(index)]))

    @staticmethod
    def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The states of all processes' iterators (any order) as one state of every stream."""
        counts = {state["num_streams"] for state in states}
        if len(counts) != 1:
            raise DataError(f"processes read different stream counts {sorted(counts)}.")
        streams: dict[str, Any] = {}
        for state in states:
            streams.update(state["streams"])
        return {"num_streams": counts.pop(), "streams": dict(sorted(streams.items(), key=_int_key))}

    def close(self) -> None:
        """Stops grain's worker processes now rather than at interpreter exit (noisily)."""
        for iterator in self._iterators.values():
            iterator.close()


def _int_key(item: tuple[str, Any]) -> int:
    return int(item[0])


def _restore_slices(state: Any) -> Any:
    """Turns JSON lists back into the tuples ConcatThenSplit compares its slices against.

    Its 'no remainder' marker is the tuple (-1, -1); a list never equals it, so a restored
    empty remainder would be taken for a real one.
    """
    if isinstance(state, list):  # worker processes keep a list of per-worker states
        return [_restore_slices(value) for value in state]
    if not isinstance(state, dict):
        return state
    return {
        key: {k: tuple(v) for k, v in value.items()}
        if key == "remainder_slices"
        else _restore_slices(value)
        for key, value in state.items()
    }


class DocumentTokenizer:
    """Text -> [BOS] + pieces + [EOS] shifted into inputs/targets, with each target's chars."""

    def __init__(self, tokenizer: spm.SentencePieceProcessor):
        self._tokenizer = tokenizer
        self._piece_chars = tokenizer_lib.piece_char_counts(tokenizer)

    def __call__(self, text: str) -> Batch:
        """One document's text -> its token ids, shifted targets and per-target char counts."""
        return self.many([text])[0]

    def many(self, texts: list[str], threads: int = 1) -> list[Batch]:
        """The rule of `__call__` for many documents; SentencePiece encodes them on `threads`."""
        tok = self._tokenizer
        out = []
        for text, pieces in zip(texts, tok.encode(texts, num_threads=threads), strict=True):
            ids = np.array([tok.bos_id(), *pieces, tok.eos_id()], np.int32)
            chars = self._piece_chars[ids[1:]]
            chars[-1] = 1
            # The lookup is exact for lossless tokenizers; otherwise (unk pieces, a dummy prefix,
            # normalisation) charge each piece the original characters up to its end.
            if chars.sum() != len(text) + 1:
                chars = _chars_by_span(text, tok.encode(text, return_type="proto").pieces)
            out.append({"inputs": ids[:-1], "targets": ids[1:], "target_chars": chars})
        return out


def _chars_by_span(text: str, pieces: Sequence[Any]) -> np.ndarray:
    """Characters of `text` between consecutive piece ends (SentencePiece gives byte offsets);
    whatever the pieces leave uncovered at the end goes to EOS, which also counts 1."""
    lead_bytes = (np.frombuffer(text.encode("utf-8"), np.uint8) & 0xC0) != 0x80
    chars_before_byte = np.concatenate([[0], np.cumsum(lead_bytes)])
    ends = chars_before_byte[[p.end for p in pieces]]
    return np.diff(ends, prepend=0, append=len(text) + 1).astype(np.int32)


def _tokenize_example(
    example: dict[str, Any], *, text_key: str, tokenize: DocumentTokenizer
) -> Batch:
    return tokenize(text_corpus.document_text(example, text_key))


def _pretokenized(example: Batch) -> Batch:
    """A `token_cache` document is already what `_tokenize_example` would make of its text."""
    return example


# An element of a document source -> {inputs, targets, target_chars} of that document.
DocTokens = Callable[[Any], Batch]


def _to_layout(batch: Batch) -> Batch:
    """Packed grain features -> the batch layout in this module's docstring."""
    segment_ids = batch["inputs_segment_ids"]
    return {
        "inputs": batch["inputs"],
        "targets": batch["targets"],
        "segment_ids": segment_ids,
        "positions": batch["inputs_positions"],
        "weights": (segment_ids > 0).astype(np.float32),
        "target_chars": batch["target_chars"],
    }


def shard_documents(
    documents: grain.MapDataset, *, shard_index: int, shard_count: int
) -> grain.MapDataset:
    """One stream's share of the documents: every shard_count-th, from shard_index."""
    return documents[shard_index::shard_count]


def _packed_rows(
    documents: grain.MapDataset, doc_tokens: DocTokens, seq_len: int
) -> grain.IterDataset:
    return ConcatThenSplitIterDataset(
        documents.map(doc_tokens).to_iter_dataset(_READ_INLINE),
        length_struct={name: seq_len for name in _PACKED_FEATURES},
    )


def _train_dataset(
    source: Sequence[Any],
    *,
    doc_tokens: DocTokens,
    seq_len: int,
    batch_size: int,
    seed: int,
    worker_count: int,
    stream_index: int,
    num_streams: int,
) -> grain.IterDataset:
    """One stream's batches (its rows of each global batch)."""
    documents = shard_documents(
        grain.MapDataset.source(source), shard_index=stream_index, shard_count=num_streams
    )
    # shuffle-then-repeat reseeds the shuffle for each epoch.
    documents = documents.shuffle(seed=seed).repeat()
    rows = _packed_rows(documents, doc_tokens, seq_len)
    batches = rows.batch(batch_size, drop_remainder=True).map(_to_layout)
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside an absl app
            flags.FLAGS.mark_as_parsed()  # (tests, notebooks) take their defaults.
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return batches


def _eval_batches(
    source: Sequence[Any],
    *,
    doc_tokens: DocTokens,
    seq_len: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
) -> Iterator[Batch]:
    """The validation split once, in order: each global batch of rows (the last padded with
    zero rows) is dealt out by process, so all processes yield the same number of batches."""
    per_process = global_batch_size // process_count
    start = process_index * per_process
    rows = _packed_rows(grain.MapDataset.source(source), doc_tokens, seq_len)
    for batch in rows.batch(global_batch_size, drop_remainder=False).map(_to_layout):
        yield {
            name: np.pad(array, [(0, global_batch_size - len(array)), (0, 0)])[
                start : start + per_process
            ]
            for name, array in batch.items()
        }


def open_corpus(data: ml_collections.ConfigDict, cache_dir: str) -> text_corpus.Corpus:
    """The catalog dataset, else the text files, else the embedded corpus."""
    if data.tfds_name:
        return text_corpus.open_catalog_corpus(
            data.tfds_name,
            data_dir=data.tfds_data_dir,
            text_key=data.tfds_text_key,
            train_split=data.tfds_train_split,
            eval_split=data.tfds_eval_split,
        )
    if data.text_files:
        files, label, embedded = text_corpus.resolve_text_files(data.text_files), "text", False
        if not files:
            raise DataError(f"data.text_files={data.text_files!r} names no file.")
    else:
        files, label, embedded = [text_corpus.embedded_corpus(data.corpus)], data.corpus, True
    return text_corpus.prepare_text_corpus(
        files,
        label=label,
        embedded=embedded,
        document_split=data.document_split,
        validation_fraction=data.validation_fraction,
        cache_dir=cache_dir,
        undecodable_files=data.undecodable_files,
        max_document_chars=data.max_document_chars,
    )


def document_sources(
    corpus: text_corpus.Corpus,
    tokenizer: spm.SentencePieceProcessor,
    tokenize: DocumentTokenizer,
    data: ml_collections.ConfigDict,
    cache_dir: str | Path,
) -> tuple[Sequence[Any], Sequence[Any], DocTokens]:
    """Train and validation document sources, and how one element becomes tokens: the text
    documents tokenised as they are read, or (data.pretokenize) both splits tokenised up front
    by all cores and read back from `token_cache`."""
    if not data.pretokenize:
        doc_tokens = functools.partial(
            _tokenize_example, text_key=corpus.text_key, tokenize=tokenize
        )
        return corpus.train, corpus.validation, doc_tokens
    train, validation = (
        token_cache.tokenized_split(
            source,
            text_key=corpus.text_key,
            tokenizer=tokenizer,
            tokenize_many=tokenize.many,
            corpus_identity=corpus.identity,
            split=split,
            cache_dir=cache_dir,
            threads=data.tokenize_threads,
        )
        for split, source in (("train", corpus.train), ("validation", corpus.validation))
    )
    return train, validation, _pretokenized


def num_streams(config: ml_collections.ConfigDict, process_count: int) -> int:
    """Training streams the global batch is read as (data.num_streams, 0 = one per process)."""
    return int(config.data.num_streams or process_count)


def _check_shapes(config: ml_collections.ConfigDict, process_count: int) -> None:
    if config.train.seq_len > config.model.max_len:
        raise DataError(
            f"train.seq_len={config.train.seq_len} exceeds model.max_len={config.model.max_len}; "
            "use a seq_len of at most max_len."
        )
    for name in ("batch_size", "eval_batch_size"):
        size = config.train[name]
        if size <= 0 or size % process_count:
            raise DataError(
                f"train.{name}={size} is not a positive multiple of the process count "
                f"{process_count}."
            )
    streams = num_streams(config, process_count)
    if streams < 0 or streams % process_count or config.train.batch_size % streams:
        raise DataError(
            f"data.num_streams={streams} must be a multiple of the process count {process_count} "
            f"that divides train.batch_size={config.train.batch_size}."
        )


def build_datasets(
    config: ml_collections.ConfigDict,
    cache_dir: str | Path | None,
    *,
    process_index: int,
    process_count: int,
) -> DataBundle:
    """`create_datasets` for an explicit process position (tests simulate several processes)."""
    _check_shapes(config, process_count)
    data = config.data
    cache_dir = data.cache_dir or cache_dir
    if not cache_dir:
        raise DataError("no cache directory: set data.cache_dir or pass cache_dir.")
    corpus = open_corpus(data, str(cache_dir))
    streams = num_streams(config, process_count)
    if len(corpus.train) < streams:
        raise DataError(
            f"the training split has {len(corpus.train)} documents, fewer than the "
            f"{streams} streams (data.num_streams, 0 = one per process) that share it."
        )
    training_texts = (
        text_corpus.document_text(example, corpus.text_key)
        for example in grain.MapDataset.source(corpus.train)
        .shuffle(seed=config.seed)
        .to_iter_dataset(_READ_INLINE)
    )
    tokenizer = tokenizer_lib.get_tokenizer(
        tokenizer_path=data.tokenizer_path,
        cache_dir=cache_dir,
        corpus_identity=corpus.identity,
        documents=training_texts,
        vocab_size=config.model.vocab_size,
        model_type=data.spm_model_type,
        seed=config.seed,
    )
    seq_len, tokenize = config.train.seq_len, DocumentTokenizer(tokenizer)
    train_docs, eval_docs, doc_tokens = document_sources(
        corpus, tokenizer, tokenize, data, cache_dir
    )
    per_process = streams // process_count  # each with its own data.worker_count workers
    train = {
        index: _train_dataset(
            train_docs,
            doc_tokens=doc_tokens,
            seq_len=seq_len,
            batch_size=config.train.batch_size // streams,
            seed=data.shuffle_seed,
            worker_count=data.worker_count,
            stream_index=index,
            num_streams=streams,
        )
        for index in range(process_index * per_process, (process_index + 1) * per_process)
    }
    make_eval_iter = functools.partial(
        _eval_batches,
        eval_docs,
        doc_tokens=doc_tokens,
        seq_len=seq_len,
        global_batch_size=config.train.eval_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    return DataBundle(
        tokenizer=tokenizer,
        train_iter=TrainIterator(train, num_streams=streams),
        make_eval_iter=make_eval_iter,
        num_train_documents=len(corpus.train),
        num_eval_documents=len(corpus.validation),
    )


def create_datasets(
    config: ml_collections.ConfigDict, cache_dir: str | Path | None = None
) -> DataBundle:
    """Builds the tokenizer, the endless training iterator and the eval-iterator factory for this
    process; `cache_dir` is used unless `config.data.cache_dir` is set."""
    return build_datasets(
        config, cache_dir, process_index=jax.process_index(), process_count=jax.process_count()
    )
