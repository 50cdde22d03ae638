"""The one variant parser of every config file (big_vision style): `config.py:key=value,...`.

A variant is `key=value` parts separated by ',' or '+' (`size=1_7b,experts=64`,
`moe+experts=64+unrolled`). A bare word sets a boolean key to True, or else the config's
positional key (GLaM's `1_7b` is `size=1_7b`). Values are read with the type of the key's
default: int, float, bool (true/false/1/0), tuples as 'x'-separated ints (`mesh=1x4x1`), str.
Unknown keys and values outside a key's choices are refused in one sentence.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from glam_jax.errors import GlamError

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class VariantError(GlamError):
    """A config variant string that cannot be read, in one sentence."""


def _read(key: str, text: str, default: Any, where: str) -> Any:
    """`text` as the type of `default` (the value of variant key `key`)."""
    try:
        if isinstance(default, bool):
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError(text)
            return text.lower() in _TRUE
        if isinstance(default, tuple):
            return tuple(int(v) for v in text.split("x"))
        if isinstance(default, int | float):
            return type(default)(text)
    except ValueError:
        kind = "true/false" if isinstance(default, bool) else type(default).__name__
        if isinstance(default, tuple):
            kind = "'x'-separated ints like 1x4x1"
        raise VariantError(f"{where} variant {key}={text!r} is not a valid {kind}.") from None
    return text


def parse_variant(
    arg: str | None,
    defaults: Mapping[str, Any],
    *,
    positional: str | None = None,
    choices: Mapping[str, Collection[Any]] | None = None,
    where: str = "config",
) -> dict[str, Any]:
    """`arg` read against `defaults` -> a dict with every key of `defaults` (see the module doc).

    positional: the key a bare word that is not a boolean key sets; choices: the values some
    keys accept; where: the config's name, for the error message.
    """
    variant = dict(defaults)
    for part in (arg or "").replace("+", ",").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, text = part.partition("=")
        key = key.strip()
        if not sep and isinstance(defaults.get(key), bool):
            variant[key] = True
        elif not sep and positional is not None:
            variant[positional] = _read(positional, key, defaults[positional], where)
        elif sep and key in defaults:
            variant[key] = _read(key, text.strip(), defaults[key], where)
        else:
            keys = ", ".join(k if isinstance(v, bool) else f"{k}=" for k, v in defaults.items())
            raise VariantError(f"{where} variant {part!r} is not known; valid: {keys}.")
    for key, valid in (choices or {}).items():
        if variant[key] not in valid:
            raise VariantError(
                f"{where} variant {key}={variant[key]!r} is not valid; valid: {sorted(valid)}."
            )
    return variant
