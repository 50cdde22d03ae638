"""Runs a command-line tool so that a mistake of its user is one sentence, never a traceback.

`cli.run(main)` replaces `absl.app.run(main)` in every entry point. An error the user caused
(a bad flag or config field, a config file or path that does not exist, any GlamError) is
printed as one `error: ...` line on stderr and the tool exits with status 1. Anything else is a
bug and keeps its traceback; `GLAMJAX_DEBUG=1` shows the traceback of user errors too.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

from absl import app, flags

from glam_jax.errors import GlamError
from glam_jax.presets import names

# ml_collections words a misspelt field as: 'routr'\nDid you mean "router" instead of "routr"?
_DID_YOU_MEAN = re.compile(r'[Dd]id you mean "([^"]+)" instead of "([^"]+)"')


def _debug() -> bool:
    return os.environ.get("GLAMJAX_DEBUG", "") not in ("", "0")


def _fail(message: str) -> None:
    sys.exit(f"error: {' '.join(message.split())}")


def _config_flag(argv: list[str], key: str) -> str:
    """The command-line argument that set config field `key` (for the message)."""
    for arg in argv:
        name = arg.lstrip("-").split("=", 1)[0]
        if name.split(".")[-1] == key or name.endswith(f".{key}"):
            return arg
    return key


def config_error_sentence(err: Exception, argv: list[str]) -> str:
    """One sentence for a config file or `--config.*` override that ml_collections refused."""
    text = str(err).replace("\\n", "\n").replace("\\'", "'")
    match = _DID_YOU_MEAN.search(text)
    if match:
        suggestion, key = match.groups()
        return (
            f"{_config_flag(argv, key)}: the config has no field {key!r}; "
            f'did you mean "{suggestion}"?'
        )
    if isinstance(err, (KeyError, AttributeError)):
        key = text.strip("'\" \n").splitlines()[0].strip("'\"")
        return f"{_config_flag(argv, key)}: the config has no field {key!r}."
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Failed loading config file" in text:
        return f"cannot load the config file: {lines[-1]}."
    return f"{lines[0]} ({lines[-1]})" if len(lines) > 1 else (lines[0] if lines else repr(err))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one-line errors (absl prints two lines; ml_collections raises).

    A `--config` that names a preset (`--config=glam_tiny:experts=4`) becomes the preset's file
    first (glam_jax/presets/names.py), so installed commands need no checkout.
    """
    try:
        if "config" in flags.FLAGS:
            argv = names.expand_config_args(argv)
        return flags.FLAGS(argv)
    except GlamError as err:
        _fail(str(err))
    except flags.Error as err:
        _fail(f"{err} (see --helpshort).")
    except (KeyError, AttributeError, OSError, TypeError, ValueError) as err:
        if _debug():
            raise
        _fail(config_error_sentence(err, argv))
    return []  # not reached: _fail exits


def guarded(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """`main` with user errors (GlamError, a missing or unwritable file) turned into one line."""

    def wrapped(argv: list[str]) -> None:
        try:
            main(argv)
        except GlamError as err:
            if _debug():
                raise
            _fail(str(err))
        except OSError as err:  # a path the user gave: missing, a directory, not writable...
            if _debug():
                raise
            if "Failed loading config file" in str(err):  # ml_collections defers this one
                _fail(config_error_sentence(err, argv))
            if err.strerror is None:
                raise
            where = f": {err.filename}" if err.filename else ""
            _fail(f"{err.strerror}{where}.")

    return wrapped


def run(main: Callable[[list[str]], None]) -> None:
    """absl.app.run(main) with one-line user errors and exit status 1."""
    app.run(guarded(main), flags_parser=parse_flags)
