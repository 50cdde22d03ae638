"""SentencePiece tokenizer: load a given model, or train one on the training documents only and
cache it beside the prepared corpora, so every run on the same corpus shares one vocabulary.

Trained models are lossless (`decode(encode(text)) == text`): identity normalisation, no dummy
prefix, whitespace kept, '\\n' a piece of its own and, from 512 pieces up, byte fallback for
characters outside the vocabulary. Special ids: pad 0, unk 1, bos 2, eos 3.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from glam_jax.data.text_corpus import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("unigram", "bpe")
# Byte fallback costs 256 pieces, so only vocabularies at least this large get it.
MIN_VOCAB_FOR_BYTE_FALLBACK = 512
# Caps the text fed to the trainer so training stays in seconds to a few minutes on any corpus.
MAX_TRAINING_CHARS = 20_000_000
# Bump when the trainer settings below change, so cached models are retrained.
TRAINER_VERSION = 1


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    """Loads a SentencePiece model that must define BOS and EOS (documents are framed by them)."""
    if not os.path.isfile(path):
        raise DataError(f"data.tokenizer_path={str(path)!r} is not an existing file.")
    tokenizer = spm.SentencePieceProcessor()
    try:
        tokenizer.Load(str(path))
    except (OSError, RuntimeError):
        raise DataError(
            f"data.tokenizer_path={str(path)!r} is not a SentencePiece model."
        ) from None
    if tokenizer.bos_id() < 0 or tokenizer.eos_id() < 0:
        raise DataError(
            f"tokenizer {str(path)!r} has no BOS or EOS piece; the pipeline needs both."
        )
    return tokenizer


def piece_char_counts(tokenizer: spm.SentencePieceProcessor) -> np.ndarray:
    """Characters of text each piece id stands for, assuming a lossless tokenizer: a piece's
    length ('▁' is one space), 1 for a byte piece that starts a UTF-8 character, else 0."""
    counts = np.zeros(tokenizer.vocab_size(), np.int32)
    for i in range(tokenizer.vocab_size()):
        if tokenizer.is_byte(i):
            counts[i] = int(tokenizer.id_to_piece(i)[3:5], 16) & 0xC0 != 0x80
        elif not (tokenizer.is_control(i) or tokenizer.is_unknown(i)):
            counts[i] = len(tokenizer.id_to_piece(i))
    return counts


def _training_lines(documents: Iterable[str], max_chars: int) -> Iterator[str]:
    """Non-blank lines of the documents, up to `max_chars` characters in all."""
    total = 0
    for doc in documents:
        for line in doc.split("\n"):
            if line.strip():
                yield line
                total += len(line)
                if total >= max_chars:
                    return


def train_tokenizer(
    documents: Iterable[str], *, vocab_size: int, model_type: str, seed: int
) -> bytes:
    """Trains a SentencePiece model on the documents and returns its serialised proto.

    The vocabulary may come out smaller than `vocab_size` on a corpus too small to fill it.
    """
    if model_type not in MODEL_TYPES:
        raise DataError(
            f"data.spm_model_type={model_type!r} is not valid; use one of {', '.join(MODEL_TYPES)}."
        )
    byte_fallback = vocab_size >= MIN_VOCAB_FOR_BYTE_FALLBACK
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(documents, MAX_TRAINING_CHARS),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            user_defined_symbols=["\n"],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            byte_fallback=byte_fallback,
            character_coverage=0.9999 if byte_fallback else 1.0,
            hard_vocab_limit=False,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        reason = str(e).splitlines()[-1] if str(e) else type(e).__name__
        raise DataError(
            f"cannot train a SentencePiece tokenizer with model.vocab_size={vocab_size} on this "
            f"corpus: {reason}"
        ) from None
    return model.getvalue()


def get_tokenizer(
    *,
    tokenizer_path: str,
    cache_dir: str | Path,
    corpus_identity: str,
    documents: Iterable[str],
    vocab_size: int,
    model_type: str,
    seed: int,
) -> spm.SentencePieceProcessor:
    """Loads `tokenizer_path`, else the cached model for this corpus, vocab size and model type,
    else trains one on `documents` (the training split) and caches it."""
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        key = hashlib.sha256(f"{corpus_identity}|{TRAINER_VERSION}".encode()).hexdigest()[:16]
        path = Path(cache_dir) / "tokenizers" / f"spm-{key}-{model_type}-{vocab_size}.model"
        if not path.is_file():
            proto = train_tokenizer(
                documents, vocab_size=vocab_size, model_type=model_type, seed=seed
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so a concurrent or interrupted run never sees half a model.
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as f:
                f.write(proto)
            os.replace(f.name, path)
        tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size() > vocab_size:
        raise DataError(
            f"tokenizer has {tokenizer.vocab_size()} pieces, more than model.vocab_size="
            f"{vocab_size}; raise model.vocab_size or use a smaller tokenizer."
        )
    return tokenizer
