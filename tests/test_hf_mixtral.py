"""Hugging Face Mixtral checkpoints: the fixture made by `transformers`
(experiments/make_hf_golden.py) gives its logits and greedy continuation; export -> import
is bitwise; bad checkpoints are refused in one sentence. No torch needed."""

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

from glam_jax import decode, hf_checkpoint, sharding
from glam_jax.data.tokenizer import train_tokenizer
from tests.helpers import ROOT, model_logits, refused, safetensors_in

# --dist loadgroup (pyproject.toml) gives this module to one xdist worker: the imported
# checkpoint and its generator are built once, not per xdist worker.
pytestmark = pytest.mark.xdist_group("hf_mixtral")

FIXTURE = os.path.join(ROOT, "tests", "testdata", "hf_mixtral_tiny")


@pytest.fixture(scope="module")
def imported():
    return hf_checkpoint.load_mixtral(FIXTURE)


@pytest.fixture(scope="module")
def generator(imported):
    return decode.Generator(imported[0])


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(os.path.join(FIXTURE, "golden.npz")))


def test_config_json_becomes_a_mixtral_config(imported):
    config, _ = imported
    m, e = config.model, config.moe
    assert (m.num_layers, m.embed_dim, m.mlp_dim, m.vocab_size) == (2, 64, 128, 128)
    assert (m.num_heads, m.num_kv_heads, m.head_dim) == (4, 2, 16)
    assert (m.rope_theta, m.norm_eps, m.sliding_window) == (1e6, 1e-5, 0)
    assert (e.num_experts, e.num_selected, e.router, e.dispatch) == (
        4,
        2,
        "topk_softmax",
        "dropless",
    )
    assert (e.every, m.position, m.ffn_activation, m.tie_embeddings) == (1, "rope", "silu", False)


def test_logits_equal_transformers(imported, golden):
    config, params = imported
    logits = model_logits(config, params, golden["input_ids"])
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, golden["logits"], atol=1e-4, rtol=0)


def test_sliding_window_logits_equal_transformers(imported, golden):
    config, params = imported
    windowed = config.copy_and_resolve_references()
    windowed.model.sliding_window = int(golden["window"])
    logits = model_logits(windowed, params, golden["input_ids"])
    np.testing.assert_allclose(logits, golden["logits_window"], atol=1e-4, rtol=0)


def _prompts(golden) -> list[list[int]]:
    return [golden["prompts"][r, :n].tolist() for r, n in enumerate(golden["prompt_lengths"])]


def test_greedy_continuation_equals_transformers(imported, generator, golden):
    """Both prompts (lengths 11 and 5) in one left-padded batch, through the KV cache."""
    out = generator.generate(imported[1], _prompts(golden), golden["greedy"].shape[1])
    assert out.tokens == golden["greedy"].tolist()


def test_generation_stops_at_eos(imported, generator, golden):
    """A row gets nothing from its first EOS on; the others go on (same compiled loop)."""
    eos = int(golden["greedy"][1, 4])  # row 1's first new token not seen before step 4
    out = generator.generate(imported[1], _prompts(golden), golden["greedy"].shape[1], eos_id=eos)
    for want, got in zip(golden["greedy"].tolist(), out.tokens, strict=True):
        assert got == (want[: want.index(eos)] if eos in want else want)
    assert out.tokens[1] == golden["greedy"][1, :4].tolist()


def test_export_then_import_is_bitwise(imported, tmp_path):
    config, params = imported
    hf_checkpoint.save_mixtral(params, config, str(tmp_path))
    exported, original = safetensors_in(str(tmp_path)), safetensors_in(FIXTURE)
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
        assert exported[key].tobytes() == value.tobytes(), key
    config2, params2 = hf_checkpoint.load_mixtral(str(tmp_path))
    assert config2.model.to_dict() == config.model.to_dict()
    flat1, flat2 = hf_checkpoint._flat(params), hf_checkpoint._flat(params2)
    assert sorted(flat1) == sorted(flat2)
    for key in flat1:
        a, b = np.asarray(flat1[key]), np.asarray(flat2[key])
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), key


def test_import_onto_an_8_device_mesh_shards_experts(imported):
    mesh = sharding.make_mesh((2, 4, 1), jax.devices()[:8])
    _, params8 = hf_checkpoint.load_mixtral(FIXTURE, mesh)
    wi_0 = params8["blocks"]["layer_0"]["moe"]["wi_0"]  # [layers, E, M, F]
    assert wi_0.sharding.spec[:2] == (None, "expert")
    assert wi_0.addressable_shards[0].data.shape == (2, 1, 64, 128)
    flat1, flat8 = hf_checkpoint._flat(imported[1]), hf_checkpoint._flat(params8)
    for key in flat1:
        np.testing.assert_array_equal(np.asarray(flat1[key]), np.asarray(flat8[key]))


# ---- bad checkpoints ----------------------------------------------------------------------
@pytest.fixture
def copy(tmp_path):
    path = str(tmp_path / "ckpt")
    shutil.copytree(FIXTURE, path)
    return path


def _refused(path: str, match: str) -> str:
    return refused(lambda: hf_checkpoint.load_mixtral(path), hf_checkpoint.HFCheckpointError, match)


def test_missing_shard_listed_in_the_index_is_refused(copy):
    os.remove(os.path.join(copy, "model-00002-of-00002.safetensors"))
    _refused(copy, "missing shard 'model-00002-of-00002.safetensors'")


def test_missing_numbered_shard_without_an_index_is_refused(copy):
    os.remove(os.path.join(copy, hf_checkpoint.INDEX_FILE))
    os.remove(os.path.join(copy, "model-00001-of-00002.safetensors"))
    _refused(copy, "missing shard 'model-00001-of-00002.safetensors'")


def test_shape_that_does_not_match_config_is_refused(copy):
    with open(os.path.join(copy, "config.json")) as f:
        hf = json.load(f)
    hf["intermediate_size"] = 96
    with open(os.path.join(copy, "config.json"), "w") as f:
        json.dump(hf, f)
    _refused(copy, r"has shape \[128, 64\] but config.json implies \[96, 64\]")


def test_unknown_key_layout_is_refused(copy):
    """transformers 5's in-memory layout (fused experts under `mlp.`) is not the hub layout."""
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        path = os.path.join(copy, name)
        tensors = _tensors_of(path)
        renamed = {k.replace("block_sparse_moe.", "mlp."): v for k, v in tensors.items()}
        save_file(renamed, path)
    os.remove(os.path.join(copy, hf_checkpoint.INDEX_FILE))
    _refused(copy, "unknown key layout")


def test_non_mixtral_config_is_refused(copy):
    with open(os.path.join(copy, "config.json")) as f:
        hf = json.load(f)
    hf["model_type"] = "llama"
    with open(os.path.join(copy, "config.json"), "w") as f:
        json.dump(hf, f)
    _refused(copy, "model_type='llama', which glam_jax cannot import")


def test_glam_config_cannot_be_exported(tmp_path):
    from tests.helpers import tiny_config

    with pytest.raises(hf_checkpoint.HFCheckpointError, match="no Hugging Face family"):
        hf_checkpoint.save_mixtral({}, tiny_config(), str(tmp_path))


def test_unrolled_layers_cannot_be_exported(tmp_path):
    from configs import mixtral

    config = mixtral.get_config("tiny")
    config.model.scan_layers = False
    with pytest.raises(hf_checkpoint.HFCheckpointError, match=r"model.scan_layers=False"):
        hf_checkpoint.save_mixtral({}, config, str(tmp_path))


def _tensors_of(path: str) -> dict[str, np.ndarray]:
    with safe_open(path, framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_generate_cli_reports_throughput_as_json(tmp_path):
    """experiments/generate.py on an HF directory with its tokenizer.model (a SentencePiece
    model trained here, 120 pieces for the fixture's 128-token vocabulary), default mesh
    (8 CPU devices, so the 2 prompts are padded to 8 rows); then a broken copy is refused."""
    hf_dir = tmp_path / "hf"
    shutil.copytree(FIXTURE, hf_dir)
    corpus = os.path.join(ROOT, "glam_jax", "data", "corpus", "tinyshakespeare.txt")
    with open(corpus) as f:
        text = f.read(30_000)
    proto = train_tokenizer([text], vocab_size=120, model_type="unigram", seed=0)
    (hf_dir / "tokenizer.model").write_bytes(proto)
    script = os.path.join(ROOT, "experiments", "generate.py")
    args = [sys.executable, script, f"--hf_dir={hf_dir}", "--max_new_tokens=4", "--warmup=0"]
    run = subprocess.run(
        [*args, "--prompt=ROMEO:", "--prompt=To be, or not", "--ignore_eos", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert (out["batch"], out["new_tokens_per_row"], out["num_devices"]) == (2, 4, 8)
    assert out["tokens_per_s"] > 0 and out["time_per_output_token_ms"] > 0
    assert len(out["texts"]) == 2 and all(len(t) == 4 for t in out["outputs"])

    os.remove(hf_dir / "model-00002-of-00002.safetensors")
    bad = subprocess.run([*args, "--prompt=x"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith("error: checkpoint "), bad.stderr[-2000:]
    assert "missing shard 'model-00002-of-00002.safetensors'" in bad.stderr


def test_mistral_common_tokenizer_loads_when_installed():
    """The Mistral/Mixtral v1 SentencePiece model shipped in `mistral-common` (optional)."""
    mistral_common = pytest.importorskip("mistral_common")
    from glam_jax import pretrained

    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    tok = pretrained.tokenizer(path)
    assert (tok.vocab_size(), tok.bos_id(), tok.eos_id()) == (32000, 1, 2)
    assert tok.encode("The capital of France is") == [415, 5565, 302, 4843, 349]
