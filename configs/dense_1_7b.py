"""Dense baseline with the shapes of GLaM (1.7bB/64E): every FFN dense, no experts."""

import ml_collections

from glam_jax.presets import glam


def get_config() -> ml_collections.ConfigDict:
    return glam.get_dense_twin("1_7b")
