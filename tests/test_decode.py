"""Cached decoding equals re-running the full forward pass at every step (float32), for GLaM
(relative-position bias, dense+MoE blocks) and Mixtral (RoPE, GQA, every layer MoE, with and
without a sliding window), on 1 device and on an 8-device (2, 4, 1) mesh; prompts of
different lengths share one batch; the sampling options behave."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mixtral
from glam_jax import attention, decode, sharding
from tests.helpers import tiny_config

NEW_TOKENS = 4
# Lengths straddle the exact (< 16) and log-spaced relative-position buckets.
PROMPT_LENGTHS = (19, 3, 11, 1, 7, 24, 2, 13)


def glam_config():
    config = tiny_config()
    config.model.init_std = 0.3  # O(1) logits: a tiny model does more than repeat its input
    return config


def mixtral_config(window: int = 0):
    config = mixtral.get_config("size=tiny")
    m = config.model
    m.vocab_size, m.embed_dim, m.mlp_dim, m.num_layers = 256, 32, 64, 2
    m.num_heads, m.num_kv_heads, m.head_dim = 4, 2, 8
    m.init_std, m.sliding_window = 0.3, window
    config.moe.num_experts = 4
    return config


def prompts_for(config, rows: int) -> list[list[int]]:
    rng = np.random.RandomState(0)
    return [rng.randint(1, config.model.vocab_size, n).tolist() for n in PROMPT_LENGTHS[:rows]]


def init_params(gen: decode.Generator, seed: int = 1):
    """Random parameters of the right shapes from numpy (no init compile), O(1) logits."""
    boxed = jax.eval_shape(
        lambda: gen.model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 4), jnp.int32))
    )["params"]
    rng = np.random.RandomState(seed)
    std = gen.config.model.init_std

    def draw(a):
        x = rng.normal(0.0, std, a.shape)
        return (1.0 + x if a.ndim <= 2 and a.shape[-1] == gen.config.model.embed_dim else x).astype(
            a.dtype
        )

    return jax.tree.map(draw, nn.unbox(boxed))


def full_forward_fn(gen: decode.Generator):
    """Logits of each row's last real token; rows right-padded (causal: the padding after a
    token cannot change its logits), so one compiled shape serves every step."""

    def last_logits(params, tokens_bl, segment_ids_bl, positions_bl, last_b):
        variables = {"params": params, **gen.model_state}
        logits_blv, _ = gen.model.apply(variables, tokens_bl, segment_ids_bl, positions_bl)
        return jnp.take_along_axis(logits_blv, last_b[:, None, None], axis=1)[:, 0]

    return jax.jit(last_logits)


def check_cached_equals_full(config, mesh_shape, rows, model_state=None):
    """Greedy generation through prefill + the cached loop; at every step the logits the
    token came from equal a fresh full forward pass over everything before it."""
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    gen = decode.Generator(config, mesh, model_state)
    params = init_params(gen)
    prompts = prompts_for(config, rows)
    out = gen.generate(params, prompts, NEW_TOKENS, return_logits=True)
    assert out.steps == NEW_TOKENS and out.logits.shape[:2] == (rows, NEW_TOKENS)
    assert_cached_equals_full(gen, params, prompts, out, mesh)


def assert_cached_equals_full(gen, params, prompts, out, mesh) -> None:
    """Each cached decoding step's logits equal the full forward over the same prefix
    (2e-5), and its greedy token is their argmax."""
    b, total = len(prompts), max(map(len, prompts)) + NEW_TOKENS
    full = full_forward_fn(gen)
    for step in range(NEW_TOKENS):
        seqs = [p + t[:step] for p, t in zip(prompts, out.tokens, strict=True)]
        tokens, segments, positions = (np.zeros((b, total), np.int32) for _ in range(3))
        for r, seq in enumerate(seqs):
            tokens[r, : len(seq)], segments[r, : len(seq)] = seq, 1
            positions[r, : len(seq)] = np.arange(len(seq))
        last = np.array([len(s) - 1 for s in seqs], np.int32)
        with sharding.use_mesh(mesh):
            ref_bv = np.asarray(full(params, tokens, segments, positions, last))
        got_bv = out.logits[:, step]
        np.testing.assert_allclose(got_bv, ref_bv, atol=2e-5, rtol=0, err_msg=f"step {step}")
        np.testing.assert_array_equal(np.asarray(out.tokens)[:, step], ref_bv.argmax(-1))


@pytest.mark.parametrize(
    "make_config",
    [glam_config, lambda: mixtral_config(window=5)],
    ids=["glam", "mixtral_window5"],
)
def test_cached_decoding_equals_full_forward_on_1_device(make_config):
    check_cached_equals_full(make_config(), (1, 1, 1), rows=5)


@pytest.mark.parametrize("make_config", [glam_config, mixtral_config], ids=["glam", "mixtral"])
def test_cached_decoding_equals_full_forward_on_8_devices(make_config):
    """8 rows over data x expert = 8; experts split 4 ways; prompts of 8 different lengths."""
    check_cached_equals_full(make_config(), (2, 4, 1), rows=8)


def test_cached_decoding_with_shared_experts_and_the_expert_bias():
    """DeepSeek-style layer: 8 experts of width 16 (model.mlp_dim 64), k=4, a sigmoid-gated
    shared expert and a trained (here random, large) balancing bias that moves the choices."""
    config = glam_config()
    config.moe.update(
        router="topk_softmax",
        num_selected=4,
        expert_mlp_dim=16,
        num_shared_experts=1,
        shared_expert_gate="sigmoid",
        expert_bias_update_rate=0.001,
    )
    bias = np.random.RandomState(2).normal(0.0, 0.3, (2, 8)).astype(np.float32)
    state = {"moe_state": {"blocks": {"layer_1": {"moe": {"expert_bias": jnp.asarray(bias)}}}}}
    check_cached_equals_full(config, (1, 1, 1), 4, model_state=state)


def test_cache_is_stacked_on_the_layers_axis_and_sharded_by_batch():
    config = glam_config()
    mesh = sharding.make_mesh((2, 4, 1), jax.devices()[:8])
    gen = decode.Generator(config, mesh)
    cache = gen.init_cache(8, 16)
    attn = cache["blocks"]["layer_0"]["attention"]
    layers = config.model.num_layers // config.moe.every
    assert attn["cached_key"].shape == (layers, 8, 16, config.model.num_heads, 16)
    assert attn["cached_key"].sharding.spec[:2] == (None, ("data", "expert"))
    assert attn["cache_index"].shape == (layers,)


def test_every_decode_step_bucket_equals_the_training_bucket():
    """The bias row of a cached query uses the training buckets of the same offsets, past
    rel_max_distance included."""
    s = 300
    train = attention.relative_position_buckets(s, 32, 128)
    by_distance = attention.offset_buckets(-np.arange(s), 32, 128)
    q, k = np.tril_indices(s)
    np.testing.assert_array_equal(by_distance[q - k], train[q, k])


def test_moe_never_drops_while_decoding():
    config = glam_config()
    config.moe.capacity_factor_eval = 0.01  # would drop almost everything in evaluation
    config.moe.dispatch = "einsum"
    for path in ("dropless", "einsum", "sort"):
        config.moe.decode_dispatch = path
        dc = decode.decode_config(config)
        assert dc.moe.dispatch == path and dc.moe.capacity_factor_eval >= dc.moe.num_experts
    config.moe.router = "expert_choice"
    with pytest.raises(decode.DecodeError, match="expert_choice"):
        decode.decode_config(config)


# ---- sampling -------------------------------------------------------------------------------
LOGITS = np.log(np.array([[0.05, 0.6, 0.25, 0.1], [0.3, 0.1, 0.15, 0.45]], np.float32))


def _draws(sampling: decode.Sampling, n: int = 400) -> np.ndarray:
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    fn = jax.jit(jax.vmap(lambda k: decode.sample_logits(jnp.asarray(LOGITS), k, sampling)))
    return np.asarray(fn(keys))  # [n, rows]


def test_temperature_zero_and_near_zero_and_top_k_1_are_greedy():
    greedy = LOGITS.argmax(-1)
    for sampling in (
        decode.Sampling(temperature=0.0),
        decode.Sampling(temperature=1e-4),
        decode.Sampling(temperature=1.0, top_k=1),
        decode.Sampling(temperature=5.0, top_p=1e-6),
    ):
        assert (_draws(sampling) == greedy).all(), sampling


def test_top_k_and_top_p_filter_the_tail():
    top2 = np.argsort(-LOGITS, axis=-1)[:, :2]
    for sampling in (decode.Sampling(1.0, top_k=2), decode.Sampling(1.0, top_p=0.7)):
        draws = _draws(sampling)
        for r in range(LOGITS.shape[0]):
            assert set(draws[:, r]) == set(top2[r]), (sampling, r)  # both kept, nothing else
    # Row 0: p(token 1) = 0.6 reaches top_p=0.5 alone.
    assert set(_draws(decode.Sampling(1.0, top_p=0.5))[:, 0]) == {1}
    assert len(set(_draws(decode.Sampling(1.0))[:, 0])) == 4  # no filter: every token


def test_vocab_limit_never_picks_ids_past_the_tokenizer():
    for sampling in (decode.Sampling(vocab_limit=1), decode.Sampling(1.0, vocab_limit=1)):
        assert (_draws(sampling) == 0).all()


def test_pad_prompts_to_a_fixed_length_and_row_count():
    padded = decode.pad_prompts([[5, 6], [7]], row_multiple=2, pad_id=9, length=4, rows=3)
    np.testing.assert_array_equal(
        padded.tokens, [[9, 9, 5, 6], [9, 9, 9, 7], [9, 9, 5, 6], [9, 9, 5, 6]]
    )
    np.testing.assert_array_equal(padded.positions[:2], [[0, 0, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(padded.segment_ids[1], [0, 0, 0, 1])
    assert padded.lengths.tolist() == [2, 1, 2, 2] and padded.num_prompts == 2


def test_bad_sampling_and_lengths_are_refused():
    with pytest.raises(decode.DecodeError, match="top_p"):
        decode.Sampling(top_p=0.0).check()
    with pytest.raises(decode.DecodeError, match="at least one token"):
        decode.pad_prompts([[1, 2], []])
    with pytest.raises(decode.DecodeError, match="prompt length 2 is shorter than .* 3"):
        decode.pad_prompts([[1, 2, 3]], length=2)
    gen = decode.Generator(glam_config())
    with pytest.raises(decode.DecodeError, match="model.max_len"):
        gen.init_cache(1, glam_config().model.max_len + 1)


# ---- GPU (run with `pytest -m gpu tests/test_decode.py` on a GPU host) ---------------------


@pytest.mark.parametrize("window", [1, 37, 256])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (cuDNN)")
def test_cudnn_sliding_window_equals_xla(window, packed):
    b, s, h, d = 2, 256, 4, 64
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in keys)
    seg = None
    if packed:
        seg = jnp.where(jnp.arange(s) < 100, 1, 2)[None].repeat(b, 0).astype(jnp.int32)
    mask = attention.attention_mask(seg, s, window)
    out_x = jax.jit(lambda q, k, v: attention.xla_attention(q, k, v, None, mask, 0.125))(q, k, v)
    out_c = jax.jit(lambda q, k, v: attention.cudnn_attention(q, k, v, None, seg, 0.125, window))(
        q, k, v
    )
    np.testing.assert_allclose(
        np.asarray(out_c, np.float32), np.asarray(out_x, np.float32), atol=2e-2, rtol=2e-2
    )


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
def test_hf_fixture_greedy_continuation_on_gpu():
    """The transformers fixture's greedy tokens through the GPU decode path (full f32 dots)."""
    import os

    from glam_jax import hf_checkpoint
    from tests.helpers import ROOT

    fixture = os.path.join(ROOT, "tests", "testdata", "hf_mixtral_tiny")
    golden = np.load(os.path.join(fixture, "golden.npz"))
    with jax.default_matmul_precision("highest"):
        config, params = hf_checkpoint.load_mixtral(fixture)
        config.moe.ragged_matmul = "xla"  # the Hopper kernel needs bf16 and widths % 64 == 0
        prompts = [
            golden["prompts"][r, :n].tolist() for r, n in enumerate(golden["prompt_lengths"])
        ]
        out = decode.Generator(config).generate(params, prompts, golden["greedy"].shape[1])
    assert out.tokens == golden["greedy"].tolist()


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("make_config", [glam_config, mixtral_config], ids=["glam", "mixtral"])
def test_cached_decoding_equals_full_forward_on_gpu(make_config):
    config = make_config()
    config.moe.ragged_matmul = "xla"  # the Hopper kernel needs bf16 and widths % 64 == 0
    with jax.default_matmul_precision("highest"):
        check_cached_equals_full(config, (1, 1, 1), rows=5)
