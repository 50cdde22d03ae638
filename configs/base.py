"""The base config every glam_jax config starts from (defaults in glam_jax/presets/base.py).

python experiments/train.py --config=configs/base.py --workdir=...  (the GLaM 0.1B/64E shapes)
"""

import ml_collections

from glam_jax.presets.base import get_base_config

__all__ = ["get_base_config", "get_config"]


def get_config() -> ml_collections.ConfigDict:
    """The base config as a config file."""
    return get_base_config()
