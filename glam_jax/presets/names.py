"""Preset names for `--config`: `--config=glam_tiny` or `--config=glam:size=1_7b` instead of a path.

The installed commands (`glam-train`, ...) run outside a checkout, where `configs/*.py` do not
exist; the presets inside the package do. A `--config` value that is an existing file stays a
path; otherwise a name (before an optional `:variant`) of a module here with a `get_config`
becomes that module's file, which `ml_collections.config_flags` then loads like any config file.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil

from glam_jax.errors import GlamError

_HERE = os.path.dirname(os.path.abspath(__file__))


def preset_names() -> list[str]:
    """Modules of glam_jax.presets that define `get_config` (the loadable presets)."""
    names = []
    for info in pkgutil.iter_modules([_HERE]):
        module = importlib.import_module(f"glam_jax.presets.{info.name}")
        if callable(getattr(module, "get_config", None)):
            names.append(info.name)
    return sorted(names)


def resolve(value: str) -> str:
    """A `--config` value with a preset name replaced by the preset's file (variant kept).

    Paths (anything that exists, ends in .py or holds a path separator) are returned as they
    are, so config files keep their usual errors; an unknown bare name is one sentence.
    """
    name, colon, variant = value.partition(":")
    if os.path.exists(name) or name.endswith(".py") or os.sep in name or not name:
        return value
    if name not in preset_names():
        raise GlamError(
            f"--config={value}: {name!r} is neither a config file nor a preset; "
            f"presets: {', '.join(preset_names())} (or pass a path to a config .py file)."
        )
    return os.path.join(_HERE, f"{name}.py") + colon + variant


def expand_config_args(argv: list[str], flag: str = "config") -> list[str]:
    """argv with `--config=NAME[:variant]` (or `--config NAME`) pointing at the preset's file."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith(f"--{flag}="):
            out[i] = f"--{flag}=" + resolve(arg.split("=", 1)[1])
        elif arg == f"--{flag}" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
    return out


def load_config(value: str):
    """The ConfigDict of a config file or preset name with an optional `:variant`, loaded the
    way `config_flags` loads `--config` (the file's `get_config(variant)`), for programs that
    take a config as a plain string (the lm-eval adapter's `config=` model argument)."""
    path, colon, variant = resolve(value).partition(":")
    if not os.path.isfile(path):
        raise GlamError(f"config {value!r} is not an existing file or a preset name.")
    spec = importlib.util.spec_from_file_location("glam_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise GlamError(f"config file {path!r} has no get_config() function.")
    return module.get_config(variant) if colon else module.get_config()
