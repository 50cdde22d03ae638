"""The dispatch paths of `glam_jax.moe.dispatch` compute one layer (docs/moe_reference.md 2).

Function-level tests compare each path with a per-token numpy loop (capacity in priority
order: all first choices in token order, then all second choices). Module-level tests check
that `einsum`, `sort` and `dropless` give the same outputs and parameter gradients through
`glam_jax.moe.MoE`, and that with a small capacity `einsum` and `sort` drop the same tokens.
"""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam_jax.moe import MoE, dispatch
from glam_jax.moe import capacity as capacity_lib
from glam_jax.moe import routers as routing
from tests.helpers import exact_moe_config

M, H = 16, 32  # model and expert hidden width of every test here


def np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def np_all_experts(p, x_nm):
    """Every expert applied to every row: [N, E, M] = (gelu(x W0_e) * (x W1_e)) Wout_e."""
    wi0, wi1, wo = (np.asarray(p[n], np.float64) for n in ("wi_0", "wi_1", "wo"))
    x = np.asarray(x_nm, np.float64)
    h = np_gelu_tanh(np.einsum("nm,emh->neh", x, wi0)) * np.einsum("nm,emh->neh", x, wi1)
    return np.einsum("neh,ehm->nem", h, wo)


def np_capacity_loop(idx_gtk, mask_gtk, num_experts, capacity):
    """Per group: counters per expert, first all tokens' choice 0, then choice 1, ..."""
    g, t, k = idx_gtk.shape
    pos = np.full((g, t, k), -1)
    kept = np.zeros((g, t, k), bool)
    for gi in range(g):
        count = np.zeros(num_experts, int)
        for j in range(k):
            for ti in range(t):
                if not mask_gtk[gi, ti, j]:
                    continue
                e = idx_gtk[gi, ti, j]
                pos[gi, ti, j] = count[e]
                kept[gi, ti, j] = count[e] < capacity
                count[e] += 1
    return pos, kept


def np_combine(y_gtem, idx_gtk, w_gtk, kept_gtk):
    """Output of every token: sum over kept choices of weight * expert output."""
    g, t, k = idx_gtk.shape
    out = np.zeros((g, t, y_gtem.shape[-1]))
    for gi, ti, j in itertools.product(range(g), range(t), range(k)):
        if kept_gtk[gi, ti, j]:
            out[gi, ti] += w_gtk[gi, ti, j] * y_gtem[gi, ti, idx_gtk[gi, ti, j]]
    return out


def infer_kept(y_gtm, y_gtem, idx_gtk, w_gtk):
    """Which choices a layer output actually contains: the best subset of each token's choices.

    Returns kept [G, T, k] and the largest residual of the best subsets.
    """
    g, t, k = idx_gtk.shape
    kept = np.zeros((g, t, k), bool)
    worst = 0.0
    subsets = list(itertools.product([False, True], repeat=k))
    for gi, ti in itertools.product(range(g), range(t)):
        errs = []
        for s in subsets:
            cand = sum(
                (w_gtk[gi, ti, j] * y_gtem[gi, ti, idx_gtk[gi, ti, j]] for j in range(k) if s[j]),
                np.zeros(y_gtem.shape[-1]),
            )
            errs.append(np.max(np.abs(cand - y_gtm[gi, ti])))
        best = int(np.argmin(errs))
        assert sorted(errs)[1] > 1e-3, errs  # the subsets are distinguishable
        kept[gi, ti] = subsets[best]
        worst = max(worst, errs[best])
    return kept, worst


def random_experts(seed, e, m=M, h=H):
    rng = np.random.default_rng(seed)
    p = {
        "wi_0": rng.normal(size=(e, m, h)) / np.sqrt(m),
        "wi_1": rng.normal(size=(e, m, h)) / np.sqrt(m),
        "wo": rng.normal(size=(e, h, m)) / np.sqrt(h),
    }
    p = {n: v.astype(np.float32) for n, v in p.items()}
    experts = dispatch.Experts(**{n: jnp.asarray(v) for n, v in p.items()}, activation="gelu")
    return p, experts


def random_choices(seed, g, t, k, e, dispatch_prob=1.0):
    """Distinct experts per token, random weights, and a random dispatch mask for choices > 0."""
    rng = np.random.default_rng(seed)
    idx = np.stack([[rng.permutation(e)[:k] for _ in range(t)] for _ in range(g)]).astype(np.int32)
    w = rng.uniform(0.1, 1.0, size=(g, t, k)).astype(np.float32)
    mask = rng.uniform(size=(g, t, k)) < dispatch_prob
    mask[..., 0] = True
    return idx, w, mask


def fast_jit(fn, *args):
    """jit + run with XLA's CPU backend optimisation off: the same maths, 4x faster compiles."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})(*args)


def assign_slots(idx, mask, num_experts, capacity):
    fn = lambda i, m: capacity_lib.assign_slots(i, m, num_experts, capacity)  # noqa: E731
    pos, kept = fast_jit(fn, jnp.asarray(idx), jnp.asarray(mask))
    return np.asarray(pos), np.asarray(kept)


def close(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol, atol)


# ---------------------------------------------------------------------------------------------
# capacity and slot assignment
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t,e,k,cf,convention,min_cap,expected",
    [
        (16, 4, 2, 1.0, "gshard", 4, 8),  # 2*16/4
        (16, 4, 2, 1.25, "gshard", 4, 10),  # ceil(10.0)
        (10, 4, 2, 1.0, "gshard", 1, 5),  # 2*10/4 = 5
        (10, 3, 1, 1.0, "gshard", 1, 4),  # ceil(3.33)
        (1024, 64, 2, 1.25, "gshard", 4, 40),  # GLaM: ceil(2*1024/64*1.25)
        (8, 8, 1, 1.0, "gshard", 4, 4),  # 1, raised to min_capacity
        (4, 2, 2, 2.0, "gshard", 4, 4),  # 8, capped at T
        (1024, 64, 2, 1.25, "praxis", 4, 20),  # ceil(20.0), no factor k
        (1000, 64, 2, 1.0, "praxis", 1, 16),  # ceil(15.6) = 16
        (100, 8, 2, 1.0, "praxis", 1, 16),  # ceil(12.5) = 13 -> 16
        (100, 64, 2, 2.0, "praxis", 1, 4),  # ceil(3.125) = 4
        (100, 64, 2, 0.5, "praxis", 1, 4),  # ceil(0.78) = 1 -> 4
        (6, 2, 2, 2.0, "praxis", 1, 6),  # 6 -> 8, capped at T
    ],
)
def test_expert_capacity_hand_values(t, e, k, cf, convention, min_cap, expected):
    """gshard: ceil(k*T/E*cf); praxis: ceil(T*cf/E) up to a multiple of 4; >= min, <= T."""
    assert capacity_lib.expert_capacity(t, e, k, cf, convention, min_cap) == expected


def test_expert_capacity_rejects_bad_arguments():
    """Unknown convention and non-positive capacity factor are ValueErrors."""
    with pytest.raises(ValueError, match="capacity_convention"):
        capacity_lib.expert_capacity(16, 4, 2, 1.0, "mesh")
    with pytest.raises(ValueError, match="capacity factor"):
        capacity_lib.expert_capacity(16, 4, 2, 0.0)


def test_assign_slots_priority_hand_example():
    """First choices of all tokens (token order) come before second choices; undispatched
    choices take no slot. E=3, C=2:

    token: choices (e, dispatched)   -> positions   kept
    t0:    (0, y) (1, y)             -> 0, 1        y y   e1: t2's first choice came first
    t1:    (0, y) (2, n)             -> 1, -        y n   undispatched
    t2:    (1, y) (0, y)             -> 0, 3        y n   e0 full (t0, t1, t3 before it)
    t3:    (0, y) (2, y)             -> 2, 0        n y   e2: t1's choice took no slot
    """
    idx = np.array([[[0, 1], [0, 2], [1, 0], [0, 2]]], np.int32)
    mask = np.array([[[1, 1], [1, 0], [1, 1], [1, 1]]], bool)
    pos, kept = assign_slots(idx, mask, 3, 2)
    expected_pos = np.array([[[0, 1], [1, -1], [0, 3], [2, 0]]])
    np.testing.assert_array_equal(np.where(mask, pos, -1), expected_pos)
    np.testing.assert_array_equal(kept, [[[1, 1], [1, 0], [1, 0], [0, 1]]])
    # two groups are independent: the second group sees fresh counters
    pos2, kept2 = assign_slots(np.concatenate([idx, idx]), np.concatenate([mask, mask]), 3, 2)
    np.testing.assert_array_equal(np.asarray(kept2), np.concatenate([kept, kept]))
    np.testing.assert_array_equal(np.where(mask[0], pos2[1], -1), expected_pos[0])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_assign_slots_matches_loop(k):
    """Random choices and dispatch masks: positions and kept equal the per-token loop."""
    idx, _, mask = random_choices(1, 3, 40, k, 6, dispatch_prob=0.6)
    pos, kept = assign_slots(idx, mask, 6, 7)
    ref_pos, ref_kept = np_capacity_loop(idx, mask, 6, 7)
    np.testing.assert_array_equal(np.where(mask, pos, -1), ref_pos)
    np.testing.assert_array_equal(kept, ref_kept)
    assert 0 < ref_kept.sum() < mask.sum()  # some, not all, dispatched choices dropped


# ---------------------------------------------------------------------------------------------
# dispatch functions against the loop
# ---------------------------------------------------------------------------------------------


def test_einsum_and_sort_match_loop_with_drops():
    """einsum_dispatch and sort_dispatch equal sum_j kept_j * w_j * expert_j(x) per token."""
    g, t, k, e, c = 2, 24, 2, 4, 5
    p, experts = random_experts(0, e)
    idx, w, mask = random_choices(2, g, t, k, e, dispatch_prob=0.7)
    x = np.random.default_rng(3).normal(size=(g, t, M)).astype(np.float32)
    pos, kept = assign_slots(idx, mask, e, c)
    _, ref_kept = np_capacity_loop(idx, mask, e, c)
    y_all = np_all_experts(p, x.reshape(-1, M)).reshape(g, t, e, M)
    ref = np_combine(y_all, idx, w, ref_kept)
    args = (jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), kept, pos, experts)
    for fn in (dispatch.einsum_dispatch, dispatch.sort_dispatch):
        y = fast_jit(lambda *a, fn=fn: fn(*a, c), *args)
        close(y, ref)
        got_kept, resid = infer_kept(np.asarray(y), y_all, idx, w)
        np.testing.assert_array_equal(got_kept, ref_kept)
        assert resid < 1e-4
    assert (mask & ~ref_kept).sum() > 0  # capacity dropped something


def _dropless_blocked_xla(*args):
    from glam_jax.kernels.block_grouped_matmul import block_matmul_xla

    return dispatch.dropless_blocked_dispatch(*args, block_matmul_xla)


@pytest.mark.parametrize(
    "dropless", [dispatch.dropless_dispatch, _dropless_blocked_xla], ids=["sorted", "blocked"]
)
def test_dropless_matches_loop(dropless):
    """dropless_dispatch, and its block-aligned layout (glam_jax.kernels.block_grouped_matmul,
    through XLA here): every dispatched choice counts, however unbalanced the experts."""
    g, t, k, e = 2, 80, 2, 4  # expert 3 gets more than one 128-row tile in the blocked layout
    p, experts = random_experts(4, e)
    idx, w, mask = random_choices(5, g, t, k, e, dispatch_prob=0.7)
    idx[0, :, 0] = 3  # expert 3 gets the whole first group's first choices
    idx[0, :, 1] = np.where(idx[0, :, 1] == 3, 0, idx[0, :, 1])
    x = np.random.default_rng(6).normal(size=(g, t, M)).astype(np.float32)
    y = fast_jit(
        dropless,
        jnp.asarray(x),
        jnp.asarray(idx),
        jnp.asarray(w),
        jnp.asarray(mask),
        experts,
    )
    y_all = np_all_experts(p, x.reshape(-1, M)).reshape(g, t, e, M)
    close(y, np_combine(y_all, idx, w, mask))


def test_expert_choice_einsum_and_sort_match_loop():
    """Expert choice: out_t = sum over (e, c) with token[e, c] = t of w[e, c] * expert_e(x_t)."""
    g, t, e, c = 2, 12, 4, 5
    p, experts = random_experts(7, e)
    rng = np.random.default_rng(8)
    token = np.stack([[rng.permutation(t)[:c] for _ in range(e)] for _ in range(g)])
    w = rng.uniform(0.1, 1.0, size=(g, e, c)).astype(np.float32)
    x = rng.normal(size=(g, t, M)).astype(np.float32)
    y_all = np_all_experts(p, x.reshape(-1, M)).reshape(g, t, e, M)
    ref = np.zeros((g, t, M))
    for gi, ei, ci in itertools.product(range(g), range(e), range(c)):
        ref[gi, token[gi, ei, ci]] += w[gi, ei, ci] * y_all[gi, token[gi, ei, ci], ei]
    for fn in (dispatch.expert_choice_einsum, dispatch.expert_choice_sort):
        y = fast_jit(fn, jnp.asarray(x), jnp.asarray(token, jnp.int32), jnp.asarray(w), experts)
        close(y, ref)


# ---------------------------------------------------------------------------------------------
# through the MoE module
# ---------------------------------------------------------------------------------------------


def make_config(router, dispatch_path, e=4, k=2, group_size=16, cf=100.0, **moe):
    return exact_moe_config(
        M,
        H,
        num_experts=e,
        num_selected=k,
        router=router,
        dispatch=dispatch_path,
        group_size=group_size,
        capacity_factor_train=cf,
        capacity_factor_eval=cf,
        **moe,
    )


def init_params(cfg, x, seed=0):
    """Random arrays with the module's parameter names and shapes (router noise included,
    which the module initialises at zero), scaled so that every output is O(1)."""
    params = jax.eval_shape(lambda: MoE(cfg).init({"params": jax.random.key(0)}, x))["params"]
    rng = np.random.default_rng(seed)
    out = {}
    for name, box in params.items():
        shape = nn.meta.unbox(box).shape
        scale = 1.0 / np.sqrt(shape[-2]) if name in ("router", "router_noise") else 0.3
        out[name] = jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
    return out


def loss_fn(cfg, train, x, cot, rng_seed=5):
    """Scalar loss of one MoE call (output projection + all routing losses) and its stats."""

    def f(params):
        rngs = {"routing": jax.random.key(rng_seed)}
        y, st = MoE(cfg, train=train).apply({"params": params}, x, rngs=rngs)
        aux = 0.01 * st["aux_loss"] + 1e-3 * st["z_loss"]
        aux = aux + 0.1 * (st["importance_loss"] + st["load_loss"])
        return jnp.sum(y * cot) + aux, (y, st)

    return lambda params: fast_jit(jax.value_and_grad(f, has_aux=True), params)


def inputs(seed, b=2, s=16):
    kx, kc = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (b, s, M)), jax.random.normal(kc, (b, s, M))


TOKEN_CHOICE = [
    ("gshard_top2", 2, dict(second_expert_policy="random", router_jitter=0.1)),
    ("switch_top1", 1, dict(router_jitter=0.1)),
    ("topk_softmax", 2, {}),
    ("topk_softmax", 3, {}),
    ("noisy_topk", 2, {}),
]


@pytest.mark.parametrize(
    "router,k,extra", TOKEN_CHOICE, ids=[f"{r}-k{k}" for r, k, _ in TOKEN_CHOICE]
)
def test_paths_agree_through_module_without_drops(router, k, extra):
    """Training step (random routing, jitter, noise on; same rng): einsum, sort and dropless
    give the same outputs, stats and parameter gradients within 1e-5; nothing is dropped."""
    x, cot = inputs(0)
    params = init_params(make_config(router, "einsum", k=k, **extra), x)
    results = {}
    for path in dispatch.DISPATCHES:
        cfg = make_config(router, path, k=k, **extra)
        (loss, (y, st)), grads = loss_fn(cfg, True, x, cot)(params)
        assert float(st["dropped_fraction"]) == 0.0
        results[path] = (loss, y, st, grads)
    _, y0, st0, g0 = results["einsum"]
    assert float(jnp.std(y0)) > 0.1  # outputs are O(1), not vanishing
    for path in ("sort", "dropless"):
        loss, y, st, grads = results[path]
        close(loss, results["einsum"][0])
        close(y, y0)
        for name in ("aux_loss", "z_loss", "importance_loss", "load_loss", "expert_load"):
            close(st[name], st0[name])
        assert set(grads) == set(g0)
        for name in grads:
            close(grads[name], g0[name])
            assert np.all(np.isfinite(np.asarray(grads[name])))
            assert float(jnp.max(jnp.abs(grads[name]))) > 0.0, name


def test_expert_choice_einsum_and_sort_agree_through_module():
    """Expert choice through the module: einsum and sort give the same outputs and gradients;
    dropped_fraction is the share of tokens that no expert picked (counted here)."""
    x, cot = inputs(1)
    params = init_params(make_config("expert_choice", "einsum", cf=0.5), x)
    out = {}
    for path in ("einsum", "sort"):
        cfg = make_config("expert_choice", path, cf=0.5)
        out[path] = loss_fn(cfg, True, x, cot)(params)
    (_, (y0, st0)), g0 = out["einsum"]
    (_, (y1, st1)), g1 = out["sort"]
    close(y1, y0)
    for name in g0:
        close(g1[name], g0[name])
        assert float(jnp.max(jnp.abs(g0[name]))) > 0.0, name
    # count the unpicked tokens: C = ceil(2*16/4*0.5) = 4 per expert in each group of 16
    logits = np.einsum("gtm,me->gte", np.asarray(x, np.float64).reshape(2, 16, M), params["router"])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    picked = np.zeros((2, 16), bool)
    for gi, ei in itertools.product(range(2), range(4)):
        picked[gi, np.argsort(-probs[gi, :, ei])[:4]] = True
    close(st0["dropped_fraction"], 1.0 - picked.mean(), atol=1e-7)
    close(st1["dropped_fraction"], st0["dropped_fraction"], atol=1e-7)
    assert 0.0 < float(st0["dropped_fraction"]) < 1.0


SMALL_CAPACITY = [
    ("gshard_top2", 2, False),
    ("gshard_top2", 2, True),
    ("switch_top1", 1, False),
    ("topk_softmax", 2, True),
    ("noisy_topk", 2, False),
]


@pytest.mark.parametrize(
    "router,k,train", SMALL_CAPACITY, ids=[f"{r}-train{int(tr)}" for r, _, tr in SMALL_CAPACITY]
)
def test_small_capacity_einsum_and_sort_drop_the_same_tokens(router, k, train):
    """With capacity below demand, the (token, choice) pairs missing from the einsum and sort
    outputs are the same, equal the priority-order loop, and dropped_fraction equals their
    count. Routing decisions come from the router functions (checked in test_routing.py)."""
    e, t = 4, 16
    x, _ = inputs(2)
    extra = dict(second_expert_policy="all") if router == "gshard_top2" else {}
    cf = 0.75 if k == 2 else 0.6  # C = ceil(k*16/4*cf) = 6 (k=2) or 4 (min_capacity, k=1)
    cfg0 = make_config(router, "einsum", k=k, cf=cf, **extra)
    params = init_params(cfg0, x)
    cap = capacity_lib.expert_capacity(t, e, k, cf, "gshard", 4)
    # routing decisions of the router on the module's logits (random routing/noise are off)
    logits = jnp.einsum("gtm,me->gte", x.reshape(2, t, M), params["router"])
    route = {
        "gshard_top2": lambda z: routing.gshard_top2(
            z, rng=None, train=False, second_expert_policy="all"
        ),
        "switch_top1": routing.switch_top1,
        "topk_softmax": lambda z: routing.topk_softmax(z, k),
        "noisy_topk": lambda z: routing.noisy_topk(z, jnp.ones_like(z), k, rng=None, train=False),
    }[router]
    r = fast_jit(route, logits)
    idx, w = np.asarray(r.expert_index), np.asarray(r.combine_weights, np.float64)
    _, ref_kept = np_capacity_loop(idx, np.ones(idx.shape, bool), e, cap)
    y_all = np_all_experts(params, np.asarray(x).reshape(-1, M)).reshape(2, t, e, M)
    kept_by_path = {}
    for path in ("einsum", "sort"):
        cfg = make_config(router, path, k=k, cf=cf, **extra)
        y, st = fast_jit(
            lambda p, cfg=cfg: MoE(cfg, train=train).apply(
                {"params": p}, x, rngs={"routing": jax.random.key(0)}
            ),
            params,
        )
        y = np.asarray(y, np.float64).reshape(2, t, M)
        close(y, np_combine(y_all, idx, w, ref_kept))
        kept_by_path[path], resid = infer_kept(y, y_all, idx, w)
        assert resid < 1e-4
        n_dropped = idx.size - kept_by_path[path].sum()
        close(st["dropped_fraction"], n_dropped / idx.size, atol=1e-7)
    np.testing.assert_array_equal(kept_by_path["einsum"], kept_by_path["sort"])
    np.testing.assert_array_equal(kept_by_path["einsum"], ref_kept)
    assert 0 < (~ref_kept).sum() < ref_kept.size // 2


def test_dropless_never_drops_with_small_capacity():
    """dropless ignores capacity: dropped_fraction is 0 where einsum drops tokens."""
    x, cot = inputs(3)
    cfg_e = make_config("gshard_top2", "einsum", cf=0.5, second_expert_policy="all")
    cfg_d = make_config("gshard_top2", "dropless", cf=0.5, second_expert_policy="all")
    params = init_params(cfg_e, x)
    (_, (_, st_e)), _ = loss_fn(cfg_e, True, x, cot)(params)
    (_, (_, st_d)), _ = loss_fn(cfg_d, True, x, cot)(params)
    assert float(st_e["dropped_fraction"]) > 0.0
    assert float(st_d["dropped_fraction"]) == 0.0


def test_grouped_matmul_choice_falls_back_to_xla_where_the_kernel_cannot_run():
    """'auto' picks XLA on CPU (and for float32 or odd widths); 'mgpu' explains why not."""
    import jax.numpy as jnp

    experts = dispatch.Experts(
        wi_0=jnp.zeros((4, 16, 32)), wi_1=None, wo=jnp.zeros((4, 32, 16)), activation="gelu"
    )
    assert dispatch.resolve_ragged_matmul("auto", experts) == "xla"
    assert dispatch.resolve_ragged_matmul("xla", experts) == "xla"
    with pytest.raises(ValueError, match="moe.ragged_matmul='mgpu' cannot run here"):
        dispatch.resolve_ragged_matmul("mgpu", experts)
    with pytest.raises(ValueError, match="'cublas' is not valid"):
        dispatch.resolve_ragged_matmul("cublas", experts)
