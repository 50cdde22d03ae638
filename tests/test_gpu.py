"""GPU-only code paths; run on a GPU host with `pytest -m gpu`. Skipped (with reason) elsewhere."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam_jax import attention as attn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (cuDNN attention)"),
]


@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_attention_equals_xla_with_bias_and_causal_mask(packed):
    b, s, h, d = 2, 512, 4, 64
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in keys[:3])
    buckets = attn.relative_position_buckets(s, 32, 128)
    table = jax.random.normal(keys[3], (h, 32), jnp.float32)
    bias = jnp.einsum("tsb,hb->hts", jax.nn.one_hot(buckets, 32), table).astype(jnp.bfloat16)
    seg = None
    if packed:
        seg = jnp.where(jnp.arange(s) < s // 3, 1, 2)[None].repeat(b, 0).astype(jnp.int32)
    scale = 1.0 / math.sqrt(d)

    def xla(q, k, v, bias):
        return attn.xla_attention(q, k, v, bias, attn.attention_mask(seg, s), scale)

    def cudnn(q, k, v, bias):
        return attn.cudnn_attention(q, k, v, bias, seg, scale)

    out_x, out_c = jax.jit(xla)(q, k, v, bias), jax.jit(cudnn)(q, k, v, bias)
    np.testing.assert_allclose(
        np.asarray(out_c, np.float32), np.asarray(out_x, np.float32), atol=2e-2, rtol=2e-2
    )
    gx = jax.jit(jax.grad(lambda *a: jnp.sum(xla(*a).astype(jnp.float32)), (0, 3)))(q, k, v, bias)
    gc = jax.jit(jax.grad(lambda *a: jnp.sum(cudnn(*a).astype(jnp.float32)), (0, 3)))(q, k, v, bias)
    for a, c in zip(gx, gc, strict=True):
        a, c = np.asarray(a, np.float32), np.asarray(c, np.float32)
        assert np.max(np.abs(a - c)) <= 0.05 * np.max(np.abs(a)) + 1e-2


def test_model_uses_cudnn_by_default_on_gpu():
    assert attn.resolve_impl("auto") == "cudnn"


def test_grouped_matmul_kernel_matches_ragged_dot_with_gradients():
    from glam_jax.kernels import grouped_matmul as gmm

    if not gmm.available():
        pytest.skip("needs a Hopper (sm_90+) GPU for the Mosaic-GPU kernels")
    n, k, m, g = 2048, 256, 512, 8
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(keys[0], (n, k), jnp.bfloat16)
    w = jax.random.normal(keys[1], (g, k, m), jnp.bfloat16) * 0.1
    sizes = np.array([300, 0, 512, 128, 1, 700, 207, 200], np.int32)
    assert sizes.sum() == n
    gs = jnp.asarray(sizes)
    dy = jax.random.normal(keys[2], (n, m), jnp.bfloat16)

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w, gs).astype(jnp.float32) * dy.astype(jnp.float32))

    ref = jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32)
    out = jax.jit(gmm.grouped_matmul)(x, w, gs)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=2e-2, atol=0.1)
    gx_ref, gw_ref = jax.jit(jax.grad(loss(jax.lax.ragged_dot), (0, 1)))(x, w)
    gx, gw = jax.jit(jax.grad(loss(gmm.grouped_matmul), (0, 1)))(x, w)
    for a, b in ((gx, gx_ref), (gw, gw_ref)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= 0.02 * np.max(np.abs(b)) + 0.1


def test_auto_grouped_matmul_uses_the_kernel_only_where_it_fits():
    from glam_jax.kernels import grouped_matmul as gmm
    from glam_jax.moe import dispatch

    if not gmm.available():
        pytest.skip("needs a Hopper (sm_90+) GPU for the Mosaic-GPU kernels")

    def experts(dtype, m, h):
        return dispatch.Experts(
            wi_0=jnp.zeros((4, m, h), dtype), wi_1=None, wo=jnp.zeros((4, h, m), dtype)
        )

    assert dispatch.resolve_ragged_matmul("auto", experts(jnp.bfloat16, 256, 512)) == "blocked"
    assert dispatch.resolve_ragged_matmul("auto", experts(jnp.bfloat16, 128, 384)) == "mgpu"
    assert dispatch.resolve_ragged_matmul("auto", experts(jnp.float32, 256, 512)) == "xla"
    assert dispatch.resolve_ragged_matmul("auto", experts(jnp.bfloat16, 32, 64)) == "xla"


def _padded_rows(bg, k, e):
    """A block layout of pairs for e=6 experts (one empty, one of exactly a tile, one of a single
    row) and random bf16 rows [R, k] in it, zero in padding and unused rows."""
    sizes = np.array([300, 0, 128, 1, 700, 207])
    expert_p = jnp.asarray(np.repeat(np.arange(e), sizes)[np.random.permutation(sizes.sum())])
    lay = jax.jit(bg.block_layout, static_argnums=1)(expert_p, e)
    real = (lay.row_pair < expert_p.size)[:, None]
    x = jax.random.normal(jax.random.PRNGKey(5), (lay.rows, k), jnp.bfloat16)
    return lay, jnp.where(real, x, 0)


def test_block_grouped_matmul_kernels_match_ragged_dot_with_gradients():
    """The block-aligned Hopper kernels (forward, input and weight gradient) against XLA's
    ragged_dot on the same padded layout, with an empty expert and one of exactly a tile."""
    from glam_jax.kernels import block_grouped_matmul as bg

    if bg.unsupported_reason() is not None:
        pytest.skip(bg.unsupported_reason())
    k, n, e = 256, 512, 6
    lay, x = _padded_rows(bg, k, e)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    w = jax.random.normal(keys[1], (e, k, n), jnp.bfloat16) * 0.1
    ct = jax.random.normal(keys[2], (lay.rows, n), jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w, lay).astype(jnp.float32) * ct)

    out = jax.jit(bg.block_matmul)(x, w, lay)
    ref = jax.jit(bg.block_matmul_xla)(x, w, lay)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=0.1)
    got = jax.jit(jax.grad(loss(bg.block_matmul), (0, 1)))(x, w)
    want = jax.jit(jax.grad(loss(bg.block_matmul_xla), (0, 1)))(x, w)
    for a, b in zip(got, want, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.isfinite(a).all()
        assert np.max(np.abs(a - b)) <= 0.02 * np.max(np.abs(b)) + 0.1
    assert float(jnp.abs(got[1][1]).max()) == 0.0  # the empty expert


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_glu_kernel_matches_two_ragged_dots_with_gradients(activation):
    """The forward kernel with the GLU epilogue (x @ [gate | up], act(gate) * up from the f32
    accumulator) and its VJP against ragged_dot on the same layout."""
    from glam_jax.kernels import block_grouped_matmul as bg

    if bg.unsupported_reason() is not None:
        pytest.skip(bg.unsupported_reason())
    k, h, e = 256, 512, 6
    lay, x = _padded_rows(bg, k, e)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    w0, w1 = (jax.random.normal(kk, (e, k, h), jnp.bfloat16) * 0.1 for kk in keys[1:3])
    used = jnp.arange(lay.rows)[:, None] < lay.num_used_tiles * bg.BLOCK_ROWS
    ct = jnp.where(used, jax.random.normal(keys[3], (lay.rows, h), jnp.float32), 0.0)

    def loss(f):
        def run(x, w0, w1):
            h_rh = f(x, w0, w1, lay, activation).astype(jnp.float32)
            return jnp.sum(jnp.where(used, h_rh, 0.0) * ct)  # unused rows are undefined

        return jax.jit(jax.value_and_grad(run, (0, 1, 2)))

    out = jax.jit(bg.glu_block_matmul, static_argnums=4)(x, w0, w1, lay, activation)
    ref = jax.jit(bg.glu_block_matmul_xla, static_argnums=4)(x, w0, w1, lay, activation)
    out, ref = np.asarray(out, np.float32)[np.asarray(used[:, 0])], np.asarray(ref, np.float32)
    np.testing.assert_allclose(out, ref[: out.shape[0]], atol=0.05, rtol=0.02)
    (_, got), (_, want) = (
        loss(bg.glu_block_matmul)(x, w0, w1),
        loss(bg.glu_block_matmul_xla)(x, w0, w1),
    )
    for a, b in zip(got, want, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.isfinite(a).all()
        assert np.max(np.abs(a - b)) <= 0.02 * np.max(np.abs(b)) + 0.1
    assert float(jnp.abs(got[1][1]).max()) == 0.0  # the empty expert


@pytest.mark.parametrize("fused_glu", [True, False])
def test_moe_layer_blocked_equals_xla_dropless(fused_glu):
    """The MoE module with moe.ragged_matmul='blocked' (the gated matmuls fused into one kernel
    or not) vs 'xla': outputs and gradients."""
    from configs.glam_tiny import get_config
    from glam_jax.model import frozen
    from glam_jax.moe import MoE

    def config(name):
        c = get_config()
        c.model.update(dtype="bfloat16", param_dtype="bfloat16", embed_dim=256, mlp_dim=512)
        c.moe.update(num_experts=8, dispatch="dropless", ragged_matmul=name, group_size=256)
        c.moe.fused_glu = fused_glu
        return frozen(c)

    cfgs = {name: config(name) for name in ("blocked", "xla")}
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 256, 256), jnp.bfloat16)
    params = MoE(cfgs["xla"], train=False).init(jax.random.PRNGKey(1), x)

    def run(name):
        module = MoE(cfgs[name], train=False)

        def loss(p):
            y, _ = module.apply(p, x)
            return jnp.sum(y.astype(jnp.float32) ** 2), y

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, y_b), g_b = run("blocked")
    (_, y_x), g_x = run("xla")
    y_b, y_x = np.asarray(y_b, np.float32), np.asarray(y_x, np.float32)
    assert np.max(np.abs(y_b - y_x)) <= 0.02 * np.max(np.abs(y_x)) + 1e-2
    for a, b in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_x), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= 0.03 * np.max(np.abs(b)) + 1e-3


@pytest.mark.parametrize("kernel,width", [("blocked", 256), ("mgpu", 384)])
def test_dropless_k8_fine_grained_experts_run_the_kernels_and_match_xla(kernel, width):
    """Issue 17: dropless with k=8 of 16 experts narrower than model.mlp_dim runs the Hopper
    kernels (a Mosaic-GPU custom call in the compiled step; 'auto' picks the same one) and
    matches XLA's ragged_dot in outputs and gradients."""
    from configs.glam_tiny import get_config
    from glam_jax.kernels import grouped_matmul as gmm
    from glam_jax.model import frozen
    from glam_jax.moe import MoE, dispatch

    if not gmm.available():
        pytest.skip("needs a Hopper (sm_90+) GPU for the Mosaic-GPU kernels")

    def config(name):
        c = get_config()
        c.model.update(dtype="bfloat16", param_dtype="bfloat16", embed_dim=256, mlp_dim=1024)
        c.moe.update(num_experts=16, num_selected=8, router="topk_softmax", expert_mlp_dim=width)
        c.moe.update(dispatch="dropless", ragged_matmul=name, group_size=256)
        return frozen(c)

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 256, 256), jnp.bfloat16)
    params = MoE(config("xla"), train=False).init(jax.random.PRNGKey(1), x)
    wi_0 = params["params"]["wi_0"].value
    assert wi_0.shape == (16, 256, width)
    assert dispatch.resolve_ragged_matmul("auto", dispatch.Experts(wi_0, None, wi_0)) == kernel

    def step(name):
        module = MoE(config(name), train=False)

        def loss(p):
            y, _ = module.apply(p, x)
            return jnp.sum(y.astype(jnp.float32) ** 2), y

        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    hlo = {name: step(name).lower(params).as_text().lower() for name in (kernel, "xla")}
    assert "mosaic_gpu" in hlo[kernel] and "mosaic_gpu" not in hlo["xla"]
    (_, y_k), g_k = step(kernel)(params)
    (_, y_x), g_x = step("xla")(params)
    y_k, y_x = np.asarray(y_k, np.float32), np.asarray(y_x, np.float32)
    assert np.max(np.abs(y_k - y_x)) <= 0.02 * np.max(np.abs(y_x)) + 1e-2
    for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_x), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= 0.03 * np.max(np.abs(b)) + 1e-3


def test_a_fine_grained_width_no_kernel_takes_falls_back_or_is_refused():
    """352 (a multiple of neither kernel's tiles): 'auto' runs XLA, 'blocked' is one sentence."""
    from glam_jax.kernels import grouped_matmul as gmm
    from glam_jax.moe import dispatch

    if not gmm.available():
        pytest.skip("needs a Hopper (sm_90+) GPU for the Mosaic-GPU kernels")
    w = jnp.zeros((16, 256, 352), jnp.bfloat16)
    assert dispatch.resolve_ragged_matmul("auto", dispatch.Experts(w, None, w)) == "xla"
    with pytest.raises(ValueError, match="not multiples of 256") as err:
        dispatch.resolve_ragged_matmul("blocked", dispatch.Experts(w, None, w))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("exchange", ["all_to_all", "ragged_all_to_all"])
@pytest.mark.parametrize("skew", [False, True], ids=["random", "all_on_one_device"])
def test_expert_parallel_exchange_equals_one_device_on_gpus(exchange, skew):
    """Issue 20 on real GPUs: dropless expert parallelism over an expert axis of 2 (the padded
    and the ragged all-to-all; XLA:CPU cannot run the ragged one) equals the one-device layer,
    outputs and gradients, also when every pair goes to one device."""
    from tests.test_expert_parallel import _inputs, _layer

    if jax.device_count() < 2:
        pytest.skip("needs 2 or more GPUs")
    args = _inputs(skew)
    with jax.default_matmul_precision("highest"):  # f32 references, no TF32
        single = _layer("gspmd")(*args)
        spread = _layer(exchange, (1, 2, 1))(*args)
    for a, b in zip(jax.tree.leaves(spread), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
