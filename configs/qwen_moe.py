"""Qwen MoE by size: glam_jax/presets/qwen_moe.py builds it (`:size=qwen3_30b_a3b`,
`qwen3_235b_a22b`, `qwen1_5_a2_7b`, `tiny`, `qwen2_tiny`).

python -m glam_jax.param_count --config=configs/qwen_moe.py:size=qwen3_235b_a22b
python experiments/train.py --config=configs/qwen_moe.py:size=tiny --workdir=/tmp/qwen_tiny
"""

from glam_jax.presets.qwen_moe import SIZES, get_config

__all__ = ["SIZES", "get_config"]
