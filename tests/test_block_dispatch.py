"""Dropless dispatch through a block-aligned buffer (glam_jax.kernels.block_grouped_matmul).

The Hopper kernels themselves run in tests/test_gpu.py, and the whole dispatch against a
per-token loop in tests/test_dispatch.py; here, on CPU, the layout, the row gathers and the
custom VJP around the kernels are checked with XLA stand-ins that, like the kernels, leave
the rows of unused tiles undefined (NaN here).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam_jax.kernels import block_grouped_matmul as bg
from glam_jax.moe import dispatch
from tests.test_dispatch import close, fast_jit

B = bg.BLOCK_ROWS


def test_block_layout_puts_each_expert_in_whole_tiles():
    e = 5
    rng = np.random.default_rng(0)
    expert_p = np.concatenate([np.full(B, 2), np.full(130, 4), rng.choice([0, 3], 41)])
    rng.shuffle(expert_p)  # expert 1 gets nothing, expert 2 exactly one tile
    p = expert_p.size
    lay = fast_jit(lambda x: bg.block_layout(x, e), jnp.asarray(expert_p, jnp.int32))
    counts = np.bincount(expert_p, minlength=e)
    padded = -(-counts // B) * B
    np.testing.assert_array_equal(lay.padded_sizes, padded)
    np.testing.assert_array_equal(lay.expert_start, np.cumsum(padded) - padded)
    assert int(lay.num_used_tiles) == padded.sum() // B
    assert lay.rows == bg.buffer_rows(p, e) and lay.rows % B == 0
    pair_row, row_pair = np.asarray(lay.pair_row), np.asarray(lay.row_pair)
    for ex in range(e):
        mine = np.flatnonzero(expert_p == ex)  # pairs of this expert, in token order
        start = lay.expert_start[ex]
        np.testing.assert_array_equal(pair_row[mine], start + np.arange(mine.size))
    np.testing.assert_array_equal(row_pair[pair_row], np.arange(p))
    assert (np.delete(row_pair, pair_row) == p).all()  # padding and unused rows point nowhere
    tile_owner = np.full(lay.rows // B, e)
    for ex in range(e):
        tile_owner[lay.expert_start[ex] // B : (lay.expert_start[ex] + padded[ex]) // B] = ex
    np.testing.assert_array_equal(lay.tile_expert, tile_owner)


def test_gather_rows_gradient_is_the_gradient_of_take():
    """The custom VJP (a gather and a sum through the inverse lists) equals autodiff's
    scatter-add, including duplicated rows and the zero row for index == N."""
    rng = np.random.default_rng(1)
    n, k, m = 6, 2, 3
    x = jnp.asarray(rng.normal(size=(n, m)), jnp.float32)
    rows = rng.permutation(16)[: n * k].reshape(n, k)  # token n sits in rows[n, :]
    index = np.full(16, n)
    index[rows.reshape(-1)] = np.repeat(np.arange(n), k)
    ct = jnp.asarray(rng.normal(size=(16, m)), jnp.float32)

    def ours(x):
        return jnp.sum(dispatch.gather_rows(x, jnp.asarray(index), jnp.asarray(rows)) * ct)

    def ref(x):
        y = jnp.take(x, jnp.asarray(index), axis=0, mode="fill", fill_value=0)
        return jnp.sum(y * ct)

    close(ours(x), ref(x))
    close(jax.grad(ours)(x), jax.grad(ref)(x))
    assert float(jnp.abs(jax.grad(ours)(x)).max()) > 0


def _nan_unused(y, tile_expert, num_experts):
    unused = jnp.repeat(tile_expert, B) == num_experts
    return jnp.where(unused[:, None], jnp.nan, y)


def _tile_matmul_stand_in(x, w, tile_expert, num_used_tiles, *, transpose_w=False):
    """What the kernel computes: each row tile times its expert's matrix; unused tiles NaN."""
    e = w.shape[0]
    w = jnp.swapaxes(w, 1, 2) if transpose_w else w
    w_tkn = w[jnp.minimum(tile_expert, e - 1)]
    y = jnp.einsum("tbk,tkn->tbn", x.reshape(-1, B, x.shape[1]), w_tkn).reshape(x.shape[0], -1)
    del num_used_tiles  # tile_expert == E marks the same tiles
    return _nan_unused(y, tile_expert, e)


def _glu_matmul_stand_in(x, w0, w1, tile_expert, num_used_tiles, activation):
    gate = _tile_matmul_stand_in(x, w0, tile_expert, num_used_tiles)
    up = _tile_matmul_stand_in(x, w1, tile_expert, num_used_tiles)
    return gate, up, bg.EPILOGUE_ACTIVATIONS[activation](gate) * up


def _glu_input_grad_stand_in(d_gate, d_up, w0, w1, tile_expert, num_used_tiles):
    tm = functools.partial(_tile_matmul_stand_in, transpose_w=True)
    return tm(d_gate, w0, tile_expert, num_used_tiles) + tm(d_up, w1, tile_expert, num_used_tiles)


def _weight_grad_stand_in(x, dy, expert_start, expert_blocks):
    if isinstance(dy, tuple):  # (d_gate, d_up) of a gated FFN
        return tuple(_weight_grad_stand_in(x, d, expert_start, expert_blocks) for d in dy)
    rows = jnp.arange(x.shape[0])[:, None]
    end = expert_start + expert_blocks * bg.WEIGHT_GRAD.tile_k
    owner = (rows >= expert_start[None]) & (rows < end[None])  # [R, E]
    xe = jnp.where(owner[:, :, None], x[:, None, :], 0.0)
    return jnp.einsum("rek,rn->ekn", xe, jnp.where(owner.any(1)[:, None], dy, 0.0))


@pytest.fixture
def stand_ins(monkeypatch):
    """The kernels replaced by their XLA stand-ins above."""
    monkeypatch.setattr(bg, "tile_matmul", _tile_matmul_stand_in)
    monkeypatch.setattr(bg, "glu_matmul", _glu_matmul_stand_in)
    monkeypatch.setattr(bg, "glu_input_grad", _glu_input_grad_stand_in)
    monkeypatch.setattr(bg, "expert_weight_grad", _weight_grad_stand_in)


def test_block_matmul_vjp_matches_ragged_dot(stand_ins):
    """block_matmul's custom VJP (kernels replaced by XLA stand-ins that leave NaN in unused
    tiles) gives block_matmul_xla's values and gradients, with no NaN escaping."""
    e, kdim, n = 3, 8, 5
    rng = np.random.default_rng(2)
    expert_p = jnp.asarray(np.concatenate([np.zeros(130), np.full(7, 2)]), jnp.int32)
    lay = bg.block_layout(expert_p, e)
    real = jnp.asarray(lay.row_pair < expert_p.size)[:, None]
    x = jnp.where(real, jnp.asarray(rng.normal(size=(lay.rows, kdim)), jnp.float32), 0.0)
    w = jnp.asarray(rng.normal(size=(e, kdim, n)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(lay.rows, n)), jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w, lay) * ct)

    close(bg.block_matmul(x, w, lay), bg.block_matmul_xla(x, w, lay))
    got = jax.grad(loss(bg.block_matmul), (0, 1))(x, w)
    want = jax.grad(loss(bg.block_matmul_xla), (0, 1))(x, w)
    for a, b in zip(got, want, strict=True):
        assert np.isfinite(np.asarray(a)).all()
        close(a, b, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(got[1][1]).max()) == 0.0  # expert 1 has no rows: zero gradient


@pytest.mark.parametrize("name", sorted(bg.EPILOGUE_ACTIVATIONS))
def test_epilogue_activations_equal_the_model_activations(name):
    from glam_jax.layers import activation_fn

    x = jnp.linspace(-12.0, 12.0, 4001, dtype=jnp.float32)
    close(bg.EPILOGUE_ACTIVATIONS[name](x), activation_fn(name)(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_glu_block_matmul_vjp_matches_two_ragged_dots(stand_ins, activation):
    """glu_block_matmul (one kernel for both gated matmuls, the activation in its epilogue;
    stand-ins leave NaN in unused tiles) gives act(x w0) * (x w1) through ragged_dot, and the
    same gradients for x, w0 and w1, with no NaN escaping."""
    e, kdim, h = 3, 8, bg.GLU_UNITS
    rng = np.random.default_rng(3)
    expert_p = jnp.asarray(np.concatenate([np.zeros(130), np.full(7, 2)]), jnp.int32)
    lay = bg.block_layout(expert_p, e)
    real = jnp.asarray(lay.row_pair < expert_p.size)[:, None]
    x = jnp.where(real, jnp.asarray(rng.normal(size=(lay.rows, kdim)), jnp.float32), 0.0)
    w0, w1 = (jnp.asarray(rng.normal(size=(e, kdim, h)), jnp.float32) for _ in range(2))
    used = jnp.arange(lay.rows)[:, None] < lay.num_used_tiles * B
    ct = jnp.where(used, jnp.asarray(rng.normal(size=(lay.rows, h)), jnp.float32), 0.0)

    def ours(x, w0, w1):
        h_rh = bg.glu_block_matmul(x, w0, w1, lay, activation)
        return jnp.sum(jnp.where(used, h_rh, 0.0) * ct)  # unused rows are undefined

    def ref(x, w0, w1):
        from glam_jax.layers import activation_fn

        g_rh, u_rh = bg.block_matmul_xla(x, w0, lay), bg.block_matmul_xla(x, w1, lay)
        return jnp.sum(activation_fn(activation)(g_rh) * u_rh * ct)

    close(ours(x, w0, w1), ref(x, w0, w1), rtol=1e-5, atol=1e-4)
    h_xla = bg.glu_block_matmul_xla(x, w0, w1, lay, activation)
    close(jnp.sum(h_xla * ct), ref(x, w0, w1), rtol=1e-5, atol=1e-4)
    got = jax.grad(ours, (0, 1, 2))(x, w0, w1)
    want = jax.grad(ref, (0, 1, 2))(x, w0, w1)
    for a, b in zip(got, want, strict=True):
        assert np.isfinite(np.asarray(a)).all()
        close(a, b, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(got[1][0]).max()) > 0 and float(jnp.abs(got[2][1]).max()) == 0.0


def test_fused_glu_dispatch_equals_unfused():
    """dropless_blocked_dispatch with the fused gated matmul (XLA twins) equals two matmuls
    and an activation: outputs and gradients of x and all three expert weights."""
    from tests.test_dispatch import random_choices

    g, t, k, e, m, h = 2, 80, 2, 4, 16, bg.GLU_UNITS
    rng = np.random.default_rng(9)
    w = {
        n: jnp.asarray(rng.normal(size=s) / np.sqrt(s[1]), jnp.float32)
        for n, s in (("wi_0", (e, m, h)), ("wi_1", (e, m, h)), ("wo", (e, h, m)))
    }
    idx, cw, mask = (jnp.asarray(a) for a in random_choices(5, g, t, k, e, dispatch_prob=0.7))
    x = jnp.asarray(rng.normal(size=(g, t, m)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(g, t, m)), jnp.float32)

    def loss(glu):
        def f(x, w):
            experts = dispatch.Experts(**w, activation="gelu")
            y = dispatch.dropless_blocked_dispatch(
                x, idx, cw, mask, experts, bg.block_matmul_xla, glu
            )
            return jnp.sum(y * ct)

        return jax.jit(jax.value_and_grad(f, (0, 1)))

    (v_fused, g_fused), (v_two, g_two) = loss(bg.glu_block_matmul_xla)(x, w), loss(None)(x, w)
    close(v_fused, v_two, rtol=1e-5, atol=1e-4)
    for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_two), strict=True):
        close(a, b, rtol=1e-4, atol=1e-5)


def test_blocked_choice_says_why_it_cannot_run_on_cpu():
    experts = dispatch.Experts(
        wi_0=jnp.zeros((4, 256, 512), jnp.bfloat16),
        wi_1=None,
        wo=jnp.zeros((4, 512, 256), jnp.bfloat16),
    )
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU 'blocked' may run")
    with pytest.raises(ValueError, match="moe.ragged_matmul='blocked' cannot run here: .*backend"):
        dispatch.resolve_ragged_matmul("blocked", experts)


def test_auto_prefers_blocked_then_mgpu_then_xla(monkeypatch):
    """The order 'auto' tries the grouped matmuls in, with the kernels' checks stubbed."""
    from glam_jax.kernels import grouped_matmul

    experts = dispatch.Experts(
        wi_0=jnp.zeros((4, 256, 512), jnp.bfloat16),
        wi_1=None,
        wo=jnp.zeros((4, 512, 256), jnp.bfloat16),
    )
    cases = [(None, None, "blocked"), ("no", None, "mgpu"), ("no", "no", "xla")]
    for blocked_reason, mgpu_reason, want in cases:
        monkeypatch.setattr(bg, "unsupported_reason", lambda w=None, r=blocked_reason: r)
        monkeypatch.setattr(grouped_matmul, "unsupported_reason", lambda w=None, r=mgpu_reason: r)
        assert dispatch.resolve_ragged_matmul("auto", experts) == want


def test_grouped_matmul_table_is_fixed_and_kernels_import_no_moe_code():
    """Every moe.ragged_matmul choice has its entry from the start (no registration by the
    kernels, so 'mgpu' never needs an earlier resolve call), and kernels/ imports no MoE code."""
    import ast
    import pathlib

    assert set(dispatch.GROUPED_MATMULS) == set(dispatch.RAGGED_MATMUL_CHOICES) - {"auto"}
    for path in pathlib.Path(bg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                assert not any(n.startswith("glam_jax.moe") for n in names), (path, names)
