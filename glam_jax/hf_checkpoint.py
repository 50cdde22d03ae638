"""Hugging Face Mixtral checkpoints <-> glam_jax parameters (one job: convert, both ways).

A Hugging Face directory holds `config.json` and `*.safetensors` shards (with
`model.safetensors.index.json` when there are several) in the layout of the published
Mixtral-8x7B files. `load_mixtral` builds the glam_jax config from config.json, allocates the
stacked parameters already sharded on the mesh and fills them one layer at a time (each
tensor read on its own with `safe_open`), so the host never holds more than one layer.
`save_mixtral` writes the same layout back, one layer per shard.

Key mapping (HF Linear weights are [out, in]; P = model.layers.i., B = blocks/layer_0/, and
glam_jax's stacked parameters hold layer i at index i of their leading `layers` axis):

  Hugging Face key                            glam_jax parameter          conversion
  model.embed_tokens.weight [V, M]            embed/embedding [V, M]      as is
  model.norm.weight [M]                       final_norm/scale [M]        as is
  lm_head.weight [V, M]                       logits [M, V]               transpose
  P input_layernorm.weight [M]                B pre_attention_norm/scale  as is
  P post_attention_layernorm.weight [M]       B pre_ffn_norm/scale        as is
  P self_attn.q_proj.weight [H*D, M]          B attention/query [M, H, D] [H, D, M] -> [M, H, D]
  P self_attn.k_proj / v_proj.weight [G*D, M] B attention/key, value      same, G kv heads
  P self_attn.o_proj.weight [M, H*D]          B attention/out [H, D, M]   [M, H, D] -> [H, D, M]
  P block_sparse_moe.gate.weight [E, M]       B moe/router [M, E]         transpose
  P block_sparse_moe.experts.j.w1.weight [F, M]  B moe/wi_0[j] [M, F]    transpose (gate)
  P block_sparse_moe.experts.j.w3.weight [F, M]  B moe/wi_1[j] [M, F]    transpose (up)
  P block_sparse_moe.experts.j.w2.weight [M, F]  B moe/wo[j] [F, M]      transpose (down)

Mixtral has moe.every=1: one layer per scanned block, so B is the only layer. HF's q/k weights
are already in the half-split (rotate_half) RoPE layout glam_jax uses: no permutation.
"""

from __future__ import annotations

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
from glam_jax.errors import GlamError
from glam_jax.model import Transformer, frozen
from glam_jax.presets.base import get_base_config
from glam_jax.presets.mixtral import mixtral_architecture

INDEX_FILE = "model.safetensors.index.json"
BLOCK = ("blocks", "layer_0")
# Keys some published checkpoints carry that hold no parameters (RoPE buffers).
IGNORED_KEY = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
SHARD_NAME = re.compile(r"model-(\d+)-of-(\d+)\.safetensors")
DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


class HFCheckpointError(GlamError):
    """A Hugging Face checkpoint that cannot be read or written, in one sentence."""


# ---- config --------------------------------------------------------------------------------
def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
    """The glam_jax config of a Mixtral config.json (parameters and compute in its dtype)."""
    if hf.get("model_type") != "mixtral":
        raise HFCheckpointError(
            f"config.json has model_type={hf.get('model_type')!r}; only 'mixtral' checkpoints "
            "can be imported."
        )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise HFCheckpointError(
            f"config.json asks for RoPE scaling {rope!r}; only plain RoPE is supported."
        )
    if hf.get("hidden_act", "silu") != "silu" or hf.get("tie_word_embeddings", False):
        raise HFCheckpointError(
            "config.json must have hidden_act='silu' and tie_word_embeddings=false, as Mixtral."
        )
    config = mixtral_architecture(get_base_config())
    m, e = config.model, config.moe
    m.vocab_size = int(hf["vocab_size"])
    m.num_layers = int(hf["num_hidden_layers"])
    m.embed_dim = int(hf["hidden_size"])
    m.mlp_dim = int(hf["intermediate_size"])
    m.num_heads = int(hf["num_attention_heads"])
    m.num_kv_heads = int(hf.get("num_key_value_heads") or m.num_heads)
    m.head_dim = int(hf.get("head_dim") or m.embed_dim // m.num_heads)
    m.max_len = int(hf.get("max_position_embeddings", m.max_len))
    m.norm_eps = float(hf.get("rms_norm_eps", m.norm_eps))
    m.rope_theta = float(hf.get("rope_theta") or rope.get("rope_theta") or 1e6)
    m.sliding_window = int(hf.get("sliding_window") or 0)
    e.num_experts = int(hf["num_local_experts"])
    e.num_selected = int(hf["num_experts_per_tok"])
    e.aux_loss_weight = float(hf.get("router_aux_loss_coef", e.aux_loss_weight))
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    m.param_dtype = m.dtype = dtype if dtype in DTYPES else "float32"
    config.train.seq_len = min(config.train.seq_len, m.max_len)
    return config


def hf_config(config) -> dict:
    """config.json for a glam_jax Mixtral config (both the 4.x and 5.x RoPE fields)."""
    check_mixtral(config)
    m, e = config.model, config.moe
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": m.vocab_size,
        "hidden_size": m.embed_dim,
        "intermediate_size": e.expert_mlp_dim or m.mlp_dim,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads or m.num_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "sliding_window": m.sliding_window or None,
        "num_local_experts": e.num_experts,
        "num_experts_per_tok": e.num_selected,
        "router_aux_loss_coef": e.aux_loss_weight,
        "output_router_logits": False,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "initializer_range": m.init_std,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": m.param_dtype,
        "torch_dtype": m.param_dtype,
    }


def check_mixtral(config) -> None:
    """Raises unless `config` is the Mixtral architecture the HF layout can express."""
    m, e = config.model, config.moe
    wanted = {
        "model.position": (m.position, "rope"),
        "model.norm": (m.norm, "rmsnorm"),
        "model.ffn_activation": (m.ffn_activation, "silu"),
        "model.ffn_glu": (m.ffn_glu, True),
        "model.tie_embeddings": (m.tie_embeddings, False),
        "moe.every": (e.every, 1),
        "moe.router": (e.router, "topk_softmax"),
        "moe.num_shared_experts": (e.num_shared_experts, 0),  # Mixtral has none (issue 18)
        "moe.expert_bias_update_rate": (e.expert_bias_update_rate, 0.0),
        "model.scan_layers": (m.scan_layers, True),  # the converters read stacked layers
    }
    wrong = [f"{k}={v!r} (needs {w!r})" for k, (v, w) in wanted.items() if v != w]
    if e.num_experts < 1:
        wrong.append("moe.num_experts=0 (needs experts)")
    scale = m.attention_scale
    if scale and abs(scale - m.head_dim**-0.5) > 1e-12:
        wrong.append(f"model.attention_scale={scale} (needs 1/sqrt(head_dim))")
    if wrong:
        raise HFCheckpointError(
            f"this config is not a Mixtral architecture, so it has no Hugging Face Mixtral "
            f"layout: {', '.join(wrong)}."
        )


def read_config(path: str) -> dict:
    """The config.json of a Hugging Face checkpoint directory, as a dict."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise HFCheckpointError(f"{path} has no config.json; it is not a Hugging Face checkpoint.")
    with open(config_path) as f:
        return json.load(f)


# ---- key layout ----------------------------------------------------------------------------
def _layer_keys(i: int, num_experts: int) -> list[str]:
    p = f"model.layers.{i}."
    keys = [
        p + "input_layernorm.weight",
        p + "post_attention_layernorm.weight",
        p + "self_attn.q_proj.weight",
        p + "self_attn.k_proj.weight",
        p + "self_attn.v_proj.weight",
        p + "self_attn.o_proj.weight",
        p + "block_sparse_moe.gate.weight",
    ]
    for j in range(num_experts):
        keys += [p + f"block_sparse_moe.experts.{j}.{w}.weight" for w in ("w1", "w2", "w3")]
    return keys


GLOBAL_KEYS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF layout with the shape `config` implies."""
    m, e = config.model, config.moe
    v, d, h, f = m.vocab_size, m.embed_dim, m.num_heads, e.expert_mlp_dim or m.mlp_dim
    g, hd = m.num_kv_heads or m.num_heads, m.head_dim
    shapes = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (v, d),
    }
    per_layer = {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (h * hd, d),
        "self_attn.k_proj.weight": (g * hd, d),
        "self_attn.v_proj.weight": (g * hd, d),
        "self_attn.o_proj.weight": (d, h * hd),
        "block_sparse_moe.gate.weight": (e.num_experts, d),
        "w1": (f, d),
        "w2": (d, f),
        "w3": (f, d),
    }
    for i in range(m.num_layers):
        for key in _layer_keys(i, e.num_experts):
            tail = key.split(f"model.layers.{i}.", 1)[1]
            shapes[key] = per_layer.get(tail, per_layer.get(tail.split(".")[-2]))
    return shapes


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

    def check_layout(self, config) -> dict[str, tuple[int, ...]]:
        """Refuses unknown keys, missing keys and shapes that do not match config.json."""
        shapes = expected_shapes(config)
        unknown = sorted(k for k in self.file_of if k not in shapes and not IGNORED_KEY.match(k))
        if unknown:
            raise HFCheckpointError(
                f"checkpoint {self.path} has an unknown key layout ({len(unknown)} unexpected "
                f"keys, first {unknown[0]!r}); expected the Mixtral hub layout with "
                "per-expert 'model.layers.<i>.block_sparse_moe.experts.<j>.w1' (w2, w3) keys."
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
        return shapes

    def read(self, key: str) -> np.ndarray:
        """The tensor stored under `key`, from whichever shard file holds it."""
        with safe_open(os.path.join(self.path, self.file_of[key]), framework="np") as f:
            return f.get_tensor(key)


# ---- tensor transforms ---------------------------------------------------------------------
def _proj_in(w_om: np.ndarray, heads: int) -> np.ndarray:
    """q/k/v: HF [heads*D, M] -> glam_jax [M, heads, D]."""
    o, m = w_om.shape
    return w_om.reshape(heads, o // heads, m).transpose(2, 0, 1)


def _proj_out(w_mhd: np.ndarray) -> np.ndarray:
    """q/k/v: glam_jax [M, heads, D] -> HF [heads*D, M]."""
    m, h, d = w_mhd.shape
    return w_mhd.transpose(1, 2, 0).reshape(h * d, m)


def _o_in(w_mo: np.ndarray, heads: int) -> np.ndarray:
    """o_proj: HF [M, H*D] -> glam_jax [H, D, M]."""
    m, o = w_mo.shape
    return w_mo.reshape(m, heads, o // heads).transpose(1, 2, 0)


def _o_out(w_hdm: np.ndarray) -> np.ndarray:
    """o_proj: glam_jax [H, D, M] -> HF [M, H*D]."""
    h, d, m = w_hdm.shape
    return w_hdm.transpose(2, 0, 1).reshape(m, h * d)


def _layer_from_hf(index: ShardIndex, i: int, config) -> dict[str, np.ndarray]:
    """Layer i of the HF checkpoint as glam_jax arrays (paths under blocks/layer_0)."""
    m, e = config.model, config.moe
    h, g = m.num_heads, m.num_kv_heads or m.num_heads
    p = f"model.layers.{i}."
    out = {
        "pre_attention_norm/scale": index.read(p + "input_layernorm.weight"),
        "pre_ffn_norm/scale": index.read(p + "post_attention_layernorm.weight"),
        "attention/query": _proj_in(index.read(p + "self_attn.q_proj.weight"), h),
        "attention/key": _proj_in(index.read(p + "self_attn.k_proj.weight"), g),
        "attention/value": _proj_in(index.read(p + "self_attn.v_proj.weight"), g),
        "attention/out": _o_in(index.read(p + "self_attn.o_proj.weight"), h),
        "moe/router": index.read(p + "block_sparse_moe.gate.weight").T,
    }
    for name, w in (("wi_0", "w1"), ("wi_1", "w3"), ("wo", "w2")):
        first = index.read(p + f"block_sparse_moe.experts.0.{w}.weight").T
        stacked = np.empty((e.num_experts, *first.shape), first.dtype)
        stacked[0] = first
        for j in range(1, e.num_experts):
            stacked[j] = index.read(p + f"block_sparse_moe.experts.{j}.{w}.weight").T
        out[f"moe/{name}"] = stacked
    return out


def _layer_to_hf(layer: dict[str, np.ndarray], i: int, num_experts: int) -> dict[str, np.ndarray]:
    """Inverse of _layer_from_hf."""
    p = f"model.layers.{i}."
    out = {
        p + "input_layernorm.weight": layer["pre_attention_norm/scale"],
        p + "post_attention_layernorm.weight": layer["pre_ffn_norm/scale"],
        p + "self_attn.q_proj.weight": _proj_out(layer["attention/query"]),
        p + "self_attn.k_proj.weight": _proj_out(layer["attention/key"]),
        p + "self_attn.v_proj.weight": _proj_out(layer["attention/value"]),
        p + "self_attn.o_proj.weight": _o_out(layer["attention/out"]),
        p + "block_sparse_moe.gate.weight": layer["moe/router"].T,
    }
    for name, w in (("wi_0", "w1"), ("wi_1", "w3"), ("wo", "w2")):
        for j in range(num_experts):
            out[p + f"block_sparse_moe.experts.{j}.{w}.weight"] = layer[f"moe/{name}"][j].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


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


def load_mixtral(
    path: str, mesh: Mesh | None = None, config: ml_collections.ConfigDict | None = None
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, params) of a Hugging Face Mixtral directory, params sharded on `mesh`.

    `config` (optional) must describe the same shapes as config.json; its dtypes are used.
    """
    hf = read_config(path)
    from_hf = config_from_hf(hf)
    config = config if config is not None else from_hf
    check_mixtral(config)
    index = ShardIndex(path)
    index.check_layout(config)
    mesh = mesh or sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    shapes, shardings = abstract_params(config, mesh)
    prefix = "/".join(BLOCK) + "/"

    def put(name: str, value: np.ndarray) -> jax.Array:
        want = shapes[name]
        return jax.device_put(value.astype(want.dtype), shardings[name])

    params = {
        "embed/embedding": put("embed/embedding", index.read("model.embed_tokens.weight")),
        "final_norm/scale": put("final_norm/scale", index.read("model.norm.weight")),
        "logits": put("logits", index.read("lm_head.weight").T),
    }
    stacked = {n: a for n, a in shapes.items() if n.startswith(prefix)}
    with sharding.use_mesh(mesh):
        buffers = jax.jit(
            lambda: {n: jnp.zeros(a.shape, a.dtype) for n, a in stacked.items()},
            out_shardings={n: shardings[n] for n in stacked},
        )()
        set_layer = _layer_setter(mesh, {n: shardings[n] for n in stacked})
        for i in range(config.model.num_layers):
            layer = _layer_from_hf(index, i, config)
            layer = {
                prefix + n: jax.device_put(
                    v.astype(stacked[prefix + n].dtype), _drop_leading(shardings[prefix + n])
                )
                for n, v in layer.items()
            }
            buffers = set_layer(buffers, layer, np.int32(i))
            del layer
    params.update(buffers)
    return config, _unflat(params)


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


def save_mixtral(params, config, path: str, dtype: str | None = None) -> list[str]:
    """Writes config.json and one safetensors shard per layer (+ one for embeddings, one for
    the head) with an index, in the Mixtral hub layout. Returns the shard file names."""
    check_mixtral(config)
    dtype = dtype or config.model.param_dtype
    if dtype not in DTYPES:
        raise HFCheckpointError(f"cannot write dtype {dtype!r}; valid: {sorted(DTYPES)}.")
    np_dtype = DTYPES[dtype]
    flat = _flat(params)
    prefix = "/".join(BLOCK) + "/"
    layers, e = config.model.num_layers, config.moe.num_experts
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

    try:
        write(names[0], {"model.embed_tokens.weight": fetch(flat["embed/embedding"])})
        slice_at = jax.jit(lambda a, i: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False))
        stacked = {n[len(prefix) :]: a for n, a in flat.items() if n.startswith(prefix)}
        for i in range(layers):
            layer = {n: fetch(slice_at(a, np.int32(i))) for n, a in stacked.items()}
            write(names[i + 1], _layer_to_hf(layer, i, e))
        write(
            names[-1],
            {
                "model.norm.weight": fetch(flat["final_norm/scale"]),
                "lm_head.weight": fetch(flat["logits"]).T,
            },
        )
    except KeyError as err:
        raise HFCheckpointError(
            f"the parameters lack {err.args[0]!r}; they are not a glam_jax Mixtral tree."
        ) from None
    hf = hf_config(config)
    hf["dtype"] = hf["torch_dtype"] = dtype
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)
    return names
