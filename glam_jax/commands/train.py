"""Trains a glam_jax model (`glam-train`, experiments/train.py).

glam-train --config=glam_tiny --workdir=/tmp/glam_tiny
python experiments/train.py --config=configs/glam_tiny.py --workdir=/tmp/glam_tiny
python experiments/train.py --config=configs/glam.py:size=1_7b --workdir=... \
    --config.mesh.shape="(-1,8,1)" --config.data.text_files=/data/*.txt

--config is a config file or a preset name (glam_tiny, glam:size=1_7b, mixtral:size=tiny).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from glam_jax import cli, gpu_defaults, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file or preset name (optionally :variant)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and data cache go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    """Trains --config into --workdir (resuming from its newest checkpoint)."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax/jax INFO chatter; --verbosity=0 shows it
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)  # user errors: see glam_jax/cli.py


def entry() -> None:
    """The `glam-train` console script."""
    gpu_defaults.apply()  # XLA/CUDA settings for GPU hosts; nothing elsewhere
    cli.run(main)
