"""Where documents come from: plain-text files prepared once into array_record by a TFDS
builder (so reads are random-access and cached), or an already-prepared TFDS catalog dataset.

Neither path imports TensorFlow: the builder writes array_record and both are read back through
TFDS data sources.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.resources
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from glam_jax.errors import GlamError

EMBEDDED_CORPORA = {"tinyshakespeare": "tinyshakespeare.txt"}
DOCUMENT_SPLITS = ("blank_line", "line", "file")
UNDECODABLE_POLICIES = ("error", "skip")  # data.undecodable_files: what a non-UTF-8 file gets
TEXT_KEY = "text"


class DataError(GlamError):
    """A data setting or input is wrong; the message names the value and what is valid."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Random-access train/validation documents plus a string that identifies their contents.

    `identity` keys caches built from the corpus (the trained tokenizer).
    """

    train: Sequence[dict[str, Any]]
    validation: Sequence[dict[str, Any]]
    text_key: str
    identity: str


def document_text(example: dict[str, Any], text_key: str) -> str:
    """The text of one stored example (TFDS `Text` features come back as bytes)."""
    value = example[text_key]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def embedded_corpus(name: str) -> Traversable:
    """The corpus file shipped inside the package, so the default works in any install."""
    if name not in EMBEDDED_CORPORA:
        raise DataError(
            f"data.corpus={name!r} is not an embedded corpus; valid names: "
            f"{', '.join(sorted(EMBEDDED_CORPORA))}."
        )
    return importlib.resources.files("glam_jax.data") / "corpus" / EMBEDDED_CORPORA[name]


def resolve_text_files(spec: str) -> list[Path]:
    """Expands `data.text_files` (comma-separated paths or globs) into existing files, in order."""
    paths: list[Path] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        item = os.path.expanduser(item)
        if glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"data.text_files glob {item!r} matches no file.")
            paths.extend(Path(p) for p in matches)
        elif os.path.isfile(item):
            paths.append(Path(item))
        else:
            raise DataError(f"data.text_files names {item!r}, which is not an existing file.")
    return paths


def iter_documents(lines: Iterable[str], document_split: str) -> Iterator[str]:
    """Splits one file's lines into documents; blank documents are dropped.

    'blank_line': paragraphs separated by one or more whitespace-only lines; 'line': each line;
    'file': the whole file. Documents keep inner newlines and lose the trailing one(s). The mode
    is validated by `prepare_text_corpus`.
    """
    if document_split == "file":
        text = "".join(lines).rstrip()
        if text:
            yield text
    elif document_split == "line":
        for line in lines:
            line = line.rstrip("\n")
            if line.strip():
                yield line
    else:
        paragraph: list[str] = []
        for line in lines:
            if line.strip():
                paragraph.append(line.rstrip("\n"))
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
        if paragraph:
            yield "\n".join(paragraph)


def read_text_file(file: Path | Traversable, undecodable_files: str = "error") -> str | None:
    """A file's text; None for a non-UTF-8 file under the 'skip' policy (a source tree gathered
    by a glob often holds a few Latin-1 files), else a DataError that names the file."""
    try:
        return file.read_text(encoding="utf-8")  # text mode: '\r\n' and '\r' become '\n'
    except UnicodeDecodeError as e:
        if undecodable_files == "skip":
            return None
        raise DataError(
            f"{file} is not UTF-8 text ({e.reason} at byte {e.start}); fix or remove it, or set "
            "data.undecodable_files='skip' to leave such files out."
        ) from None


def is_validation(text: str, validation_fraction: float) -> bool:
    """Hash-based split by document text: deterministic, and duplicates stay on one side."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < validation_fraction * 2**64


class GlamTextCorpus(tfds.core.GeneratorBasedBuilder):
    """Plain-text files as 'train' and 'validation' splits of {'text': document}."""

    VERSION = tfds.core.Version("1.0.0")
    # TFDS looks for a checksums file beside a packaged builder's code through the
    # `importlib_resources` backport, which is not installed; nothing is downloaded, so skip it.
    code_path = None

    def __init__(
        self,
        *,
        files: Sequence[Path | Traversable] = (),
        document_split: str = "blank_line",
        validation_fraction: float = 0.05,
        undecodable_files: str = "error",
        max_document_chars: int = 0,
        **kwargs: Any,
    ):
        # Defaults let TFDS rebuild the class read-only from an already-prepared directory.
        self._files = list(files)
        self._document_split = document_split
        self._validation_fraction = validation_fraction
        self._undecodable_files = undecodable_files
        self._max_document_chars = max_document_chars
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({TEXT_KEY: tfds.features.Text()})
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # Everything is local.
        return {
            "train": self._generate_examples(validation=False),
            "validation": self._generate_examples(validation=True),
        }

    def _generate_examples(self, validation: bool) -> Iterator[tuple[str, dict[str, str]]]:
        for key, doc in corpus_documents(
            self._files, self._document_split, self._undecodable_files, self._max_document_chars
        ):
            if is_validation(doc, self._validation_fraction) == validation:
                yield key, {TEXT_KEY: doc}


def _files_identity(files: Sequence[Path | Traversable], embedded: bool) -> list[Any]:
    """Content hash for the small embedded corpus; path, size and mtime for user files."""
    if embedded:
        return [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    return [[str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]


def corpus_documents(
    files: Sequence[Path | Traversable],
    document_split: str,
    undecodable_files: str = "error",
    max_document_chars: int = 0,
) -> Iterator[tuple[str, str]]:
    """(key, text) of every document the corpus keeps, in file order; both splits draw on it."""
    for file_index, file in enumerate(files):
        text = read_text_file(file, undecodable_files)
        if text is None:
            continue
        lines = io.StringIO(text).readlines()  # split at '\n' only, as iterating the file did
        for doc_index, doc in enumerate(iter_documents(lines, document_split)):
            if not max_document_chars or len(doc) <= max_document_chars:
                yield f"{file_index}-{doc_index}", doc


def _split_sizes(
    files: Sequence[Path | Traversable], validation_fraction: float, **documents: Any
) -> tuple[int, int]:
    """Documents per split (train, validation), counted only to explain an empty split."""
    num_eval = num_train = 0
    for _, doc in corpus_documents(files, **documents):
        if is_validation(doc, validation_fraction):
            num_eval += 1
        else:
            num_train += 1
    return num_train, num_eval


def prepare_text_corpus(
    files: Sequence[Path | Traversable],
    *,
    label: str,
    embedded: bool,
    document_split: str,
    validation_fraction: float,
    cache_dir: str | Path,
    undecodable_files: str = "error",
    max_document_chars: int = 0,
) -> Corpus:
    """Prepares (once, cached by corpus identity and split settings) and opens a text corpus."""
    if document_split not in DOCUMENT_SPLITS:
        raise DataError(
            f"data.document_split={document_split!r} is not valid; use one of "
            f"{', '.join(DOCUMENT_SPLITS)}."
        )
    if undecodable_files not in UNDECODABLE_POLICIES:
        raise DataError(
            f"data.undecodable_files={undecodable_files!r} is not valid; use one of "
            f"{', '.join(UNDECODABLE_POLICIES)}."
        )
    if not 0.0 < validation_fraction < 1.0:
        raise DataError(
            f"data.validation_fraction={validation_fraction} must be between 0 and 1 (exclusive)."
        )
    identity = json.dumps(
        {
            "files": _files_identity(files, embedded),
            "document_split": document_split,
            "validation_fraction": validation_fraction,
            "undecodable_files": undecodable_files,
            "max_document_chars": max_document_chars,
            "version": str(GlamTextCorpus.VERSION),
        },
        sort_keys=True,
    )
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    builder = GlamTextCorpus(
        files=files,
        document_split=document_split,
        validation_fraction=validation_fraction,
        undecodable_files=undecodable_files,
        max_document_chars=max_document_chars,
        data_dir=str(Path(cache_dir) / "corpora" / f"{label}-{key}"),
        file_format="array_record",
    )
    try:
        builder.download_and_prepare()
    except AssertionError:  # TFDS refuses to write an empty split; say which one and why.
        num_train, num_eval = _split_sizes(
            files,
            validation_fraction,
            document_split=document_split,
            undecodable_files=undecodable_files,
            max_document_chars=max_document_chars,
        )
        if num_train + num_eval == 0:
            raise DataError(f"corpus {label!r} is empty: it has no non-blank documents.") from None
        if num_train and num_eval:
            raise
        raise DataError(
            f"data.validation_fraction={validation_fraction} leaves the "
            f"{'train' if num_eval else 'validation'} split of corpus {label!r} empty "
            f"({num_train + num_eval} documents); use more documents or another fraction."
        ) from None
    return Corpus(
        train=builder.as_data_source(split="train"),
        validation=builder.as_data_source(split="validation"),
        text_key=TEXT_KEY,
        identity=identity,
    )


def open_catalog_corpus(
    name: str, *, data_dir: str, text_key: str, train_split: str, eval_split: str
) -> Corpus:
    """Opens an already-prepared (array_record) TFDS catalog dataset; never downloads."""
    sources = []
    for split in (train_split, eval_split):
        try:
            source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
        except Exception:  # TFDS raises many types here; the user needs one answer.
            raise DataError(
                f"data.tfds_name={name!r} (split {split!r}) is unknown or not prepared as "
                f"array_record under {data_dir or 'the TFDS default data dir'}; prepare it "
                "first (nothing is downloaded here)."
            ) from None
        if len(source) == 0:
            raise DataError(f"split {split!r} of TFDS dataset {name!r} is empty.")
        if text_key not in source[0]:
            raise DataError(
                f"data.tfds_text_key={text_key!r} is not a feature of TFDS dataset {name!r}; "
                f"its features are {', '.join(sorted(source[0]))}."
            )
        sources.append(source)
    identity = json.dumps(
        {"tfds": name, "data_dir": data_dir, "split": train_split, "text_key": text_key},
        sort_keys=True,
    )
    return Corpus(train=sources[0], validation=sources[1], text_key=text_key, identity=identity)
