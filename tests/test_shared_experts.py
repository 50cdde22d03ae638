"""Shared experts (DeepSeekMoE / Qwen2-MoE) and fine-grained experts (moe.expert_mlp_dim).

The shared expert is the dense FFN kind's GluFFN beside the routed experts: its output equals a
numpy gated FFN (times Qwen2-MoE's sigmoid gate), the three dispatch paths agree with it, at
k=8 and with an expert width other than model.mlp_dim, and the counts include it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam_jax import flops, model
from glam_jax.moe import MoE, dispatch
from tests.helpers import exact_moe_config, tiny_config

M, H, E, K, HE = 16, 32, 16, 8, 8  # model, dense and expert widths; k=8 of 16 experts


class MoEFFN(nn.Module):
    """The 'moe' FFN kind exactly as a decoder layer builds it (shared expert included)."""

    config: object
    train: bool = False

    @nn.compact
    def __call__(self, h_btm):
        return model.FFN_KINDS["moe"](self.config, self.train, lambda cls: cls)(h_btm)


def config(path="einsum", gate="sigmoid", **moe):
    return exact_moe_config(
        M,
        H,
        num_experts=E,
        num_selected=K,
        expert_mlp_dim=HE,
        router="topk_softmax",
        dispatch=path,
        group_size=16,
        capacity_factor_train=100.0,
        capacity_factor_eval=100.0,
        num_shared_experts=2,
        shared_expert_gate=gate,
        **moe,
    )


def random_params(cfg, x, seed=0):
    """O(1) random values with the module's parameter tree."""
    boxed = jax.eval_shape(lambda: MoEFFN(cfg).init({"params": jax.random.key(0)}, x))["params"]
    shapes = nn.meta.unbox(boxed)
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(s.shape[-2]), jnp.float32),
        shapes,
    )


def np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("gate", ["none", "sigmoid"])
def test_shared_expert_adds_a_numpy_gated_ffn(gate):
    """y = routed MoE + (gelu(x W0) * (x W1)) Wo [* sigmoid(x w_gate)], width 2 x expert width."""
    cfg = config(gate=gate)
    x = jax.random.normal(jax.random.key(1), (2, 16, M))
    params = random_params(cfg, x)
    shared = params["shared_expert"]
    assert shared["wi_0"].shape == (M, 2 * HE)  # DeepSeek: n_shared x moe_intermediate_size
    assert ("gate" in shared) == (gate == "sigmoid")
    y, stats = MoEFFN(cfg).apply({"params": params}, x)
    routed, _ = MoE(cfg).apply({"params": params["moe"]}, x)
    xs = np.asarray(x, np.float64)
    w = {k: np.asarray(v, np.float64) for k, v in shared.items()}
    ref = (np_gelu_tanh(xs @ w["wi_0"]) * (xs @ w["wi_1"])) @ w["wo"]
    if gate == "sigmoid":
        ref = ref / (1.0 + np.exp(-(xs @ w["gate"])))
    np.testing.assert_allclose(np.asarray(y - routed, np.float64), ref, rtol=1e-5, atol=1e-5)
    assert float(np.std(ref)) > 0.1 and "expert_load" in stats


def test_paths_agree_with_shared_and_fine_grained_experts_at_k8():
    """einsum, sort and dropless: same outputs and gradients (1e-5) with shared experts, k=8 of
    16 experts of width 8 (model.mlp_dim 32), nothing dropped."""
    x, cot = jax.random.normal(jax.random.key(2), (2, 2, 16, M))
    params = random_params(config(), x)
    results = {}
    for path in dispatch.DISPATCHES:
        module = MoEFFN(config(path), train=True)

        def loss(p, module=module):
            y, st = module.apply({"params": p}, x, rngs={"routing": jax.random.key(3)})
            return jnp.sum(y * cot) + 0.01 * st["aux_loss"] + 1e-3 * st["z_loss"], (y, st)

        fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (value, (y, st)), grads = fn(params)
        assert float(st["dropped_fraction"]) == 0.0
        results[path] = (value, y, grads)
    value0, y0, g0 = results["einsum"]
    assert float(jnp.std(y0)) > 0.1
    for path in ("sort", "dropless"):
        value, y, grads = results[path]
        np.testing.assert_allclose(value, value0, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g0), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
            assert float(jnp.max(jnp.abs(b))) > 0.0


def test_counts_include_the_shared_expert_as_activated():
    """Hand counts: 2 shared experts of width 16 (+ sigmoid gate), 8 routed experts of width 16
    (fine-grained: model.mlp_dim is 64), k=2."""
    c = tiny_config(num_shared_experts=2, expert_mlp_dim=16, shared_expert_gate="sigmoid")
    m, h, v, e, k = c.model.embed_dim, c.model.mlp_dim, c.model.vocab_size, 8, 2
    he, hs = 16, 32
    heads, d, layers, s = c.model.num_heads, c.model.head_dim, c.model.num_layers, c.train.seq_len
    attn_matmul = 4 * m * heads * d
    attn = attn_matmul + heads * c.model.rel_buckets
    dense_ffn, shared_ffn = 3 * m * h, 3 * m * hs + m  # shared: wi_0, wi_1, wo and the gate
    experts, router = e * 3 * m * he, m * e
    blocks = layers // 2
    per_block = 2 * (attn + 2 * m) + dense_ffn + shared_ffn + experts + router
    total = blocks * per_block + v * m + m
    counts = flops.count(c)
    assert counts.total_params == total
    assert counts.expert_params == blocks * experts
    assert counts.activated_params == total - blocks * experts + blocks * experts * k // e
    matmul = blocks * (2 * attn_matmul + dense_ffn + shared_ffn + router + experts * k / e)
    matmul += v * m  # the tied output projection (the embedding lookup is no matmul)
    forward = 2 * matmul + 2 * 2 * (s / 2) * heads * d * layers
    assert counts.flops_per_token_forward == pytest.approx(forward, rel=1e-12)
    assert counts.flops_per_token == pytest.approx(3 * forward, rel=1e-12)


def test_gpu_bench_fine_grained_moe_and_its_dense_twin_have_equal_activated_flops():
    """configs/glam_gpu_bench.py: 64 experts of H/4, top-6, 2 shared vs dense H=12288: the
    same FLOPs per token but for the fine-grained model's routers (M x 64 per MoE layer)."""
    from configs import glam_gpu_bench

    fine = glam_gpu_bench.get_config(
        "moe+experts=64+ewidth=2048+k=6+shared=2+router=topk_softmax+dispatch=dropless"
    )
    twin = glam_gpu_bench.get_config("dense+mlp=12288")
    routers = fine.model.num_layers // 2 * fine.model.embed_dim * 64
    got = flops.count(fine).flops_per_token - flops.count(twin).flops_per_token
    assert got == pytest.approx(3 * 2 * routers, rel=1e-9)  # training = 3 x 2 x weights
