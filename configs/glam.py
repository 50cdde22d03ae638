"""The GLaM family (Du et al. 2021) by size: glam_jax/presets/glam.py builds it.

python experiments/train.py --config=configs/glam.py:size=1_7b --workdir=...
Sizes: 0_1b, 1_7b, 8b, 64b (all 64 experts, top-2, MoE every other layer).
"""

from glam_jax.presets.glam import GLAM_SIZES, get_config, get_dense_twin

__all__ = ["GLAM_SIZES", "get_config", "get_dense_twin"]
