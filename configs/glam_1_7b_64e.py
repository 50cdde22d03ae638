"""GLaM (1.7bB/64E) with the published shapes; the same as configs/glam.py:size=1_7b."""

import ml_collections

from glam_jax.presets import glam


def get_config() -> ml_collections.ConfigDict:
    return glam.get_config("1_7b")
