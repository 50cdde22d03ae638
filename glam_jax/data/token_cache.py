"""Pre-tokenised splits (`data.pretokenize=True`): each split's documents are tokenised once, by
SentencePiece's own threads over all cores, into flat `.npy` arrays that training reads back by
random access. The batches are exactly those of tokenising on the fly (a test checks it); what
changes is that a GPU run no longer spends a CPU core per ~1M tokens/s inside its input loop.

Layout of one split's directory:
  ids.npy      uint16 (or int32 for vocabularies over 65,535 pieces): every document as
               [BOS] + pieces + [EOS], concatenated
  offsets.npy  int64 [documents + 1]: document d is ids[offsets[d]:offsets[d + 1]]
  chars.npy    int32, aligned with ids: characters the token at that position stands for as a
               target (the first slot of each document is unused, 0)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from glam_jax.data import text_corpus

# Bump when the layout or the tokenisation rule changes, so cached splits are rebuilt.
CACHE_VERSION = 1
# Documents handed to SentencePiece per call: big enough to keep every thread busy, small
# enough that one chunk's texts and ids stay a few hundred MB at most.
CHUNK_DOCUMENTS = 4096


def split_key(corpus_identity: str, split: str, tokenizer: spm.SentencePieceProcessor) -> str:
    """Names a split's cache by the corpus, the split and the exact tokenizer model."""
    digest = hashlib.sha256()
    for part in (corpus_identity, split, str(CACHE_VERSION)):
        digest.update(part.encode())
    digest.update(tokenizer.serialized_model_proto())
    return digest.hexdigest()[:16]


class TokenizedDocuments(Sequence):
    """A grain source of pre-tokenised documents: item d is the dict a `DocumentTokenizer` would
    return for document d (inputs, targets, target_chars), read from memory-mapped arrays."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        self._ids = np.load(directory / "ids.npy", mmap_mode="r")
        self._chars = np.load(directory / "chars.npy", mmap_mode="r")
        self._offsets = np.load(directory / "offsets.npy")
        self.num_tokens = len(self._ids)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        ids = np.asarray(self._ids[start:end], np.int32)
        chars = np.asarray(self._chars[start + 1 : end], np.int32)
        return {"inputs": ids[:-1], "targets": ids[1:], "target_chars": chars}


TokenizeMany = Callable[[list[str], int], list[dict[str, np.ndarray]]]


def _write_split(
    source: Sequence[dict[str, Any]],
    text_key: str,
    tokenize_many: TokenizeMany,
    id_dtype: type,
    directory: Path,
    threads: int,
) -> None:
    """Tokenises every document of `source` in order and saves the three arrays."""
    ids_parts, chars_parts, lengths = [], [], []
    for start in range(0, len(source), CHUNK_DOCUMENTS):
        stop = min(start + CHUNK_DOCUMENTS, len(source))
        texts = [text_corpus.document_text(source[i], text_key) for i in range(start, stop)]
        docs = tokenize_many(texts, threads)
        lengths.extend(len(d["targets"]) + 1 for d in docs)
        ids_parts.extend(np.append(d["inputs"][:1], d["targets"]).astype(id_dtype) for d in docs)
        chars_parts.extend(np.append(np.int32(0), d["target_chars"]) for d in docs)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    empty = np.zeros(0, id_dtype)
    np.save(directory / "ids.npy", np.concatenate(ids_parts) if ids_parts else empty)
    np.save(directory / "chars.npy", np.concatenate(chars_parts) if chars_parts else empty)
    np.save(directory / "offsets.npy", offsets)


def tokenized_split(
    source: Sequence[dict[str, Any]],
    *,
    text_key: str,
    tokenizer: spm.SentencePieceProcessor,
    tokenize_many: TokenizeMany,
    corpus_identity: str,
    split: str,
    cache_dir: str | Path,
    threads: int = 0,
) -> TokenizedDocuments:
    """The split's pre-tokenised documents: built once (all cores unless `threads`), then cached
    under `cache_dir/tokens/` by corpus, split and tokenizer.

    `tokenize_many(texts, threads)` is the pipeline's per-document rule applied to many texts
    (`DocumentTokenizer.many`), so the cache cannot drift from on-the-fly tokenisation.
    """
    id_dtype = np.uint16 if tokenizer.vocab_size() <= np.iinfo(np.uint16).max + 1 else np.int32
    directory = (
        Path(cache_dir) / "tokens" / f"{split}-{split_key(corpus_identity, split, tokenizer)}"
    )
    if not (directory / "offsets.npy").is_file():
        directory.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{split}-"))
        try:
            threads = threads or os.cpu_count() or 1
            _write_split(source, text_key, tokenize_many, id_dtype, scratch, threads)
            try:  # Rename into place, so a concurrent or interrupted run never sees half a split.
                os.rename(scratch, directory)
            except OSError:  # another process finished first: keep its copy
                if not (directory / "offsets.npy").is_file():
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return TokenizedDocuments(directory)
