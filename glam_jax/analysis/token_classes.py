"""Token classes for routing analysis, decided per token occurrence from the token's text and
the word it sits in, so a sub-word piece of `foo_bar` counts as an identifier and the pieces of
`Westminster` as a capitalised word, whatever the tokenizer's vocabulary.

Each token gets exactly one class: the first class (in order) whose predicate accepts it, so a
word that is both a Python keyword and an English function word ('in', 'for', 'not') falls
into the class listed first. A predicate sees the token's text (its surface in the document,
spaces as spaces) and its word: the run of word characters (`\\w+`) that holds the token's
first word character, or '' for a token with none. Users add classes with
`TokenClass(name, predicate)` or, from the command line, a regular expression (`regex_class`).
Tokens no class accepts are 'other'; BOS and EOS are 'special'.
"""

from __future__ import annotations

import bisect
import dataclasses
import keyword
import re
from collections.abc import Callable, Sequence

import numpy as np

from glam_jax.analysis.errors import AnalysisError

OTHER, SPECIAL = "other", "special"

# The most frequent English function words (articles, pronouns, prepositions, conjunctions,
# auxiliaries, and Shakespeare's thou/thee/thy), lower case.
FUNCTION_WORDS = frozenset(
    """a an the and or but nor so yet if as at by for from in into of off on onto out over to up
    with about after before between through under until upon within without i me my mine we us
    our you your he him his she her it its they them their this that these those who whom whose
    which what there here is are was were be been being am do does did have has had will would
    shall should can could may might must not no thou thee thy thine""".split()
)
# Python keywords and a few names every program uses, less those that are English function words.
CODE_KEYWORDS = (
    frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | {"self", "cls"}
) - FUNCTION_WORDS
_WORD = re.compile(r"\w+")


@dataclasses.dataclass(frozen=True)
class TokenClass:
    """A named class of tokens; `matches(text, word)` as in the module docstring."""

    name: str
    matches: Callable[[str, str], bool]


def _is_whitespace(text: str, word: str) -> bool:
    return text != "" and text.strip() == ""


def _is_punctuation(text: str, word: str) -> bool:
    body = text.strip()
    return body != "" and not any(c.isalnum() or c == "_" for c in body)


def _is_digits(text: str, word: str) -> bool:
    return word.isdigit()


def _is_code_keyword(text: str, word: str) -> bool:
    return word in CODE_KEYWORDS


def _is_function_word(text: str, word: str) -> bool:
    return word.lower() in FUNCTION_WORDS


def _is_identifier(text: str, word: str) -> bool:
    """A program name rather than an English word: snake_case, camelCase or letters with digits."""
    if not word or word[0].isdigit():
        return False
    inner_upper = any(c.isupper() for c in word[1:]) and any(c.islower() for c in word)
    return "_" in word or inner_upper or any(c.isdigit() for c in word)


def _is_capitalised(text: str, word: str) -> bool:
    return word[:1].isupper() and word.isalpha()


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
    """'name=REGEX' -> tokens whose word (or, outside words, stripped text) fully matches."""
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
    return TokenClass(name, lambda text, word: compiled.fullmatch(word or text.strip()) is not None)


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


def token_words(surfaces: Sequence[str]) -> list[str]:
    """For each token (its surface text, in order), the word holding its first word character."""
    text = "".join(surfaces)
    spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    starts = [s for s, _ in spans]
    words, pos = [], 0
    for surface in surfaces:
        first = next((i for i, ch in enumerate(surface) if ch.isalnum() or ch == "_"), None)
        word = ""
        if first is not None:
            j = bisect.bisect_right(starts, pos + first) - 1
            if j >= 0 and spans[j][0] <= pos + first < spans[j][1]:
                word = text[spans[j][0] : spans[j][1]]
        words.append(word)
        pos += len(surface)
    return words


class TokenClassifier:
    """Tokenises text and gives every token its class index into `names`."""

    def __init__(self, classes: Sequence[TokenClass]):
        self.classes = list(classes)
        self.names = [c.name for c in self.classes] + [OTHER, SPECIAL]
        self.special = len(self.names) - 1
        self._cache: dict[tuple[str, str], int] = {}

    def classify(self, text: str, word: str) -> int:
        """Index of the first class matching the piece `text` inside `word` (last: 'other')."""
        key = (text, word)
        if key not in self._cache:
            found = (i for i, c in enumerate(self.classes) if c.matches(text, word))
            self._cache[key] = next(found, len(self.classes))  # 'other'
        return self._cache[key]

    def encode(self, tokenizer, text: str) -> tuple[list[int], np.ndarray]:
        """(token ids, class index per token) of `text`, without BOS/EOS."""
        pieces = tokenizer.encode(text, return_type="proto").pieces
        surfaces = [p.surface for p in pieces]
        words = token_words(surfaces)
        classes = [self.classify(s, w) for s, w in zip(surfaces, words, strict=True)]
        return [p.id for p in pieces], np.asarray(classes, np.int32)
