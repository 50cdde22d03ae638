"""Evaluates a checkpoint: held-out loss, perplexity and bits per character (`glam-eval`,
experiments/eval.py).

glam-eval --config=glam_tiny --workdir=/tmp/glam_tiny [--step=N] [--json]
"""

import json

from absl import flags, logging
from ml_collections import config_flags

from glam_jax import cli, gpu_defaults, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file or preset name the checkpoint was trained with."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_BATCHES = flags.DEFINE_integer("batches", 0, "Eval batches (0 = the whole validation split).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    """Prints the held-out metrics of --workdir's checkpoint."""
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    result = train.evaluate_checkpoint(
        _CONFIG.value, _WORKDIR.value, step=_STEP.value, max_batches=_BATCHES.value
    )
    if _JSON.value:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:20s} {value}")


def entry() -> None:
    """The `glam-eval` console script."""
    gpu_defaults.apply()  # XLA/CUDA settings for GPU hosts; nothing elsewhere
    cli.run(main)
