"""Token classes for routing analysis: each vocabulary piece gets exactly one class.

Classes are tried in order and the first whose predicate accepts the piece's text wins, so a
piece that is both a Python keyword and an English word ('in', 'for', 'not') falls into the
class listed first. Users add classes with `TokenClass(name, predicate)` or, from the command
line, a regular expression (`regex_class`). Pieces no class accepts are 'other'; control pieces
(BOS, EOS, padding, unknown) are 'special'.
"""

from __future__ import annotations

import dataclasses
import keyword
import re
import string
from collections.abc import Callable, Sequence

import numpy as np

from glam_jax.analysis.errors import AnalysisError

OTHER, SPECIAL = "other", "special"

# The most frequent English function words (articles, pronouns, prepositions, conjunctions,
# auxiliaries), lower case.
FUNCTION_WORDS = frozenset(
    """a an the and or but nor so yet if as at by for from in into of off on onto out over to up
    with about after before between through under until upon within without i me my mine we us
    our you your he him his she her it its they them their this that these those who whom whose
    which what there here is are was were be been being am do does did have has had will would
    shall should can could may might must not no thou thee thy thine""".split()
)
# Python keywords and builtin constants that are not also English function words.
CODE_KEYWORDS = (
    frozenset(
        set(keyword.kwlist) | set(keyword.softkwlist) | {"self", "cls", "print", "len", "range"}
    )
    - FUNCTION_WORDS
)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclasses.dataclass(frozen=True)
class TokenClass:
    """A named class of pieces; `matches` gets the piece's text with SentencePiece's '▁' as a
    space (leading/trailing spaces kept, so whitespace pieces can be recognised)."""

    name: str
    matches: Callable[[str], bool]


def _word(text: str) -> str:
    return text.strip()


def _is_whitespace(text: str) -> bool:
    return text != "" and text.strip() == ""


def _is_punctuation(text: str) -> bool:
    word = _word(text)
    return word != "" and all(c in string.punctuation or not c.isalnum() for c in word)


def _is_digits(text: str) -> bool:
    word = _word(text)
    return (
        word != ""
        and any(c.isdigit() for c in word)
        and all(c.isdigit() or c in ".,_" for c in word)
    )


def _is_code_keyword(text: str) -> bool:
    return _word(text) in CODE_KEYWORDS


def _is_function_word(text: str) -> bool:
    return _word(text).lower() in FUNCTION_WORDS


def _is_capitalised(text: str) -> bool:
    word = _word(text)
    return word[:1].isupper() and word.isalpha()


def _is_identifier(text: str) -> bool:
    """Looks like a program name rather than an English word: snake_case, camelCase, or letters
    mixed with digits."""
    word = _word(text)
    if not _IDENTIFIER.fullmatch(word):
        return False
    has_inner_upper = any(c.isupper() for c in word[1:]) and any(c.islower() for c in word)
    return "_" in word or has_inner_upper or any(c.isdigit() for c in word)


DEFAULT_CLASSES: tuple[TokenClass, ...] = (
    TokenClass("whitespace", _is_whitespace),
    TokenClass("punctuation", _is_punctuation),
    TokenClass("digits", _is_digits),
    TokenClass("code_keyword", _is_code_keyword),
    TokenClass("function_word", _is_function_word),
    TokenClass("identifier", _is_identifier),
    TokenClass("capitalised", _is_capitalised),
)
CLASS_NAMES = tuple(c.name for c in DEFAULT_CLASSES)


def regex_class(spec: str) -> TokenClass:
    """'name=REGEX' -> a class of pieces whose stripped text fully matches REGEX."""
    name, sep, pattern = spec.partition("=")
    name = name.strip()
    if not sep or not name or not pattern:
        raise AnalysisError(f"token class {spec!r} is not valid; write it as name=REGEX.")
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise AnalysisError(
            f"token class {name!r} has an invalid regular expression ({err})."
        ) from None
    return TokenClass(name, lambda text: compiled.fullmatch(text.strip()) is not None)


def select_classes(
    names: Sequence[str] | None = None, extra: Sequence[TokenClass] = ()
) -> list[TokenClass]:
    """The user's classes first (they are more specific), then the named built-in ones in the
    given order (default: all of them)."""
    known = {c.name: c for c in DEFAULT_CLASSES}
    chosen = list(extra)
    for name in CLASS_NAMES if names is None else names:
        if name not in known:
            raise AnalysisError(
                f"token class {name!r} is not known; valid: {', '.join(CLASS_NAMES)} "
                "(or add one as name=REGEX)."
            )
        chosen.append(known[name])
    seen: set[str] = set()
    for c in chosen:
        if c.name in seen or c.name in (OTHER, SPECIAL):
            raise AnalysisError(
                f"token class name {c.name!r} is used twice or reserved; rename it."
            )
        seen.add(c.name)
    return chosen


def piece_text(tokenizer, i: int) -> str | None:
    """The text a piece stands for ('▁' -> space, byte pieces decoded), None for control pieces."""
    if tokenizer.is_control(i) or tokenizer.is_unknown(i):
        return None
    piece = tokenizer.id_to_piece(i)
    if tokenizer.is_byte(i):
        return bytes([int(piece[3:5], 16)]).decode("latin-1")
    return piece.replace("\u2581", " ")


def classify_vocab(
    tokenizer, classes: Sequence[TokenClass], vocab_size: int
) -> tuple[np.ndarray, list[str]]:
    """(class id of every token id [vocab_size], class names). The names are the classes in
    order, then 'other' and 'special'; ids past the tokenizer's vocabulary are 'special'."""
    names = [c.name for c in classes] + [OTHER, SPECIAL]
    out = np.full(vocab_size, names.index(SPECIAL), np.int32)
    for i in range(min(tokenizer.vocab_size(), vocab_size)):
        text = piece_text(tokenizer, i)
        if text is None:
            continue
        out[i] = next((j for j, c in enumerate(classes) if c.matches(text)), names.index(OTHER))
    return out, names
