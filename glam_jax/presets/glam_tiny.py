"""Tiny GLaM (the preset behind configs/glam_tiny.py): 4 layers, 8 experts; minutes on 2 CPU cores.

python experiments/train.py --config=configs/glam_tiny.py --workdir=/tmp/glam_tiny
Variants: `:router=switch_top1,k=1`, `:dispatch=dropless`, `:experts=4`.
"""

import ml_collections

from glam_jax.presets.base import get_base_config
from glam_jax.presets.variants import parse_variant

VARIANT = {"router": "gshard_top2", "k": 2, "dispatch": "einsum", "experts": 8}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The tiny GLaM, with the variant's router (k), dispatch path and expert count."""
    variant = parse_variant(arg, VARIANT, where="glam_tiny")
    config = get_base_config()
    m = config.model
    m.vocab_size = 2048  # SentencePiece trained on tiny Shakespeare at first use
    m.num_layers = 4  # 2 blocks of (dense, MoE)
    m.embed_dim = 128
    m.mlp_dim = 512
    m.num_heads = 4
    m.head_dim = 32
    m.max_len = 256
    m.dtype = "float32"  # CPU: float32 is faster than emulated bfloat16
    config.moe.num_experts = variant["experts"]
    config.moe.router, config.moe.num_selected = variant["router"], variant["k"]
    config.moe.dispatch = variant["dispatch"]
    config.moe.group_size = 256  # tokens per routing group (<= tokens per device up to 8 devices)
    t = config.train
    t.batch_size = 16
    t.eval_batch_size = 32
    t.seq_len = 128
    t.steps = 500
    t.learning_rate = 0.05  # Adafactor (relative step); reaches ~2.3 bits/char in 200 steps
    t.warmup_steps = 50
    t.log_every = 25
    t.eval_every = 100
    t.checkpoint_every = 250
    return config
