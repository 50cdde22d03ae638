"""The Hugging Face MoE families as glam_jax configs: config.json <-> ConfigDict, both ways.

One table (`FAMILIES`) says, per `model_type`, which config.json fields a family has and which
glam_jax fields they set; the presets (olmoe.py, qwen_moe.py) are the published config.json
values run through the same `config_from_hf`, so a preset and an imported checkpoint of the
same model are one config. glam_jax/hf_checkpoint.py owns the tensors.

What each family's modeling file in transformers computes (5.x, checked against 4.57):
  mixtral    top-2 softmax over the 2 kept logits (topk_softmax), SwiGLU experts.
  olmoe      softmax over all experts, top-k, renormalised if norm_topk_prob (False in
             OLMoE-1B-7B); q/k RMSNorm over the whole q (k) projection (qk_norm='projection').
  qwen2_moe  (Qwen1.5-MoE, Qwen2-MoE) as olmoe without qk-norm, q/k/v biases (qkv_bias), a
             shared expert of shared_expert_intermediate_size scaled by sigmoid(x w_gate); dense
             layers of intermediate_size where `mlp_only_layers` / `decoder_sparse_step` say.
  qwen3_moe  as qwen2_moe without biases or shared expert, q/k RMSNorm per head (qk_norm='head').
"""

from __future__ import annotations

import dataclasses

import ml_collections

from glam_jax.errors import GlamError
from glam_jax.presets.base import get_base_config
from glam_jax.presets.mixtral import mixtral_architecture
from glam_jax.presets.variants import parse_variant

DTYPES = ("float32", "bfloat16", "float16")


class HFCheckpointError(GlamError):
    """A Hugging Face checkpoint that cannot be read or written, in one sentence."""


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF model_type: its class, key names, features and config.json field names."""

    architecture: str  # transformers class written to config.json
    moe_scope: str  # 'block_sparse_moe' (Mixtral) or 'mlp': the HF module of the MoE block
    expert_names: tuple[str, str, str]  # HF names of (gate, up, down) = glam (wi_0, wi_1, wo)
    experts_field: str  # config.json field with the number of routed experts
    expert_width_field: str  # config.json field with the routed expert width
    router: str  # glam_jax router
    qk_norm: str  # model.qk_norm of the family
    shared_expert: bool  # a sigmoid-gated shared expert in every MoE layer (Qwen2-MoE)
    sparse_layers: bool  # decoder_sparse_step / mlp_only_layers may make layers dense
    default_rope_theta: float  # when config.json states none (the transformers default)
    _: dataclasses.KW_ONLY
    sliding_window: bool = False  # config.json's sliding_window applies to every layer
    qkv_bias_field: str = ""  # config.json field switching q/k/v biases (default True)
    # config.json fields that must have these values (features glam_jax does not build).
    unsupported: tuple[tuple[str, object, str], ...] = ()


_NO_SLIDING = (("use_sliding_window", False, "per-layer sliding windows are not supported"),)
FAMILIES = {
    "mixtral": Family(
        "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"), "num_local_experts",
        "intermediate_size", "topk_softmax", "none", False, False, 1e6, sliding_window=True,
    ),
    "olmoe": Family(
        "OlmoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts",
        "intermediate_size", "topk", "projection", False, False, 1e4,
        unsupported=(
            ("clip_qkv", None, "clipping q/k/v is not supported"),
            ("attention_bias", False, "attention biases are not supported for OLMoE"),
        ),
    ),
    "qwen2_moe": Family(
        "Qwen2MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts",
        "moe_intermediate_size", "topk", "none", True, True, 1e4, unsupported=_NO_SLIDING,
        qkv_bias_field="qkv_bias",
    ),
    "qwen3_moe": Family(
        "Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts",
        "moe_intermediate_size", "topk", "head", False, True, 1e4,
        unsupported=(*_NO_SLIDING, ("attention_bias", False, "attention biases are not supported")),
    ),
}  # fmt: skip


def family_of(hf: dict) -> Family:
    """The FAMILIES entry of a config.json, or a refusal naming its model_type."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise HFCheckpointError(
            f"config.json has model_type={model_type!r}, which glam_jax cannot import; "
            f"supported: {sorted(FAMILIES)}."
        )
    return FAMILIES[model_type]


def rope_theta(hf: dict, default: float) -> float:
    """RoPE base from transformers 5's `rope_parameters` or 4.x's top-level `rope_theta`;
    any RoPE scaling (yarn, dynamic, ...) is refused."""
    rope = hf.get("rope_parameters") or {}
    for source in (rope, hf.get("rope_scaling") or {}):
        kind = source.get("rope_type", source.get("type", "default"))
        if kind != "default":
            raise HFCheckpointError(
                f"config.json asks for RoPE scaling {source!r}; only plain RoPE "
                "(rope_type 'default') is supported."
            )
    return float(rope.get("rope_theta") or hf.get("rope_theta") or default)


def layer_kinds(hf: dict, family: Family, num_layers: int) -> list[str]:
    """FFN kind of each layer: transformers' rule (Qwen2MoeDecoderLayer): layer i is MoE iff
    i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    if not family.sparse_layers:
        return ["moe"] * num_layers
    step = int(hf.get("decoder_sparse_step") or 1)
    dense = set(hf.get("mlp_only_layers") or [])
    bad = sorted(i for i in dense if not 0 <= int(i) < num_layers)
    if bad:
        raise HFCheckpointError(
            f"config.json mlp_only_layers names layer {bad[0]}, outside 0..{num_layers - 1}."
        )
    return [
        "moe" if i not in dense and (i + 1) % step == 0 and _experts(hf, family) > 0 else "dense"
        for i in range(num_layers)
    ]


def _experts(hf: dict, family: Family) -> int:
    """Routed experts; transformers 5 writes Qwen3-MoE's as num_local_experts (an alias of the
    published num_experts), so either name is read."""
    for field in (family.experts_field, "num_experts", "num_local_experts"):
        if hf.get(field) is not None:
            return int(hf[field])
    return 0


def set_layer_kinds(config: ml_collections.ConfigDict, kinds: list[str]) -> None:
    """Expresses per-layer FFN kinds as moe.every blocks when periodic, else as model.segments
    (one segment per run of equal kinds), so any pattern is expressible."""
    m, e = config.model, config.moe
    n = len(kinds)
    for step in range(1, n + 1):
        if n % step == 0 and kinds == (["dense"] * (step - 1) + ["moe"]) * (n // step):
            e.every, e.moe_index_in_block, m.segments = step, step - 1, ""
            return
    runs: list[list] = []
    for kind in kinds:
        if runs and runs[-1][0] == kind:
            runs[-1][1] += 1
        else:
            runs.append([kind, 1])
    e.every, e.moe_index_in_block = 1, 0
    m.segments = " ".join(f"({kind})*{count}" for kind, count in runs)


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
    """The glam_jax config of a config.json of any FAMILIES model_type (its dtype throughout)."""
    family = family_of(hf)
    for field, wanted, why in family.unsupported:
        if hf.get(field, wanted) != wanted:
            raise HFCheckpointError(
                f"config.json has {field}={hf[field]!r}, but {why} (needs {wanted!r})."
            )
    if hf.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(
            f"config.json has hidden_act={hf['hidden_act']!r}; only 'silu' is supported."
        )
    config = mixtral_architecture(get_base_config())
    m, e = config.model, config.moe
    m.vocab_size = int(hf["vocab_size"])
    m.num_layers = int(hf["num_hidden_layers"])
    m.embed_dim = int(hf["hidden_size"])
    m.num_heads = int(hf["num_attention_heads"])
    m.num_kv_heads = int(hf.get("num_key_value_heads") or m.num_heads)
    m.head_dim = int(hf.get("head_dim") or m.embed_dim // m.num_heads)
    m.max_len = int(hf.get("max_position_embeddings", m.max_len))
    m.norm_eps = float(hf.get("rms_norm_eps", m.norm_eps))
    m.rope_theta = rope_theta(hf, family.default_rope_theta)
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.qk_norm = family.qk_norm
    # transformers 4.x Qwen2-MoE always had q/k/v biases; 5.x names the switch qkv_bias.
    m.qkv_bias = bool(family.qkv_bias_field) and bool(hf.get(family.qkv_bias_field, True))
    if family.qk_norm == "projection" and m.num_heads * m.head_dim != m.embed_dim:
        raise HFCheckpointError(
            f"config.json has head_dim={m.head_dim} x num_attention_heads={m.num_heads} != "
            f"hidden_size={m.embed_dim}, which OLMoE's q/k norm (of width hidden_size) forbids."
        )
    # Mixtral's only MoE width is intermediate_size; the Qwen families add dense layers of
    # intermediate_size and experts of moe_intermediate_size.
    m.mlp_dim = int(hf["intermediate_size"])
    if family.expert_width_field != "intermediate_size":
        e.expert_mlp_dim = int(hf[family.expert_width_field])
    e.num_experts = _experts(hf, family)
    e.num_selected = int(hf["num_experts_per_tok"])
    e.router = family.router
    if family.router == "topk":
        e.router_score = "softmax"
        e.norm_topk_prob = bool(hf.get("norm_topk_prob", False))
    e.aux_loss_weight = float(hf.get("router_aux_loss_coef", e.aux_loss_weight))
    if family.shared_expert:
        width = int(hf.get("shared_expert_intermediate_size") or 0)
        if width <= 0:
            raise HFCheckpointError(
                f"config.json has shared_expert_intermediate_size={width}; Qwen2-MoE needs > 0."
            )
        e.num_shared_experts, e.shared_expert_mlp_dim = 1, width
        e.shared_expert_gate = "sigmoid"
    m.sliding_window = int(hf.get("sliding_window") or 0) if family.sliding_window else 0
    set_layer_kinds(config, layer_kinds(hf, family, m.num_layers))
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    m.param_dtype = m.dtype = dtype if dtype in DTYPES else "float32"
    config.train.seq_len = min(config.train.seq_len, m.max_len)
    return config


def preset(
    hf: dict, *, paper_name: str = "", total: float = 0.0, activated: float = 0.0
) -> ml_collections.ConfigDict:
    """A family preset from its config.json fields: a published model (with its published
    totals for param_count, bfloat16 like the released weights) or, without `paper_name`, a
    CPU-sized float32 model that trains like glam_tiny."""
    config = config_from_hf(hf)
    t, e = config.train, config.moe
    if paper_name:
        config.model.dtype = config.model.param_dtype = "bfloat16"
        t.seq_len = min(4096, config.model.max_len)  # sets the attention FLOPs param_count prints
        t.batch_size = t.eval_batch_size = 256
        e.group_size = t.seq_len  # one routing group per row
        config.paper = ml_collections.ConfigDict()  # published figures, printed by param_count
        config.paper.name = paper_name
        config.paper.total_params = total
        config.paper.activated_params = activated
        config.paper.convention = "as_built"  # the published totals count all three matrices
        return config
    e.group_size = 256  # tokens per routing group (<= tokens per device)
    t.batch_size, t.eval_batch_size, t.seq_len = 16, 32, 128
    t.steps, t.learning_rate, t.warmup_steps = 600, 0.05, 50
    t.log_every, t.eval_every, t.checkpoint_every = 25, 200, 200
    return config


def sized_preset(arg: str | None, sizes: dict, family: str) -> ml_collections.ConfigDict:
    """A family module's get_config: variant `size=` names a row of `sizes`, (config.json
    fields, published name, published total and activated parameters); `tiny` by default."""
    size = parse_variant(
        arg, {"size": "tiny"}, positional="size", choices={"size": sizes}, where=family
    )["size"]
    hf, name, total, activated = sizes[size]
    return preset(hf, paper_name=name, total=total, activated=activated)
