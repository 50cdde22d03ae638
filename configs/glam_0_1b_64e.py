"""GLaM (0.1bB/64E) with the published shapes; the same as configs/glam.py:size=0_1b."""

import ml_collections

from glam_jax.presets import glam


def get_config() -> ml_collections.ConfigDict:
    return glam.get_config("0_1b")
