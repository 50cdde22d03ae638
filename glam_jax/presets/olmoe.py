"""OLMoE (Muennighoff et al. 2024, AllenAI) on the same scanned model, by config only.

python -m glam_jax.param_count --config=configs/olmoe.py:size=1b_7b
python experiments/train.py --config=configs/olmoe.py:size=tiny --workdir=/tmp/olmoe_tiny
Sizes: 1b_7b (OLMoE-1B-7B-0924) and tiny (trains on a 2-core CPU like glam_tiny).

Every layer MoE: 64 SwiGLU experts, top-8 of a softmax over all experts, not renormalised
(norm_topk_prob=false); q/k RMSNorm over the whole projection; RoPE; untied head. The fields
are the published config.json's (https://huggingface.co/allenai/OLMoE-1B-7B-0924, config.json
at revision c1b31da), read by the same code that imports checkpoints (hf_families.py).
"""

import ml_collections

from glam_jax.presets.hf_families import sized_preset

OLMOE_1B_7B = {
    "model_type": "olmoe",
    "vocab_size": 50304,
    "hidden_size": 2048,
    "intermediate_size": 1024,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "norm_topk_prob": False,
    "router_aux_loss_coef": 0.01,
    "tie_word_embeddings": False,
    "clip_qkv": None,
    "attention_bias": False,
}
TINY = dict(
    OLMOE_1B_7B,
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=256,
)
# The OLMoE paper (Table 1 and the model card): 6.9B total, 1.3B active parameters.
SIZES = {"1b_7b": (OLMOE_1B_7B, "OLMoE-1B-7B", 6.9e9, 1.3e9), "tiny": (TINY, "", 0.0, 0.0)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """An OLMoE size (variant `size=`): the published 1b_7b or a CPU-sized tiny one."""
    return sized_preset(arg, SIZES, "OLMoE")
