"""A multi-domain text mix that every machine has: English prose (the embedded tiny
Shakespeare), source code (this interpreter's own standard-library `.py` files) and, where the
user has it, encyclopaedic text (WikiText-2 or any text file).

The standard-library files are split by their sorted position into a training half (even
positions) and a held-out half (odd positions), so the routing analysis can read code the
model never trained on.
"""

from __future__ import annotations

import glob
import importlib.resources
import os
import sysconfig

from glam_jax.analysis.errors import AnalysisError
from glam_jax.data.text_corpus import EMBEDDED_CORPORA

STDLIB_PARTS = ("train", "heldout")


def embedded_text_path(name: str = "tinyshakespeare") -> str:
    """Filesystem path of a corpus shipped inside the package (an ordinary install unpacks it)."""
    if name not in EMBEDDED_CORPORA:
        raise AnalysisError(
            f"embedded corpus {name!r} is not known; valid: {', '.join(sorted(EMBEDDED_CORPORA))}."
        )
    path = importlib.resources.files("glam_jax.data") / "corpus" / EMBEDDED_CORPORA[name]
    return os.fspath(path)


def stdlib_python_files(part: str = "train", max_bytes: int = 0) -> list[str]:
    """The top-level standard-library `.py` files of the running interpreter, sorted by name.

    part: 'train' (even positions) or 'heldout' (odd positions); max_bytes: stop before the
    files would exceed this many bytes (0 = all of the part).
    """
    if part not in STDLIB_PARTS:
        raise AnalysisError(f"stdlib part {part!r} is not valid; valid: {', '.join(STDLIB_PARTS)}.")
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    files = files[STDLIB_PARTS.index(part) :: 2]
    if not max_bytes:
        return files
    chosen, total = [], 0
    for path in files:
        size = os.path.getsize(path)
        if total + size > max_bytes:
            continue  # a smaller later file may still fit
        chosen.append(path)
        total += size
    return chosen
