"""Qwen's MoE models (Qwen1.5-MoE / Qwen2-MoE and Qwen3-MoE) on the same scanned model.

python -m glam_jax.param_count --config=configs/qwen_moe.py:size=qwen3_30b_a3b
python experiments/train.py --config=configs/qwen_moe.py:size=tiny --workdir=/tmp/qwen_tiny
Sizes: qwen3_30b_a3b, qwen3_235b_a22b (Qwen3-MoE: 128 experts, top-8, renormalised gates,
per-head q/k RMSNorm, GQA), qwen1_5_a2_7b (Qwen2-MoE architecture: 60 experts, top-4, q/k/v
biases, a sigmoid-gated shared expert), tiny (a CPU-sized Qwen3-MoE) and qwen2_tiny (a
CPU-sized Qwen2-MoE with one dense layer, mlp_only_layers=[0]).

The fields are the published config.json's (huggingface.co/Qwen/Qwen3-30B-A3B,
Qwen/Qwen3-235B-A22B, Qwen/Qwen1.5-MoE-A2.7B), read by the same code that imports
checkpoints (hf_families.py).
"""

import ml_collections

from glam_jax.presets.hf_families import sized_preset

QWEN3_30B_A3B = {
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "use_sliding_window": False,
}
QWEN3_235B_A22B = dict(
    QWEN3_30B_A3B,
    hidden_size=4096,
    intermediate_size=12288,
    moe_intermediate_size=1536,
    num_hidden_layers=94,
    num_attention_heads=64,
    num_key_value_heads=4,
)
QWEN1_5_A2_7B = {
    "model_type": "qwen2_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "norm_topk_prob": False,
    "decoder_sparse_step": 1,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
}
_TINY = dict(
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=256,
)
TINY = dict(QWEN3_30B_A3B, **_TINY)
QWEN2_TINY = dict(QWEN1_5_A2_7B, **_TINY, shared_expert_intermediate_size=128, mlp_only_layers=[0])
# Published totals: the Qwen3 technical report (Table 1) and model cards (30.5B / 3.3B,
# 235B / 22B); the Qwen1.5-MoE-A2.7B model card (14.3B / 2.7B).
SIZES = {
    "qwen3_30b_a3b": (QWEN3_30B_A3B, "Qwen3-30B-A3B", 30.5e9, 3.3e9),
    "qwen3_235b_a22b": (QWEN3_235B_A22B, "Qwen3-235B-A22B", 235e9, 22e9),
    "qwen1_5_a2_7b": (QWEN1_5_A2_7B, "Qwen1.5-MoE-A2.7B", 14.3e9, 2.7e9),
    "tiny": (TINY, "", 0.0, 0.0),
    "qwen2_tiny": (QWEN2_TINY, "", 0.0, 0.0),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """A Qwen MoE size (variant `size=`, see the module docstring)."""
    return sized_preset(arg, SIZES, "Qwen MoE")
