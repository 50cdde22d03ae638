"""Labelled text for routing analysis: `domain=GLOB` specs -> batches of packed rows.

Each file is one document (BOS, its pieces, EOS; every token with its class, see
token_classes.py); a domain's documents are packed one after
another into rows of S tokens, a document running on into the next row where it is longer,
so no padding is spent inside a domain. Every row holds one domain. A budget of tokens per
domain keeps the domains balanced and the run bounded; files are read lazily, one at a time.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Iterator, Sequence

import numpy as np

from glam_jax.analysis.errors import AnalysisError
from glam_jax.analysis.token_classes import TokenClassifier


@dataclasses.dataclass(frozen=True)
class Domain:
    """A named text domain and the files that hold it."""

    name: str
    files: tuple[str, ...]


@dataclasses.dataclass
class TextBatch:
    """B rows of S tokens; segment 0 marks padding. `scored` tokens enter the statistics
    (everything but padding and BOS); `domain` is each row's domain index."""

    tokens: np.ndarray  # [B, S] int32
    token_class: np.ndarray  # [B, S] int32, index into the classifier's names
    segment_ids: np.ndarray  # [B, S] int32
    positions: np.ndarray  # [B, S] int32
    scored: np.ndarray  # [B, S] bool
    domain: np.ndarray  # [B] int32

    @property
    def pairs(self) -> np.ndarray:
        """[B, S]: (t-1, t) are consecutive scored tokens of one document (False at t = 0)."""
        same = np.zeros_like(self.scored)
        same[:, 1:] = (
            self.scored[:, 1:]
            & self.scored[:, :-1]
            & (self.segment_ids[:, 1:] == self.segment_ids[:, :-1])
        )
        return same


def parse_text_files(spec: str | Sequence[str]) -> list[Domain]:
    """'code=GLOB,prose=GLOB' (or a list of 'label=GLOB') -> domains with their files, in
    order of first mention; a label may appear more than once."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    files: dict[str, list[str]] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        label, sep, pattern = item.partition("=")
        label, pattern = label.strip(), os.path.expanduser(pattern.strip())
        if not sep or not label or not pattern:
            raise AnalysisError(f"text spec {item!r} is not valid; write it as domain=GLOB.")
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise AnalysisError(f"text glob {pattern!r} of domain {label!r} matches no file.")
        files.setdefault(label, []).extend(matches)
    if not files:
        raise AnalysisError("no text given; pass --text_files=domain=GLOB,other_domain=GLOB.")
    return [Domain(name, tuple(paths)) for name, paths in files.items()]


def read_text(path: str) -> str:
    """A file's text; empty or non-UTF-8 files are refused in one sentence."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise AnalysisError(f"text file {path!r} is not UTF-8 ({err.reason}).") from None
    if not text.strip():
        raise AnalysisError(f"text file {path!r} is empty; give files that hold text.")
    return text


def _domain_rows(
    domain: Domain, tokenizer, classifier: TokenClassifier, length: int, max_tokens: int
) -> Iterator[np.ndarray]:
    """[4, S] rows (tokens, token classes, segment ids, positions) of one domain, up to
    max_tokens tokens."""
    row: list[list[int]] = [[], [], [], []]
    emitted = 0
    for path in domain.files:
        ids, classes = classifier.encode(tokenizer, read_text(path))
        special = classifier.special
        ids = [tokenizer.bos_id(), *ids, tokenizer.eos_id()]
        classes = [special, *classes.tolist(), special]
        if max_tokens:
            ids, classes = ids[: max_tokens - emitted], classes[: max_tokens - emitted]
        start = 0
        while start < len(ids):
            take = min(length - len(row[0]), len(ids) - start)
            segment = (row[2][-1] + 1) if row[2] else 1
            row[0] += ids[start : start + take]
            row[1] += classes[start : start + take]
            row[2] += [segment] * take
            row[3] += list(range(take))
            start += take
            if len(row[0]) == length:
                yield np.array(row)
                row = [[], [], [], []]
        emitted += len(ids)
        if max_tokens and emitted >= max_tokens:
            break
    if row[0]:
        out = np.zeros((4, length), np.int64)
        out[:, : len(row[0])] = row
        yield out


def text_batches(
    domains: Sequence[Domain],
    tokenizer,
    classifier: TokenClassifier,
    *,
    rows: int,
    length: int,
    max_tokens: int,
) -> Iterator[TextBatch]:
    """Batches of `rows` rows, the domains' rows interleaved; the last batch is padded."""
    streams = [_domain_rows(d, tokenizer, classifier, length, max_tokens) for d in domains]
    pending: list[tuple[int, np.ndarray]] = []
    active = list(range(len(streams)))
    while active:
        for d in list(active):
            row = next(streams[d], None)
            if row is None:
                active.remove(d)
                continue
            pending.append((d, row))
            if len(pending) == rows:
                yield _batch(pending, length, tokenizer.bos_id())
                pending = []
    if pending:
        yield _batch(pending, length, tokenizer.bos_id(), rows)


def _batch(pending, length: int, bos: int, rows: int = 0) -> TextBatch:
    rows = rows or len(pending)
    arrays = np.zeros((4, rows, length), np.int32)
    domain = np.zeros(rows, np.int32)
    for r, (d, row) in enumerate(pending):
        arrays[:, r] = row
        domain[r] = d
    tokens, token_class, segment_ids, positions = arrays
    scored = (segment_ids > 0) & (tokens != bos)
    return TextBatch(tokens, token_class, segment_ids, positions, scored, domain)


def estimate_tokens(domains: Sequence[Domain], max_tokens: int) -> int:
    """About how many tokens the batches will hold, for a progress bar: file sizes at 4 bytes
    per token, capped by the budget (so no file is read twice)."""
    total = 0
    for d in domains:
        size = sum(os.path.getsize(p) for p in d.files) // 4
        total += min(size, max_tokens) if max_tokens else size
    return total
