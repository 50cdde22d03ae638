"""The Mixtral family (Jiang et al. 2024) on the same scanned model as GLaM, by config only.

python experiments/train.py --config=configs/mixtral.py:size=tiny --workdir=/tmp/mixtral_tiny
python -m glam_jax.param_count --config=configs/mixtral.py:size=8x7b
Sizes: 8x7b (Mixtral-8x7B-v0.1) and tiny (trains on a 2-core CPU like glam_tiny).

Every layer is MoE (moe.every=1): RoPE, grouped-query attention, RMSNorm, SwiGLU experts,
top-2 of 8 with softmax over the 2 kept logits, dropless, untied output projection.
Hugging Face checkpoints of this family load through glam_jax/hf_checkpoint.py.
"""

import ml_collections

from glam_jax.presets.base import get_base_config
from glam_jax.presets.variants import VariantError, parse_variant

# name: (layers, embed M, expert mlp H, heads, kv heads, head_dim, vocab, experts, max_len,
#        rope theta, paper total, paper activated)
MIXTRAL_SIZES = {
    "8x7b": (32, 4096, 14336, 32, 8, 128, 32000, 8, 32768, 1e6, 46.7e9, 12.9e9),
    "tiny": (4, 128, 256, 4, 2, 32, 2048, 8, 256, 1e4, None, None),
}


def parse_size(arg: str | None) -> str:
    """'size=8x7b', '8x7b' or None (default tiny) -> a key of MIXTRAL_SIZES."""
    size = parse_variant(arg, {"size": "tiny"}, positional="size", where="Mixtral")["size"]
    if size.lower() not in MIXTRAL_SIZES:
        raise VariantError(f"Mixtral size {size!r} is not known; valid: {sorted(MIXTRAL_SIZES)}.")
    return size.lower()


def mixtral_architecture(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Sets the fields that make a base config a Mixtral (sizes are left to the caller)."""
    m, e = config.model, config.moe
    m.norm = "rmsnorm"  # HF MixtralRMSNorm: x * rsqrt(mean(x^2) + eps) * weight
    m.norm_eps = 1e-5  # HF rms_norm_eps
    m.ffn_activation = "silu"  # SwiGLU experts: silu(x w1) * (x w3) w2
    m.ffn_glu = True
    m.position = "rope"  # half-split (rotate_half) RoPE, as in the HF layout
    m.sliding_window = 0  # Mixtral-8x7B-v0.1 uses full attention (Mistral-7B-v0.1 used 4096)
    m.attention_scale = 0.0  # 1/sqrt(head_dim)
    m.tie_embeddings = False  # separate lm_head [embed, vocab]
    m.logits_via_embedding_scale = False  # only applies to tied embeddings; off for clarity
    e.every = 1  # every layer is MoE
    e.moe_index_in_block = 0
    e.router = "topk_softmax"  # top-2 of the logits, softmax over the 2 kept
    e.num_selected = 2
    e.dispatch = "dropless"  # Mixtral never drops tokens
    e.decode_dispatch = "dropless"
    e.aux_loss_weight = 0.02  # router_aux_loss_coef in Mixtral-8x7B-v0.1 config.json
    e.z_loss_weight = 0.0  # Mixtral trains without a router z-loss
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """A Mixtral size (variant `size=`): the published 8x7b shapes or a CPU-sized tiny one."""
    size = parse_size(arg)
    layers, m, h, heads, kv, head_dim, vocab, experts, max_len, theta, total, active = (
        MIXTRAL_SIZES[size]
    )
    config = mixtral_architecture(get_base_config())
    c = config.model
    c.num_layers, c.embed_dim, c.mlp_dim = layers, m, h
    c.num_heads, c.num_kv_heads, c.head_dim = heads, kv, head_dim
    c.vocab_size, c.max_len, c.rope_theta = vocab, max_len, theta
    config.moe.num_experts = experts
    if size == "tiny":
        c.dtype = "float32"  # CPU: float32 is faster than emulated bfloat16
        config.moe.group_size = 256  # tokens per routing group (<= tokens per device)
        t = config.train
        t.batch_size, t.eval_batch_size, t.seq_len = 16, 32, 128
        t.steps, t.learning_rate, t.warmup_steps = 600, 0.05, 50
        t.log_every, t.eval_every, t.checkpoint_every = 25, 200, 200
    else:
        config.train.seq_len = 4096  # sets the attention FLOPs param_count prints
        config.train.batch_size = 256
        config.train.eval_batch_size = 256
        config.moe.group_size = 4096  # one routing group per row
        config.paper = ml_collections.ConfigDict()  # published figures, printed by param_count
        config.paper.name = f"Mixtral {size.upper().replace('X', 'x')}"
        config.paper.total_params = total
        config.paper.activated_params = active
        config.paper.convention = "as_built"  # Mixtral counts its three-matrix SwiGLU experts
    return config
