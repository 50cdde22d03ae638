"""Tiny GLaM: 4 layers (2 scanned dense+MoE blocks), 8 experts; trains on a 2-core CPU in minutes.

python experiments/train.py --config=configs/glam_tiny.py --workdir=/tmp/glam_tiny
Variants: `:router=switch_top1,k=1`, `:dispatch=dropless`, `:experts=4`.
glam_jax/presets/glam_tiny.py builds it.
"""

from glam_jax.presets.glam_tiny import VARIANT, get_config

__all__ = ["VARIANT", "get_config"]
