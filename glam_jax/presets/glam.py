"""The GLaM family (Du et al. 2021, Table of model sizes), as one config with a size variant.

python experiments/train.py --config=configs/glam.py:size=1_7b,experts=64 --workdir=...
Sizes: 0_1b, 1_7b, 8b, 64b (all 64 experts, top-2, MoE every other layer); `experts=N`
changes the expert count.
"""

import ml_collections

from glam_jax.presets.base import get_base_config
from glam_jax.presets.variants import VariantError, parse_variant

# name: (layers, embed M, mlp H, heads, head_dim, experts, paper total, paper activated)
GLAM_SIZES = {
    "0_1b": (12, 768, 3072, 12, 64, 64, 1.9e9, 0.145e9),
    "1_7b": (24, 2048, 8192, 16, 128, 64, 27e9, 1.700e9),
    "8b": (32, 4096, 16384, 32, 128, 64, 143e9, 8.7e9),
    "64b": (64, 8192, 32768, 128, 128, 64, 1.2e12, 96.6e9),
}


VARIANT = {"size": "0_1b", "experts": 0}  # experts 0: the size's own count


def parse(arg: str | None) -> dict:
    """'size=1_7b,experts=64', '1_7b' or None (default 0_1b) -> {'size', 'experts'}."""
    variant = parse_variant(arg, VARIANT, positional="size", where="GLaM")
    variant["size"] = variant["size"].lower()
    if variant["size"] not in GLAM_SIZES:
        raise VariantError(
            f"GLaM size {variant['size']!r} is not known; valid: {sorted(GLAM_SIZES)}."
        )
    return variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """A GLaM size (variant `size=`), optionally with another expert count (`experts=`)."""
    variant = parse(arg)
    size = variant["size"]
    layers, m, h, heads, head_dim, experts, total, activated = GLAM_SIZES[size]
    config = get_base_config()
    c = config.model
    c.num_layers, c.embed_dim, c.mlp_dim = layers, m, h
    c.num_heads, c.head_dim = heads, head_dim
    c.max_len = 1024  # GLaM trains on 1024-token sequences
    config.moe.num_experts = variant["experts"] or experts
    config.train.seq_len = 1024
    config.train.batch_size = 1024  # GLaM: 1M tokens per batch
    config.train.eval_batch_size = 256
    config.paper = ml_collections.ConfigDict()  # published figures, printed by param_count
    config.paper.name = f"GLaM ({size.rstrip('b').replace('_', '.')}B/64E)"
    config.paper.total_params = total
    config.paper.activated_params = activated
    return config


def get_dense_twin(size: str) -> ml_collections.ConfigDict:
    """The same shapes with every FFN dense: the activated-FLOPs twin of the MoE model."""
    config = get_config(size)
    config.moe.num_experts = 0
    config.paper.name = "dense twin of " + config.paper.name
    config.paper.total_params = config.paper.activated_params
    return config
