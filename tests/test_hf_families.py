"""Hugging Face OLMoE, Qwen2-MoE and Qwen3-MoE checkpoints: the fixtures made by
`transformers` (experiments/make_hf_golden.py) give their logits and greedy continuations;
export -> import is bitwise; cached decoding equals the full forward on 1 and 8 devices;
bad checkpoints are refused in one sentence; the published presets count their published
totals. No torch needed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from glam_jax import decode, flops, hf_checkpoint, sharding
from glam_jax.presets import olmoe, qwen_moe
from tests.helpers import ROOT, model_logits, refused, safetensors_in
from tests.test_decode import NEW_TOKENS, assert_cached_equals_full, prompts_for

FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe")


def fixture_dir(family: str) -> str:
    return os.path.join(ROOT, "tests", "testdata", f"hf_{family}_tiny")


_IMPORTED: dict = {}


def imported(family: str):
    """(config, params) of a family's fixture, imported once per test session."""
    if family not in _IMPORTED:
        _IMPORTED[family] = hf_checkpoint.load(fixture_dir(family))
    return _IMPORTED[family]


def golden(family: str) -> dict:
    return dict(np.load(os.path.join(fixture_dir(family), "golden.npz")))


def _edit_config(path: str, **changes) -> None:
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    for key, value in changes.items():
        if value is _DELETE:
            hf.pop(key, None)
        else:
            hf[key] = value
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)


_DELETE = object()


# ---- config.json -> config ----------------------------------------------------------------
def test_each_family_s_features_come_from_config_json():
    c = {f: imported(f)[0] for f in FAMILIES}
    o, q2, q3 = c["olmoe"], c["qwen2_moe"], c["qwen3_moe"]
    assert (o.model.qk_norm, o.model.qkv_bias, o.moe.norm_topk_prob) == ("projection", False, False)
    assert (o.moe.router, o.moe.num_experts, o.moe.num_selected, o.moe.every) == ("topk", 8, 4, 1)
    assert (q2.model.qk_norm, q2.model.qkv_bias, q2.moe.norm_topk_prob) == ("none", True, False)
    assert (q2.moe.num_shared_experts, q2.moe.shared_expert_mlp_dim) == (1, 48)
    assert q2.moe.shared_expert_gate == "sigmoid"
    assert q2.model.segments == "(moe)*1 (dense)*1 (moe)*1"  # mlp_only_layers=[1]
    assert (q2.model.mlp_dim, q2.moe.expert_mlp_dim) == (96, 16)
    assert (q3.model.qk_norm, q3.moe.norm_topk_prob, q3.moe.num_selected) == ("head", True, 8)
    assert (q3.moe.every, q3.moe.moe_index_in_block, q3.model.segments) == (2, 1, "")
    assert (q3.model.head_dim, q3.model.tie_embeddings) == (24, True)
    assert (o.model.rope_theta, q2.model.rope_theta, q3.model.rope_theta) == (1e4, 1e6, 1e6)


# ---- equal to transformers ----------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(family):
    config, params = imported(family)
    logits = model_logits(config, params, golden(family)["input_ids"])
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, golden(family)["logits"], atol=1e-4, rtol=0)


def _prompts(g) -> list[list[int]]:
    return [g["prompts"][r, :n].tolist() for r, n in enumerate(g["prompt_lengths"])]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_continuation_equals_transformers(family):
    """Both prompts (lengths 11 and 5) in one left-padded batch, through the KV cache."""
    config, params = imported(family)
    g = golden(family)
    out = decode.Generator(config).generate(params, _prompts(g), g["greedy"].shape[1])
    assert out.tokens == g["greedy"].tolist()


def test_top_level_rope_theta_of_transformers_4_gives_the_same_model(tmp_path):
    """transformers 4.x wrote `rope_theta` at the top level, 5.x inside `rope_parameters`."""
    path = str(tmp_path / "ckpt")
    shutil.copytree(fixture_dir("qwen2_moe"), path)
    _edit_config(path, rope_parameters=_DELETE, rope_theta=1e6, qkv_bias=_DELETE)
    config, params = hf_checkpoint.load(path)
    assert config.model.rope_theta == 1e6 and config.model.qkv_bias  # 4.x: always biased
    logits = model_logits(config, params, golden("qwen2_moe")["input_ids"])
    np.testing.assert_allclose(logits, golden("qwen2_moe")["logits"], atol=1e-4, rtol=0)


# ---- export -> import ---------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_export_then_import_is_bitwise(family, tmp_path):
    config, params = imported(family)
    hf_checkpoint.save(params, config, str(tmp_path))
    exported, original = safetensors_in(str(tmp_path)), safetensors_in(fixture_dir(family))
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
        assert exported[key].tobytes() == value.tobytes(), key
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model_type"] == family
    config2, params2 = hf_checkpoint.load(str(tmp_path))
    assert config2.model.to_dict() == config.model.to_dict()
    assert config2.moe.to_dict() == config.moe.to_dict()
    flat1, flat2 = hf_checkpoint._flat(params), hf_checkpoint._flat(params2)
    assert sorted(flat1) == sorted(flat2)
    for key in flat1:
        a, b = np.asarray(flat1[key]), np.asarray(flat2[key])
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), key


# ---- cached decoding ----------------------------------------------------------------------
def check_cached_equals_full(family: str, mesh_shape, rows: int) -> None:
    """Greedy generation (prefill + cached loop) with the fixture's weights sharded on the
    mesh; at every step the logits the token came from equal a fresh full forward pass."""
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    config, params = hf_checkpoint.load(fixture_dir(family), mesh)
    gen = decode.Generator(config, mesh)
    prompts = prompts_for(config, rows)
    out = gen.generate(params, prompts, NEW_TOKENS, return_logits=True)
    assert_cached_equals_full(gen, params, prompts, out, mesh)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_full_forward_on_1_device(family):
    check_cached_equals_full(family, (1, 1, 1), rows=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_full_forward_on_8_devices(family):
    """Rows over data x expert, experts split 2 ways, heads (and OLMoE's q/k norm over all
    heads) split 2 ways on the model axis."""
    check_cached_equals_full(family, (2, 2, 2), rows=8)


# ---- refusals -----------------------------------------------------------------------------
@pytest.fixture
def copy(tmp_path):
    def make(family: str) -> str:
        path = str(tmp_path / family)
        shutil.copytree(fixture_dir(family), path)
        return path

    return make


def _refused(path: str, match: str) -> str:
    return refused(lambda: hf_checkpoint.load(path), hf_checkpoint.HFCheckpointError, match)


def test_unknown_model_type_is_refused(copy):
    path = copy("olmoe")
    _edit_config(path, model_type="deepseek_v3")
    _refused(path, "model_type='deepseek_v3', which glam_jax cannot import")


def _drop_tensor(path: str, key: str) -> None:
    with open(os.path.join(path, hf_checkpoint.INDEX_FILE)) as f:
        shard = json.load(f)["weight_map"][key]
    with safe_open(os.path.join(path, shard), framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != key}
    save_file(tensors, os.path.join(path, shard))
    os.remove(os.path.join(path, hf_checkpoint.INDEX_FILE))


@pytest.mark.parametrize(
    "family, key",
    [
        ("olmoe", "model.layers.1.self_attn.k_norm.weight"),
        ("qwen2_moe", "model.layers.2.mlp.shared_expert_gate.weight"),
        ("qwen3_moe", "model.layers.3.mlp.experts.15.down_proj.weight"),
    ],
)
def test_missing_key_is_refused(copy, family, key):
    path = copy(family)
    _drop_tensor(path, key)
    _refused(path, f"lacks tensor '{key}'")


def test_wrong_shape_is_refused(copy):
    path = copy("qwen3_moe")
    _edit_config(path, moe_intermediate_size=24)
    _refused(
        path,
        r"'model.layers.1.mlp.experts.0.down_proj.weight' in .* has shape \[64, 16\] but "
        r"config.json implies \[64, 24\]",
    )


@pytest.mark.parametrize(
    "family, change, named",
    [
        ("olmoe", {"clip_qkv": 8.0}, "clip_qkv=8.0"),
        ("olmoe", {"attention_bias": True}, "attention_bias=True"),
        ("qwen2_moe", {"use_sliding_window": True}, "use_sliding_window=True"),
        ("qwen3_moe", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
        ("qwen3_moe", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ],
)
def test_unsupported_feature_is_refused(copy, family, change, named):
    path = copy(family)
    _edit_config(path, **change)
    _refused(path, named)


def _add_tensor(path: str, key: str, value: np.ndarray) -> None:
    shard = os.path.join(path, "model-00001-of-00002.safetensors")
    with safe_open(shard, framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, key: value}, shard)
    os.remove(os.path.join(path, hf_checkpoint.INDEX_FILE))


def test_a_tied_head_may_be_stored_but_must_equal_the_embedding(copy):
    """Qwen3 fixture: tie_word_embeddings=true, so lm_head.weight is optional."""
    embedding = safetensors_in(fixture_dir("qwen3_moe"))["model.embed_tokens.weight"]
    same = copy("qwen3_moe")
    _add_tensor(same, "lm_head.weight", embedding)
    config, params = hf_checkpoint.load(same)
    assert config.model.tie_embeddings and "logits" not in params
    other = same + "_other"
    shutil.copytree(fixture_dir("qwen3_moe"), other)
    _add_tensor(other, "lm_head.weight", embedding + 1.0)
    _refused(other, "lm_head.weight differs from model.embed_tokens.weight")


def test_a_config_of_another_family_is_refused(copy):
    olmoe_path = copy("olmoe")
    config, _ = imported("qwen3_moe")
    with pytest.raises(hf_checkpoint.HFCheckpointError, match="model_type='olmoe'"):
        hf_checkpoint.load(olmoe_path, config=config)


def test_a_config_no_family_expresses_cannot_be_exported(tmp_path):
    config = imported("qwen3_moe")[0].copy_and_resolve_references()
    config.model.qk_norm = "projection"  # OLMoE's norm with Qwen3's router and dense layers
    with pytest.raises(hf_checkpoint.HFCheckpointError, match="no Hugging Face family"):
        hf_checkpoint.save({}, config, str(tmp_path))


# ---- presets ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "module, size",
    [
        (olmoe, "1b_7b"),
        (qwen_moe, "qwen3_30b_a3b"),
        (qwen_moe, "qwen3_235b_a22b"),
        (qwen_moe, "qwen1_5_a2_7b"),
    ],
)
def test_published_totals_within_2_percent(module, size):
    config = module.get_config(f"size={size}")
    counts = flops.count(config)
    assert abs(counts.total_params / config.paper.total_params - 1) < 0.02
    assert abs(counts.activated_params / config.paper.activated_params - 1) < 0.02


@pytest.mark.parametrize(
    "module, size, family",
    [
        (olmoe, "tiny", "olmoe"),
        (qwen_moe, "tiny", "qwen3_moe"),
        (qwen_moe, "qwen2_tiny", "qwen2_moe"),
    ],
)
def test_tiny_presets_are_their_family(module, size, family):
    config = module.get_config(size)
    assert config.model.dtype == "float32" and config.train.seq_len <= config.model.max_len
    assert hf_checkpoint.family_for(config) == family


# ---- generate.py --------------------------------------------------------------------------
def test_generate_cli_runs_on_a_qwen2_moe_directory(tmp_path):
    """experiments/generate.py --hf_dir on the Qwen2-MoE fixture (shared expert, biases, a
    dense layer) with token-id prompts: like the published OLMoE/Qwen directories it has no
    SentencePiece tokenizer.model, and none is needed. (The text path: test_hf_mixtral.)"""
    script = os.path.join(ROOT, "experiments", "generate.py")
    run = subprocess.run(
        [
            sys.executable,
            script,
            f"--hf_dir={fixture_dir('qwen2_moe')}",
            "--random_prompts=2",
            "--prompt_len=5",
            "--max_new_tokens=3",
            "--warmup=0",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert (out["batch"], out["new_tokens_per_row"], out["num_devices"]) == (2, 3, 8)
    assert all(len(row) == 3 for row in out["outputs"])
