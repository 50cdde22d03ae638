"""Tiny GLaM trained on a multi-domain mix for the what-experts-learn study (issue 15):
tiny Shakespeare (prose), half of this interpreter's standard-library `.py` files (code) and,
optionally, an encyclopaedic text file such as WikiText-2's validation split.

python experiments/train.py \
    --config=configs/glam_tiny_multidomain.py:wiki=/path/wikitext2_valid.txt \
    --workdir=/tmp/glam_multidomain
Without `wiki=` the mix is prose and code only. 600 steps used 14 minutes of CPU time (about
7 minutes on two idle cores; docs/research/what_experts_learn.md).
"""

import ml_collections

from glam_jax.analysis.corpus import embedded_text_path, stdlib_python_files
from glam_jax.presets.glam_tiny import get_config as get_tiny_config

CODE_BYTES = 1_200_000  # standard-library code kept about as large as tiny Shakespeare (1.1 MB)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: '' or 'wiki=PATH' (an encyclopaedic text file added to the mix)."""
    config = get_tiny_config()
    files = [embedded_text_path("tinyshakespeare"), *stdlib_python_files("train", CODE_BYTES)]
    if arg:
        key, _, path = arg.partition("=")
        if key.strip() != "wiki" or not path.strip():
            raise ValueError(f"config variant {arg!r} is not valid; use wiki=PATH or nothing.")
        files.append(path.strip())
    config.data.text_files = ",".join(files)  # comma-separated files of all domains
    config.data.document_split = "blank_line"  # paragraphs of prose, blocks of code
    t = config.train
    t.steps = 600  # three domains need a little longer than Shakespeare alone
    t.eval_every = 200
    t.eval_batches = 20  # a fixed held-out sample keeps evaluation cheap
    t.checkpoint_every = 300
    return config
