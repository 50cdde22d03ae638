"""GLaM-1.7B shapes cut to fit one H100 for the full-step benchmark (experiments/bench.py).

8 layers = 4 scanned (dense, MoE) blocks, M=2048, 16x128 heads, H=8192 gated GELU, vocab
32768, 8 experts top-2, B=8 x S=2048: the reference model of docs/moe_reference.md section 6.
Variants: `:dense`, `:moe+dispatch=dropless`, `:dense+batch=16`, `:moe+mesh=1x4x1+batch=32`
(expert parallelism over 4 GPUs, 8 rows per GPU), `:moe+experts=64+layers=4`,
`:dense+docmask` (segment mask given to attention), `:moe+policy=none` (a REMAT_POLICIES name),
`:moe+group=512`, `:moe+unrolled` (model.scan_layers=False), `:moe+opt=adafactor`,
`:moe+dispatch=dropless+gmm=mgpu` (moe.ragged_matmul), `:moe+dispatch=dropless+glu=unfused`
(moe.fused_glu off), ...

DeepSeek-V3-style fine-grained MoE (issue 17) at the same width: 64 routed experts of width
H/4 = 2048, top-6, 2 shared experts (one dense FFN of 2 x 2048), Mixtral-style routing; per
token it activates 6 + 2 = 8 quarter-width FFNs = 2 x H, the E=8 top-2 model's FFN FLOPs:
`:moe+experts=64+ewidth=2048+k=6+shared=2+router=topk_softmax` (`+bias=0.001` adds
auxiliary-loss-free balancing). Its dense twin at equal activated FLOPs (up to the routers'
0.5M weights) widens every dense FFN to (8192 + 2 x 8192) / 2: `:dense+mlp=12288`.

The defaults are the fastest settings measured on an H200 (docs/performance.md): remat policy
`dots` (every matmul output saved, so neither dense nor expert GEMMs run twice), routing
groups of 1024 tokens, and the XLA flags of glam_jax/gpu_defaults.py.
"""

import ml_collections

from glam_jax.presets import glam
from glam_jax.presets.variants import parse_variant

# Variant keys, their defaults (whose types say how values are read) and the accepted words.
VARIANT = {
    "kind": "moe",  # moe or dense (a bare word)
    "dispatch": "einsum",
    "batch": 8,
    "remat": "block",
    "policy": "dots",  # a model.REMAT_POLICIES name
    "mesh": (-1, 1, 1),  # data x expert x model, e.g. 1x4x1
    "experts": 8,
    "layers": 8,
    "exchange": "gspmd",
    "docmask": False,  # bare word: segment mask given to attention
    "group": 1024,
    "unrolled": False,  # bare word: model.scan_layers=False
    "opt": "adamw",  # adamw (the stock-JAX reference's) or adafactor (GLaM's)
    "gmm": "auto",  # moe.ragged_matmul of dropless: auto, blocked, mgpu, xla
    "glu": "fused",  # fused (moe.fused_glu, the default) or unfused
    "mlp": 8192,  # model.mlp_dim (dense FFN width)
    "ewidth": 0,  # moe.expert_mlp_dim (0 = mlp)
    "k": 2,  # moe.num_selected
    "router": "gshard_top2",  # moe.router
    "shared": 0,  # moe.num_shared_experts
    "bias": 0.0,  # moe.expert_bias_update_rate
}
CHOICES = {"kind": ("moe", "dense"), "glu": ("fused", "unfused")}


def parse(arg: str | None) -> dict:
    """'moe' (default), 'dense', 'moe+dispatch=sort', 'dense+batch=16', ..."""
    return parse_variant(arg, VARIANT, positional="kind", choices=CHOICES, where="bench")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """GLaM-1.7B shapes cut to one GPU, with the variant's changes."""
    config = glam.get_config("1_7b")
    config.model.vocab_size = 32768
    config.model.max_len = 2048
    variant = parse(arg)
    # Benchmark rows hold one document each, so the document mask would change nothing; with it
    # cuDNN gets a dense [B, H, S, S] mask-plus-bias (variant `docmask` measures that cost).
    config.model.document_mask = variant["docmask"]
    config.model.num_layers = variant["layers"]
    config.mesh.shape = variant["mesh"]
    config.model.remat_scope = variant["remat"]
    config.model.remat_policy = variant["policy"]
    config.model.scan_layers = not variant["unrolled"]
    config.moe.num_experts = 0 if variant["kind"] == "dense" else variant["experts"]
    config.moe.dispatch = variant["dispatch"]
    config.moe.expert_exchange = variant["exchange"]
    config.moe.ragged_matmul = variant["gmm"]
    config.moe.fused_glu = variant["glu"] == "fused"
    config.moe.group_size = variant["group"]
    config.model.mlp_dim = variant["mlp"]
    config.moe.expert_mlp_dim = variant["ewidth"]
    config.moe.num_selected = variant["k"]
    config.moe.router = variant["router"]
    config.moe.num_shared_experts = variant["shared"]
    config.moe.expert_bias_update_rate = variant["bias"]
    config.train.batch_size = variant["batch"]
    config.train.eval_batch_size = variant["batch"]
    config.train.seq_len = 2048
    config.train.optimizer = variant["opt"]
    config.train.learning_rate = 3e-4
    config.train.warmup_steps = 100
    config.train.logits_z_loss_weight = 0.0
    config.data.tokenizer_path = ""  # benchmarks feed random tokens
    return config
