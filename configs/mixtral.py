"""The Mixtral family (Jiang et al. 2024) by size: glam_jax/presets/mixtral.py builds it.

python experiments/train.py --config=configs/mixtral.py:size=tiny --workdir=/tmp/mixtral_tiny
python -m glam_jax.param_count --config=configs/mixtral.py:size=8x7b
Sizes: 8x7b (Mixtral-8x7B-v0.1) and tiny (trains on a 2-core CPU like glam_tiny).
"""

from glam_jax.presets.mixtral import MIXTRAL_SIZES, get_config, mixtral_architecture

__all__ = ["MIXTRAL_SIZES", "get_config", "mixtral_architecture"]
