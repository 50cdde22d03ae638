"""Hugging Face MoE checkpoints <-> glam_jax parameters (one job: convert, both ways).

Families (by config.json `model_type`, glam_jax/presets/hf_families.py): mixtral, olmoe,
qwen2_moe (Qwen1.5-MoE, Qwen2-MoE) and qwen3_moe. A directory holds `config.json` and
`*.safetensors` shards (with `model.safetensors.index.json` when there are several) in the
layout of the published hub files (experts one key each). `load` builds the glam_jax config
from config.json, allocates the stacked parameters already sharded on the mesh and fills them
one layer at a time (each tensor read on its own with `safe_open`), so the host never holds
more than one layer. `save` writes the same layout back, one layer per shard.

Key mapping: ONE table (`layer_rows`), the family supplying only its MoE names. HF Linear
weights are [out, in]; P = model.layers.i.; L = the glam_jax layer scope of HF layer i (e.g.
blocks/layer_0 at index i of the stacked `layers` axis; `layer_scopes` places every layer);
MOE = block_sparse_moe (Mixtral) or mlp; (g, u, d) = (w1, w3, w2) (Mixtral) or
(gate_proj, up_proj, down_proj).

  Hugging Face key                          glam_jax parameter           conversion
  model.embed_tokens.weight [V, M]          embed/embedding [V, M]       as is
  model.norm.weight [M]                     final_norm/scale [M]         as is
  lm_head.weight [V, M] (untied only)       logits [M, V]                transpose
  P input_layernorm.weight [M]              L pre_attention_norm/scale   as is
  P post_attention_layernorm.weight [M]     L pre_ffn_norm/scale         as is
  P self_attn.q_proj.weight [H*D, M]        L attention/query [M, H, D]  split heads, move M
  P self_attn.k_proj / v_proj.weight        L attention/key, value       same, G kv heads
  P self_attn.o_proj.weight [M, H*D]        L attention/out [H, D, M]    split heads, move M
  P self_attn.{q,k,v}_proj.bias [H*D]       L attention/query_bias [H, D] split heads (qkv_bias)
  P self_attn.q_norm.weight [D] or [H*D]    L attention/query_norm/scale  [D] or [H, D] (qk_norm)
  P self_attn.k_norm.weight                 L attention/key_norm/scale   same with G
  P MOE.gate.weight [E, M]                  L moe/router [M, E]          transpose
  P MOE.experts.j.{g,u,d}.weight            L moe/{wi_0,wi_1,wo}[j]      transpose
  P mlp.shared_expert.{g,u,d}.weight        L shared_expert/{wi_0,...}   transpose (Qwen2-MoE)
  P mlp.shared_expert_gate.weight [1, M]    L shared_expert/gate [M, 1]  transpose
  P mlp.{g,u,d}.weight (dense layers)       L ffn/{wi_0,wi_1,wo}         transpose (Qwen)

HF's q/k weights are already in the half-split (rotate_half) RoPE layout glam_jax uses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import save_file

from glam_jax import sharding
from glam_jax.model import Transformer, frozen, segments
from glam_jax.presets.hf_families import (
    DTYPES as DTYPE_NAMES,
)
from glam_jax.presets.hf_families import (
    FAMILIES,
    Family,
    HFCheckpointError,
    config_from_hf,
)

__all__ = ["HFCheckpointError", "config_from_hf", "load", "load_mixtral", "save", "save_mixtral"]

INDEX_FILE = "model.safetensors.index.json"
# Keys some published checkpoints carry that hold no parameters (RoPE buffers).
IGNORED_KEY = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
SHARD_NAME = re.compile(r"model-(\d+)-of-(\d+)\.safetensors")
DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}
assert set(DTYPES) == set(DTYPE_NAMES)


# ---- which family a glam_jax config is -------------------------------------------------------
def layer_kinds_of(config) -> list[str]:
    """FFN kind of every layer, in order."""
    return [kind for seg in segments(config) for _ in range(seg.repeats) for kind in seg.pattern]


def _family_mismatches(config, family: Family) -> list[str]:
    """Config fields that keep `config` from being `family`'s architecture."""
    m, e = config.model, config.moe
    wanted = {
        "model.position": (m.position, "rope"),
        "model.norm": (m.norm, "rmsnorm"),
        "model.ffn_activation": (m.ffn_activation, "silu"),
        "model.ffn_glu": (m.ffn_glu, True),
        "model.scan_layers": (m.scan_layers, True),  # the converters read stacked layers
        "moe.router": (e.router, family.router),
        "model.qk_norm": (m.qk_norm, family.qk_norm),
        "moe.num_shared_experts": (e.get("num_shared_experts", 0), int(family.shared_expert)),
        # The auxiliary-loss-free bias steers the routing; no family's layout has it.
        "moe.expert_bias_update_rate": (e.get("expert_bias_update_rate", 0.0), 0.0),
    }
    if family.shared_expert:
        wanted["moe.shared_expert_gate"] = (e.get("shared_expert_gate"), "sigmoid")
    if not family.qkv_bias_field:
        wanted["model.qkv_bias"] = (m.qkv_bias, False)
    if not family.sliding_window:
        wanted["model.sliding_window"] = (m.sliding_window, 0)
    if family.router == "topk":
        wanted["moe.router_score"] = (e.get("router_score"), "softmax")
        wanted["moe.routed_scaling_factor"] = (e.get("routed_scaling_factor"), 1.0)
    if family.expert_width_field == "intermediate_size":
        width = e.expert_mlp_dim or m.mlp_dim
        wanted["moe.expert_mlp_dim"] = (width, m.mlp_dim)
    wrong = [f"{k}={v!r} (needs {w!r})" for k, (v, w) in wanted.items() if v != w]
    if e.num_experts < 1:
        wrong.append("moe.num_experts=0 (needs experts)")
    if not family.sparse_layers and "dense" in layer_kinds_of(config):
        wrong.append("dense layers (needs every layer MoE)")
    scale = m.attention_scale
    if scale and abs(scale - m.head_dim**-0.5) > 1e-12:
        wrong.append(f"model.attention_scale={scale} (needs 1/sqrt(head_dim))")
    return wrong


def family_for(config) -> str:
    """The model_type whose layout `config` has, or a refusal naming the closest's mismatches."""
    found = {t: _family_mismatches(config, f) for t, f in FAMILIES.items()}
    for model_type, wrong in found.items():
        if not wrong:
            return model_type
    closest = min(found, key=lambda t: len(found[t]))
    raise HFCheckpointError(
        f"this config is no Hugging Face family's architecture ({sorted(FAMILIES)}), so it has "
        f"no Hugging Face layout; closest is {closest}: {', '.join(found[closest])}."
    )


def hf_config(config) -> dict:
    """config.json of a glam_jax config in its family's fields (both RoPE field forms)."""
    model_type = family_for(config)
    family = FAMILIES[model_type]
    m, e = config.model, config.moe
    out = {
        "architectures": [family.architecture],
        "model_type": model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.embed_dim,
        "intermediate_size": m.mlp_dim,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads or m.num_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        family.experts_field: e.num_experts,
        "num_experts_per_tok": e.num_selected,
        "router_aux_loss_coef": e.aux_loss_weight,
        "output_router_logits": False,
        "tie_word_embeddings": bool(m.tie_embeddings),
        "attention_dropout": 0.0,
        "initializer_range": m.init_std,
        "dtype": m.param_dtype,
        "torch_dtype": m.param_dtype,
    }
    if family.expert_width_field != "intermediate_size":
        out[family.expert_width_field] = e.expert_mlp_dim or m.mlp_dim
    if family.router == "topk":
        out["norm_topk_prob"] = bool(e.norm_topk_prob)
    if family.sliding_window:
        out["sliding_window"] = m.sliding_window or None
        out.update(bos_token_id=1, eos_token_id=2)
    for field, value, _ in family.unsupported:
        out[field] = value
    if family.qkv_bias_field:
        out[family.qkv_bias_field] = bool(m.qkv_bias)
    if family.shared_expert:
        out["shared_expert_intermediate_size"] = e.shared_expert_mlp_dim or (
            e.num_shared_experts * (e.expert_mlp_dim or m.mlp_dim)
        )
    if family.sparse_layers:
        kinds = layer_kinds_of(config)
        out["decoder_sparse_step"] = 1
        out["mlp_only_layers"] = [i for i, kind in enumerate(kinds) if kind == "dense"]
    return out


def read_config(path: str) -> dict:
    """The config.json of a Hugging Face checkpoint directory, as a dict."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise HFCheckpointError(f"{path} has no config.json; it is not a Hugging Face checkpoint.")
    with open(config_path) as f:
        return json.load(f)


class ShardIndex:
    """Which shard file holds each tensor; checks that every shard and tensor is there."""

    def __init__(self, path: str):
        self.path = path
        index_path = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            for name in files:
                if not os.path.isfile(os.path.join(path, name)):
                    raise HFCheckpointError(
                        f"checkpoint {path} is missing shard {name!r} (listed in {INDEX_FILE}); "
                        "download or copy every shard."
                    )
            self.file_of = dict(weight_map)
            self._check_listed_keys()
            return
        files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if not files:
            raise HFCheckpointError(f"checkpoint {path} has no *.safetensors files.")
        numbered = [SHARD_NAME.fullmatch(n) for n in files]
        if all(numbered):
            total = int(numbered[0].group(2))
            have = {int(mt.group(1)) for mt in numbered}
            missing = sorted(set(range(1, total + 1)) - have)
            if missing:
                raise HFCheckpointError(
                    f"checkpoint {path} is missing shard "
                    f"'model-{missing[0]:05d}-of-{total:05d}.safetensors' ({len(missing)} of "
                    f"{total} shards absent); download or copy every shard."
                )
        self.file_of = {}
        for name in files:
            with safe_open(os.path.join(path, name), framework="np") as f:
                for key in f.keys():
                    self.file_of[key] = name

    def _check_listed_keys(self) -> None:
        for name in sorted(set(self.file_of.values())):
            with safe_open(os.path.join(self.path, name), framework="np") as f:
                present = set(f.keys())
            listed = [k for k, n in self.file_of.items() if n == name and k not in present]
            if listed:
                raise HFCheckpointError(
                    f"shard {name!r} of {self.path} lacks tensor {listed[0]!r} that {INDEX_FILE} "
                    "places there; the shard is truncated or from another checkpoint."
                )

    def check_layout(
        self, shapes: dict[str, tuple[int, ...]], optional: set[str] = frozenset()
    ) -> None:
        """Refuses unknown keys, missing keys and shapes other than `shapes` (what config.json
        implies); `optional` keys may be absent."""
        unknown = sorted(
            k
            for k in self.file_of
            if k not in shapes and k not in optional and not IGNORED_KEY.match(k)
        )
        if unknown:
            example = next((k for k in shapes if ".experts." in k), next(iter(shapes)))
            raise HFCheckpointError(
                f"checkpoint {self.path} has an unknown key layout ({len(unknown)} unexpected "
                f"keys, first {unknown[0]!r}); config.json's family stores hub keys like "
                f"{example!r}."
            )
        missing = [k for k in shapes if k not in self.file_of]
        if missing:
            raise HFCheckpointError(
                f"checkpoint {self.path} lacks tensor {missing[0]!r} ({len(missing)} of "
                f"{len(shapes)} expected tensors missing); a shard may be missing or config.json "
                "may not describe these weights."
            )
        for name in sorted(set(self.file_of.values())):
            with safe_open(os.path.join(self.path, name), framework="np") as f:
                for key in sorted(k for k, n in self.file_of.items() if n == name):
                    got = tuple(f.get_slice(key).get_shape())
                    if key in shapes and got != shapes[key]:
                        raise HFCheckpointError(
                            f"tensor {key!r} in {name} has shape {list(got)} but config.json "
                            f"implies {list(shapes[key])}; the weights and config.json differ."
                        )

    def read(self, key: str) -> np.ndarray:
        """The tensor stored under `key`, from whichever shard file holds it."""
        with safe_open(os.path.join(self.path, self.file_of[key]), framework="np") as f:
            return f.get_tensor(key)


# ---- the key table --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Conv:
    """One tensor's conversion: HF array -> glam_jax array of shape `shape`, and back."""

    to_glam: Callable[[np.ndarray, tuple], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple], tuple]


SAME = Conv(lambda a, s: a, lambda a: a, lambda s: tuple(s))
LINEAR = Conv(lambda a, s: a.T, lambda a: a.T, lambda s: tuple(s[::-1]))  # [out, in] <-> [in, out]
# q/k/v: HF [heads*D, M] <-> glam_jax [M, heads, D]
HEADS_IN = Conv(
    lambda a, s: a.reshape(s[1], s[2], s[0]).transpose(2, 0, 1),
    lambda a: a.transpose(1, 2, 0).reshape(a.shape[1] * a.shape[2], a.shape[0]),
    lambda s: (s[1] * s[2], s[0]),
)
# o: HF [M, H*D] <-> glam_jax [H, D, M]
HEADS_OUT = Conv(
    lambda a, s: a.reshape(s[2], s[0], s[1]).transpose(1, 2, 0),
    lambda a: a.transpose(2, 0, 1).reshape(a.shape[2], a.shape[0] * a.shape[1]),
    lambda s: (s[2], s[0] * s[1]),
)
# biases and OLMoE's q/k norm scales: HF [heads*D] <-> glam_jax [heads, D]
FLAT = Conv(lambda a, s: a.reshape(s), lambda a: a.reshape(-1), lambda s: (int(np.prod(s)),))


@dataclasses.dataclass(frozen=True)
class Row:
    """HF key (after 'model.layers.<i>.', with {j} for an expert) <-> glam_jax name (in the
    layer scope); per-expert rows index the leading expert axis of a stacked parameter."""

    hf: str
    glam: str
    conv: Conv
    per_expert: bool = False


def layer_rows(config, family: Family, kind: str) -> list[Row]:
    """THE key table of one decoder layer of FFN kind `kind`; family-specific parts are the
    MoE block's names, the rest follows the config's features."""
    m = config.model
    rows = [
        Row("input_layernorm.weight", "pre_attention_norm/scale", SAME),
        Row("post_attention_layernorm.weight", "pre_ffn_norm/scale", SAME),
        Row("self_attn.q_proj.weight", "attention/query", HEADS_IN),
        Row("self_attn.k_proj.weight", "attention/key", HEADS_IN),
        Row("self_attn.v_proj.weight", "attention/value", HEADS_IN),
        Row("self_attn.o_proj.weight", "attention/out", HEADS_OUT),
    ]
    if m.qkv_bias:
        rows += [Row(f"self_attn.{x}_proj.bias", f"attention/{n}_bias", FLAT) for x, n in _QKV]
    if m.qk_norm != "none":
        conv = FLAT if m.qk_norm == "projection" else SAME
        rows += [
            Row(f"self_attn.{x}_norm.weight", f"attention/{n}_norm/scale", conv) for x, n in _QK
        ]
    gate, up, down = family.expert_names
    ffn = tuple(zip(("wi_0", "wi_1", "wo"), (gate, up, down), strict=True))
    if kind == "dense":  # Qwen's dense layers: a Qwen2MoeMLP named `mlp`
        return rows + [Row(f"mlp.{h}.weight", f"ffn/{g}", LINEAR) for g, h in ffn]
    moe = family.moe_scope
    rows.append(Row(f"{moe}.gate.weight", "moe/router", LINEAR))
    rows += [Row(f"{moe}.experts.{{j}}.{h}.weight", f"moe/{g}", LINEAR, True) for g, h in ffn]
    if config.moe.get("num_shared_experts", 0):
        rows += [Row(f"mlp.shared_expert.{h}.weight", f"shared_expert/{g}", LINEAR) for g, h in ffn]
        rows.append(Row("mlp.shared_expert_gate.weight", "shared_expert/gate", LINEAR))
    return rows


_QKV = (("q", "query"), ("k", "key"), ("v", "value"))
_QK = (("q", "query"), ("k", "key"))
GLOBAL_ROWS = (
    Row("model.embed_tokens.weight", "embed/embedding", SAME),
    Row("model.norm.weight", "final_norm/scale", SAME),
    Row("lm_head.weight", "logits", LINEAR),  # untied heads only
)


def layer_scopes(config) -> list[tuple[str, int, str]]:
    """(glam_jax scope 'blocks/layer_0', index on its stacked `layers` axis, FFN kind) of each
    HF layer, in order: segment j is `blocks` (one segment) or `segment_j`."""
    stack = segments(config)
    out = []
    for j, seg in enumerate(stack):
        name = "blocks" if len(stack) == 1 else f"segment_{j}"
        for r in range(seg.repeats):
            out += [(f"{name}/layer_{k}", r, kind) for k, kind in enumerate(seg.pattern)]
    return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every HF tensor of a config: key -> (glam_jax flat name, layer index or -1, expert or -1,
    conversion), and the HF shape each must have."""

    entries: dict[str, tuple[str, int, int, Conv]]
    shapes: dict[str, tuple[int, ...]]


def plan(config, glam_shapes: dict) -> Plan:
    """The Plan of `config`, its HF shapes derived from the glam_jax parameter shapes."""
    family = FAMILIES[family_for(config)]
    entries, shapes = {}, {}
    for row in GLOBAL_ROWS:
        if row.glam in glam_shapes:
            entries[row.hf] = (row.glam, -1, -1, row.conv)
            shapes[row.hf] = row.conv.hf_shape(glam_shapes[row.glam].shape)
    for i, (scope, r, kind) in enumerate(layer_scopes(config)):
        for row in layer_rows(config, family, kind):
            name = f"{scope}/{row.glam}"
            inner = glam_shapes[name].shape[1:]  # drop the stacked layers axis
            experts = range(inner[0]) if row.per_expert else [-1]
            for j in experts:
                key = f"model.layers.{i}." + row.hf.format(j=j)
                entries[key] = (name, r, j, row.conv)
                shapes[key] = row.conv.hf_shape(inner[1:] if row.per_expert else inner)
    return Plan(entries, shapes)


# ---- parameter trees -----------------------------------------------------------------------
def _flat(tree) -> dict[str, object]:
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _unflat(flat: dict[str, object]) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = leaf
    return out


def abstract_params(config, mesh: Mesh):
    """(ShapeDtypeStructs, NamedShardings) of the parameters, flat by 'a/b/c' path."""
    model = Transformer(frozen(config))
    ids = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda r: model.init({"params": r}, ids)["params"], jax.random.key(0))
    specs = sharding.logical_specs(boxed)
    return _flat(nn.unbox(boxed)), _flat(sharding.named_shardings(mesh, specs))


def load(
    path: str, mesh: Mesh | None = None, config: ml_collections.ConfigDict | None = None
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, params) of a Hugging Face directory of any supported family, params sharded on
    `mesh` (default: one device), filled one layer at a time.

    `config` (optional) must describe the same architecture as config.json; its dtypes are used.
    """
    hf = read_config(path)
    model_type = hf.get("model_type")
    from_hf = config_from_hf(hf)
    config = config if config is not None else from_hf
    if family_for(config) != model_type:
        raise HFCheckpointError(
            f"the given config is a {family_for(config)} architecture but config.json has "
            f"model_type={model_type!r}."
        )
    index = ShardIndex(path)
    mesh = mesh or sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    shapes, shardings = abstract_params(config, mesh)
    layout = plan(config, shapes)
    optional = {"lm_head.weight"} if config.model.tie_embeddings else set()
    index.check_layout(layout.shapes, optional)

    def put(name: str, value: np.ndarray) -> jax.Array:
        return jax.device_put(value.astype(shapes[name].dtype), shardings[name])

    params = {}
    for key, (name, _, _, conv) in layout.entries.items():
        if name in shapes and not _is_stacked(name):
            params[name] = put(name, conv.to_glam(index.read(key), shapes[name].shape))
    if optional & set(index.file_of):
        _check_tied_head(index, params["embed/embedding"])
    by_layer: dict[tuple[str, int], dict[str, list]] = {}
    for key, (name, r, j, conv) in layout.entries.items():
        if _is_stacked(name):
            per_name = by_layer.setdefault((_scope_of(name), r), {})
            per_name.setdefault(name, []).append((key, j, conv))
    stacked = {n: a for n, a in shapes.items() if _is_stacked(n)}
    with sharding.use_mesh(mesh):
        buffers = jax.jit(
            lambda: {n: jnp.zeros(a.shape, a.dtype) for n, a in stacked.items()},
            out_shardings={n: shardings[n] for n in stacked},
        )()
        setters = {}
        for (scope, r), tensors in by_layer.items():
            names = sorted(tensors)
            if scope not in setters:
                setters[scope] = _layer_setter(mesh, {n: shardings[n] for n in names})
            layer = {}
            for name, parts in tensors.items():
                inner = stacked[name].shape[1:]
                value = _read_layer_tensor(index, parts, inner)
                layer[name] = jax.device_put(
                    value.astype(stacked[name].dtype), _drop_leading(shardings[name])
                )
            updated = setters[scope]({n: buffers[n] for n in names}, layer, np.int32(r))
            buffers.update(updated)
            del layer, updated
    params.update(buffers)
    return config, _unflat(params)


def load_mixtral(path, mesh=None, config=None):
    """`load` under its first name (Mixtral was the first family)."""
    return load(path, mesh, config)


def _is_stacked(name: str) -> bool:
    return name.startswith(("blocks/", "segment_"))


def _scope_of(name: str) -> str:
    """'blocks/layer_0/attention/query' -> 'blocks/layer_0'."""
    return "/".join(name.split("/")[:2])


def _read_layer_tensor(index, parts: list, inner: tuple) -> np.ndarray:
    """One layer's glam_jax tensor from its HF key (or one key per expert, stacked)."""
    if parts[0][1] < 0:
        key, _, conv = parts[0]
        return conv.to_glam(index.read(key), inner)
    out = None
    for key, j, conv in parts:
        value = conv.to_glam(index.read(key), inner[1:])
        if out is None:
            out = np.empty(inner, value.dtype)
        out[j] = value
    return out


def _check_tied_head(index, embedding) -> None:
    """A tied checkpoint may still store lm_head.weight; it must be the embedding."""
    head = index.read("lm_head.weight")
    if not np.array_equal(head, np.asarray(jax.device_get(embedding)).astype(head.dtype)):
        raise HFCheckpointError(
            "config.json has tie_word_embeddings=true but lm_head.weight differs from "
            "model.embed_tokens.weight; fix tie_word_embeddings."
        )


def _drop_leading(s: NamedSharding) -> NamedSharding:
    """The sharding of one slice along the leading `layers` axis."""
    return NamedSharding(s.mesh, PartitionSpec(*tuple(s.spec)[1:]))


def _layer_setter(mesh: Mesh, shardings: dict) -> Callable:
    """jit(buffers, layer, i) -> buffers with layer written at index i (buffers donated)."""

    def set_layer(buffers, layer, i):
        return {
            n: jax.lax.dynamic_update_index_in_dim(b, layer[n].astype(b.dtype), i, 0)
            for n, b in buffers.items()
        }

    return jax.jit(set_layer, out_shardings=shardings, donate_argnums=0)


def save(params, config, path: str, dtype: str | None = None) -> list[str]:
    """Writes config.json and one safetensors shard per layer (+ one for embeddings, one for
    the head) with an index, in the family's hub layout. Returns the shard file names."""
    hf = hf_config(config)  # refuses a config no family can express
    dtype = dtype or config.model.param_dtype
    if dtype not in DTYPES:
        raise HFCheckpointError(f"cannot write dtype {dtype!r}; valid: {sorted(DTYPES)}.")
    np_dtype = DTYPES[dtype]
    flat = _flat(params)
    glam_shapes = {n: jax.ShapeDtypeStruct(np.shape(a), a.dtype) for n, a in flat.items()}
    try:
        layout = plan(config, glam_shapes)
    except KeyError as err:
        raise HFCheckpointError(
            f"the parameters lack {err.args[0]!r}; they are not a tree of this config."
        ) from None
    layers = config.model.num_layers
    os.makedirs(path, exist_ok=True)
    total = layers + 2
    names = [f"model-{k:05d}-of-{total:05d}.safetensors" for k in range(1, total + 1)]

    def fetch(x) -> np.ndarray:
        return np.asarray(jax.device_get(x)).astype(np_dtype)

    weight_map, total_bytes = {}, 0

    def write(name: str, tensors: dict[str, np.ndarray]) -> None:
        nonlocal total_bytes
        tensors = {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in tensors.items()}
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total_bytes += v.nbytes

    by_layer: dict[int, dict] = {}
    for key, entry in layout.entries.items():
        layer = int(key.split(".")[2]) if key.startswith("model.layers.") else -1
        by_layer.setdefault(layer, {})[key] = entry
    glob = {k: e[3].to_hf(fetch(flat[e[0]])) for k, e in by_layer[-1].items()}
    write(names[0], {"model.embed_tokens.weight": glob.pop("model.embed_tokens.weight")})
    slice_at = jax.jit(lambda a, i: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False))
    for i in range(layers):
        cache: dict[str, np.ndarray] = {}
        tensors = {}
        for key, (name, r, j, conv) in by_layer[i].items():
            if name not in cache:
                cache[name] = fetch(slice_at(flat[name], np.int32(r)))
            tensors[key] = conv.to_hf(cache[name][j] if j >= 0 else cache[name])
        write(names[i + 1], tensors)
    write(names[-1], glob)
    hf["dtype"] = hf["torch_dtype"] = dtype
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)
    return names


def save_mixtral(params, config, path: str, dtype: str | None = None) -> list[str]:
    """`save` under its first name (Mixtral was the first family)."""
    return save(params, config, path, dtype)
