"""OLMoE by size: glam_jax/presets/olmoe.py builds it (`:size=1b_7b`, `:size=tiny`).

python -m glam_jax.param_count --config=configs/olmoe.py:size=1b_7b
python experiments/train.py --config=configs/olmoe.py:size=tiny --workdir=/tmp/olmoe_tiny
"""

from glam_jax.presets.olmoe import SIZES, get_config

__all__ = ["SIZES", "get_config"]
