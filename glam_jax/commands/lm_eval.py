"""`glam-lm-eval`: lm-evaluation-harness's command line with the `glam_jax` model registered
(glam_jax/lm_eval_model.py; lm-eval reads no entry points, so its own `lm_eval` cannot see it).

glam-lm-eval --model glam_jax --model_args workdir=/tmp/glam_tiny --tasks hellaswag --num_fewshot 5
"""

from __future__ import annotations

import sys

from glam_jax import gpu_defaults
from glam_jax.errors import GlamError


def entry() -> None:
    """The `glam-lm-eval` console script; without lm-eval installed, one sentence."""
    gpu_defaults.apply()  # XLA/CUDA settings for GPU hosts; nothing elsewhere
    try:
        from lm_eval.__main__ import cli_evaluate

        import glam_jax.lm_eval_model  # noqa: F401  (registers "glam_jax" with lm-eval)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != "lm_eval":
            raise
        sys.exit('error: glam-lm-eval needs lm-eval; pip install "glam_jax[eval]" (or lm-eval).')
    try:
        cli_evaluate()
    except GlamError as err:
        sys.exit(f"error: {' '.join(str(err).split())}")
