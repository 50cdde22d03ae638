"""`glam_jax.moe.MoE` against a naive per-token numpy loop (docs/moe_reference.md 1, 2).

The reference takes the module's own parameter arrays and, per routing group: router logits
x @ W_router, softmax, top-k, capacity C = min(max(ceil(k*T/E*cf), min_capacity), T) with
per-expert counters filled by all first choices in token order and then all second choices,
and out_t = sum of kept gate * (gelu_tanh(x W0_e) * (x W1_e)) W_out_e. Random routing is off
(eval mode, or second_expert_policy='all').
"""

from __future__ import annotations

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import glam_tiny
from glam_jax.model import frozen
from glam_jax.moe import MoE
from glam_jax.moe import routers as routing
from tests.helpers import exact_moe_config

B, S, M, H, E, GROUP = 2, 32, 16, 32, 4, 32  # two routing groups of 32 tokens


def fast_jit(fn, *args):
    """jit + run with XLA's CPU backend optimisation off: the same maths, 4x faster compiles."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})(*args)


def make_config(router="gshard_top2", dispatch="einsum", k=2, **moe):
    fields = dict(
        num_experts=E,
        num_selected=k,
        router=router,
        dispatch=dispatch,
        group_size=GROUP,
        second_expert_policy="all",
        capacity_factor_train=0.5,  # C = ceil(2*32/4*0.5) = 8 with top-2
        capacity_factor_eval=0.625,  # C = 10 with top-2
    )
    return exact_moe_config(M, H, **{**fields, **moe})


def module_params(cfg, x, seed=0):
    keys = {"params": jax.random.key(seed), "routing": jax.random.key(seed + 1)}
    variables = fast_jit(lambda x: MoE(cfg, train=False).init(keys, x), x)
    return nn.meta.unbox(variables)["params"]


def apply(cfg, train, params, x, seed=0, rngs=("routing",)):
    keys = {name: jax.random.key(seed + i) for i, name in enumerate(rngs)}
    return fast_jit(lambda p: MoE(cfg, train=train).apply({"params": p}, x, rngs=keys), params)


def inputs(seed):
    return jax.random.normal(jax.random.key(seed), (B, S, M))


# ---------------------------------------------------------------------------------------------
# the naive reference
# ---------------------------------------------------------------------------------------------


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def np_expert(p, e, x_m):
    h = np_gelu_tanh(x_m @ p["wi_0"][e]) * (x_m @ p["wi_1"][e])
    return h @ p["wo"][e]


def np_choices(router, logits_t, probs_t, k):
    """(experts, gates) of one token in priority order."""
    if router == "gshard_top2":
        i1 = int(np.argmax(probs_t))
        rest = probs_t.copy()
        rest[i1] = -np.inf
        i2 = int(np.argmax(rest))
        g1, g2 = probs_t[i1], probs_t[i2]
        return [i1, i2], [g1 / (g1 + g2), g2 / (g1 + g2)]
    if router == "switch_top1":
        i1 = int(np.argmax(probs_t))
        return [i1], [probs_t[i1]]
    if router == "topk_softmax":
        top = list(np.argsort(-logits_t)[:k])
        return top, list(np_softmax(logits_t[top]))
    raise ValueError(router)


def naive_moe(params, x_btm, cfg, train):
    """Per-token loop; returns the output [B, S, M] and what the module should report."""
    moe = cfg.moe
    k, t = moe.num_selected, moe.group_size
    p = {n: np.asarray(v, np.float64) for n, v in params.items()}
    x = np.asarray(x_btm, np.float64).reshape(-1, t, M)
    g = x.shape[0]
    cf = moe.capacity_factor_train if train else moe.capacity_factor_eval
    cap = min(max(math.ceil(k * t / E * cf), moe.min_capacity), t)
    if moe.dispatch == "dropless":
        cap = t * k
    y = np.zeros_like(x)
    idx = np.zeros((g, t, k), int)
    w = np.zeros((g, t, k))
    kept = np.zeros((g, t, k), bool)
    aux, z, entropy, top1 = [], [], [], np.zeros((g, t), int)
    for gi in range(g):
        logits = x[gi] @ p["router"]
        probs = np_softmax(logits)
        for ti in range(t):
            idx[gi, ti], w[gi, ti] = np_choices(moe.router, logits[ti], probs[ti], k)
        count = np.zeros(E, int)
        for j in range(k):  # all first choices in token order, then all second choices
            for ti in range(t):
                e = idx[gi, ti, j]
                kept[gi, ti, j] = count[e] < cap
                count[e] += 1
        for ti, j in itertools.product(range(t), range(k)):
            if kept[gi, ti, j]:
                y[gi, ti] += w[gi, ti, j] * np_expert(p, idx[gi, ti, j], x[gi, ti])
        f = np.bincount(idx[gi, :, 0], minlength=E) / t
        aux.append(E * np.sum(f * probs.mean(0)))
        lse = np.log(np.exp(logits).sum(-1))
        z.append(np.mean(lse**2))
        entropy.append(-np.mean(np.sum(probs * np.log(probs), -1)))
        top1[gi] = probs.argmax(-1)
    stats = dict(
        aux_loss=np.mean(aux),
        z_loss=np.mean(z),
        dropped_fraction=(~kept).sum() / kept.size,
        expert_load=np.bincount(idx.reshape(-1), minlength=E) / idx.size,
        router_entropy=np.mean(entropy),
        top1=top1.reshape(x_btm.shape[:2]),
    )
    return y.reshape(x_btm.shape), stats, dict(idx=idx, w=w, kept=kept, capacity=cap)


def infer_kept(y_btm, params, x_btm, ref):
    """The choices a module output contains: per token, the subset of its choices that
    reproduces the output (so dropped tokens are read off the output, not the code)."""
    idx, w = ref["idx"], ref["w"]
    g, t, k = idx.shape
    p = {n: np.asarray(v, np.float64) for n, v in params.items()}
    x = np.asarray(x_btm, np.float64).reshape(g, t, M)
    y = np.asarray(y_btm, np.float64).reshape(g, t, M)
    kept = np.zeros((g, t, k), bool)
    subsets = list(itertools.product([False, True], repeat=k))
    for gi, ti in itertools.product(range(g), range(t)):
        outs = [w[gi, ti, j] * np_expert(p, idx[gi, ti, j], x[gi, ti]) for j in range(k)]
        errs = [
            np.max(np.abs(sum((o for o, s_j in zip(outs, s, strict=True) if s_j), 0.0) - y[gi, ti]))
            for s in subsets
        ]
        best = int(np.argmin(errs))
        assert errs[best] < 1e-4 and sorted(errs)[1] > 1e-3, errs  # unambiguous
        kept[gi, ti] = subsets[best]
    return kept


def close(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol, atol)


# ---------------------------------------------------------------------------------------------
# forward: output, dropped set, stats
# ---------------------------------------------------------------------------------------------

CASES = [
    ("gshard_top2", "einsum", 2, False),
    ("gshard_top2", "sort", 2, False),
    ("gshard_top2", "einsum", 2, True),
    ("gshard_top2", "sort", 2, True),
    ("gshard_top2", "dropless", 2, True),
    ("switch_top1", "einsum", 1, True),
    ("topk_softmax", "sort", 2, False),
]


@pytest.mark.parametrize(
    "router,dispatch,k,train", CASES, ids=[f"{r}-{d}-train{int(tr)}" for r, d, _, tr in CASES]
)
def test_moe_matches_naive_loop(router, dispatch, k, train):
    """Output, the set of dropped (token, choice) pairs, aux loss, z-loss, dropped_fraction,
    expert_load, top1 and router entropy equal the per-token loop (train uses the train
    capacity factor, eval the eval one; policy 'all' so no random routing)."""
    cfg = make_config(router, dispatch, k)
    x = inputs(1)
    params = module_params(cfg, x)
    y, st = apply(cfg, train, params, x)
    ref_y, ref_st, ref = naive_moe(params, x, cfg, train)
    assert float(np.std(ref_y)) > 0.1  # O(1) outputs: the tolerances are meaningful
    close(y, ref_y)
    n_drop = (~ref["kept"]).sum()
    if dispatch == "dropless":
        assert n_drop == 0
    else:
        assert 0 < n_drop < ref["kept"].size
        if k == 2:  # a dropped first choice, a second dropped behind a kept first, a kept second
            assert (~ref["kept"][..., 0]).any()
            assert (ref["kept"][..., 0] & ~ref["kept"][..., 1]).any()
            assert ref["kept"][..., 1].any()
    np.testing.assert_array_equal(infer_kept(y, params, x, ref), ref["kept"])
    close(st["dropped_fraction"], ref_st["dropped_fraction"], atol=1e-7)
    close(st["aux_loss"], ref_st["aux_loss"], atol=1e-6)
    close(st["z_loss"], ref_st["z_loss"], atol=1e-6)
    close(st["expert_load"], ref_st["expert_load"], atol=1e-7)
    close(st["router_entropy"], ref_st["router_entropy"], atol=1e-6)
    np.testing.assert_array_equal(st["top1"], ref_st["top1"])
    assert float(st["importance_loss"]) == 0.0 and float(st["load_loss"]) == 0.0


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------


def dense_reference_loss(params, x_gtm, cot_gtm, idx, kept, f_ge):
    """The same layer without dispatch: every expert on every token, then the kept choices.

    Routing decisions (idx, kept, f) come from the naive loop and are constants, as they are
    piecewise constant in the parameters.
    """
    logits = jnp.einsum("gtm,me->gte", x_gtm, params["router"])
    probs = jax.nn.softmax(logits, axis=-1)
    gates = jnp.take_along_axis(probs, idx, axis=-1)
    w = jnp.where(kept, gates / jnp.sum(gates, -1, keepdims=True), 0.0)
    pre0 = jnp.einsum("gtm,emh->gteh", x_gtm, params["wi_0"])
    c = np.sqrt(2.0 / np.pi)
    gelu = 0.5 * pre0 * (1.0 + jnp.tanh(c * (pre0 + 0.044715 * pre0**3)))
    hidden = gelu * jnp.einsum("gtm,emh->gteh", x_gtm, params["wi_1"])
    y_all = jnp.einsum("gteh,ehm->gtem", hidden, params["wo"])
    y_sel = jnp.take_along_axis(y_all, idx[..., None], axis=2)
    y = jnp.sum(w[..., None] * y_sel, axis=2)
    aux = E * jnp.mean(jnp.sum(f_ge * jnp.mean(probs, axis=1), -1))
    z = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    return jnp.sum(y * cot_gtm) + 0.01 * aux + 1e-3 * z


@pytest.mark.parametrize("dispatch", ["einsum", "sort"])
def test_moe_gradients_match_dense_reference(dispatch):
    """Gradients of output . cotangent + aux + z-loss (with drops, training, policy 'all') are
    finite and equal those of a dispatch-free dense formulation, router included."""
    cfg = make_config("gshard_top2", dispatch)
    x = inputs(2)
    cot = jax.random.normal(jax.random.key(3), x.shape)
    params = module_params(cfg, x)

    def loss(p):
        y, st = MoE(cfg, train=True).apply({"params": p}, x, rngs={"routing": jax.random.key(0)})
        return jnp.sum(y * cot) + 0.01 * st["aux_loss"] + 1e-3 * st["z_loss"]

    grads = fast_jit(jax.grad(loss), params)
    _, _, ref = naive_moe(params, x, cfg, train=True)
    assert (~ref["kept"]).any()
    f_ge = np.stack([np.bincount(i, minlength=E) / GROUP for i in ref["idx"][..., 0]])
    ref_grads = fast_jit(
        jax.grad(dense_reference_loss),
        params,
        x.reshape(-1, GROUP, M),
        cot.reshape(-1, GROUP, M),
        jnp.asarray(ref["idx"]),
        jnp.asarray(ref["kept"]),
        jnp.asarray(f_ge, jnp.float32),
    )
    for name in ("router", "wi_0", "wi_1", "wo"):
        assert np.all(np.isfinite(np.asarray(grads[name]))), name
        assert float(jnp.max(jnp.abs(grads[name]))) > 1e-3, name
        close(grads[name], ref_grads[name])


@pytest.mark.parametrize("router,k", [("switch_top1", 1), ("noisy_topk", 2), ("expert_choice", 2)])
def test_moe_gradients_finite_for_other_routers(router, k):
    """Training gradients of every parameter are finite and reach the router for the other
    routers (noisy_topk's balancing losses included)."""
    cfg = make_config(router, "einsum", k, router_jitter=0.1)
    x = inputs(4)
    params = module_params(cfg, x)

    def loss(p):
        y, st = MoE(cfg, train=True).apply({"params": p}, x, rngs={"routing": jax.random.key(0)})
        extra = st["aux_loss"] + st["z_loss"] + st["importance_loss"] + st["load_loss"]
        return jnp.sum(y**2) + extra

    grads = fast_jit(jax.grad(loss), params)
    for name, g in grads.items():
        assert np.all(np.isfinite(np.asarray(g))), name
        assert float(jnp.max(jnp.abs(g))) > 0.0, name


# ---------------------------------------------------------------------------------------------
# training-only randomness: jitter, router noise, expert dropout
# ---------------------------------------------------------------------------------------------


def test_router_jitter_changes_routing_only_in_training():
    """router_jitter=0.3: eval output and stats are exactly those without jitter; in training
    (policy 'all', so the router input is the only random thing) routing changes."""
    x = inputs(5)
    cfg0 = make_config(router_jitter=0.0, capacity_factor_train=2.0)
    cfg1 = make_config(router_jitter=0.3, capacity_factor_train=2.0)
    params = module_params(cfg0, x)
    y0, st0 = apply(cfg0, False, params, x)
    y1, st1 = apply(cfg1, False, params, x)
    np.testing.assert_array_equal(y1, y0)
    np.testing.assert_array_equal(st1["top1"], st0["top1"])
    y0, st0 = apply(cfg0, True, params, x)
    y1, st1 = apply(cfg1, True, params, x)
    assert np.any(np.asarray(st1["top1"]) != np.asarray(st0["top1"]))
    assert float(jnp.max(jnp.abs(y1 - y0))) > 1e-2
    assert float(st1["aux_loss"]) != float(st0["aux_loss"])


def test_router_jitter_is_elementwise_uniform(monkeypatch):
    """The router sees x * U(1-eps, 1+eps), drawn per element: with W_router = I (M = E) the
    logits divided by x have min/max inside [1-eps, 1+eps], mean 1 and std eps/sqrt(3)."""
    eps, m = 0.2, E
    c = glam_tiny.get_config()
    c.model.update(dtype="float32", embed_dim=m, mlp_dim=8)
    c.moe.update(num_experts=E, group_size=256, router_jitter=eps, second_expert_policy="all")
    cfg = frozen(c)
    x = jax.random.normal(jax.random.key(6), (4, 256, m))
    params = dict(module_params(cfg, x), router=jnp.eye(m))
    seen = {}
    original = routing.gshard_top2

    def spy(logits, **kwargs):
        seen["logits"] = logits
        return original(logits, **kwargs)

    monkeypatch.setattr(routing, "gshard_top2", spy)

    def router_logits(p, train):
        MoE(cfg, train=train).apply({"params": p}, x, rngs={"routing": jax.random.key(0)})
        return seen["logits"]

    u = np.asarray(fast_jit(lambda p: router_logits(p, True), params)).reshape(x.shape)
    u = u / np.asarray(x)
    n = u.size
    assert u.min() >= 1 - eps - 1e-5 and u.max() <= 1 + eps + 1e-5
    assert u.min() < 1 - 0.9 * eps and u.max() > 1 + 0.9 * eps  # fills the interval
    sd = eps / np.sqrt(3.0)
    assert abs(u.mean() - 1.0) < 3 * sd / np.sqrt(n)
    assert abs(u.std() - sd) < 3 * sd * np.sqrt(0.2 / n)  # SE of a uniform sample std
    assert np.std(u, axis=-1).min() > 0.0  # per element, not one factor per token
    clean = np.asarray(fast_jit(lambda p: router_logits(p, False), params)).reshape(x.shape)
    np.testing.assert_allclose(clean, np.asarray(x), rtol=1e-6, atol=1e-6)


def test_noisy_topk_noise_std_is_softplus_and_absent_in_eval(monkeypatch):
    """noisy_topk gets clean = x W_router and noise std softplus(x W_noise) (zero when
    moe.noisy_gating is off); in eval the output does not depend on the noise weights."""
    cfg = make_config("noisy_topk", capacity_factor_train=2.0, capacity_factor_eval=2.0)
    x = inputs(7)
    params = module_params(cfg, x)
    params["router_noise"] = jax.random.normal(jax.random.key(8), params["router_noise"].shape)
    seen = {}
    original = routing.noisy_topk

    def spy(clean, noise_std, k, **kwargs):
        seen.update(clean=clean, std=noise_std)
        return original(clean, noise_std, k, **kwargs)

    monkeypatch.setattr(routing, "noisy_topk", spy)

    def run(cfg, p, train):
        y, _ = MoE(cfg, train=train).apply({"params": p}, x, rngs={"routing": jax.random.key(0)})
        return y, seen["clean"], seen["std"]

    _, clean, std = fast_jit(lambda p: run(cfg, p, True), params)
    xg = np.asarray(x, np.float64).reshape(-1, GROUP, M)
    noise_logits = xg @ np.asarray(params["router_noise"], np.float64)
    close(clean, xg @ np.asarray(params["router"], np.float64), atol=1e-5)
    close(std, np.log1p(np.exp(noise_logits)), atol=1e-5)
    cfg_off = make_config("noisy_topk", noisy_gating=False)
    _, _, std_off = fast_jit(lambda p: run(cfg_off, p, True), params)
    assert float(jnp.max(jnp.abs(std_off))) == 0.0
    # eval: the noise weights do not matter; training: they do
    params_big = dict(params, router_noise=params["router_noise"] * 10.0)
    y_eval = [fast_jit(lambda p: run(cfg, p, False)[0], q) for q in (params, params_big)]
    np.testing.assert_array_equal(y_eval[0], y_eval[1])
    y_train = [fast_jit(lambda p: run(cfg, p, True)[0], q) for q in (params, params_big)]
    assert float(jnp.max(jnp.abs(y_train[0] - y_train[1]))) > 1e-2


def test_expert_dropout_only_in_training():
    """moe.expert_dropout: eval output equals the no-dropout output; training with a dropout
    rng changes it."""
    cfg0 = make_config(capacity_factor_train=2.0)
    cfg1 = make_config(capacity_factor_train=2.0, expert_dropout=0.4)
    x = inputs(9)
    params = module_params(cfg0, x)
    np.testing.assert_array_equal(
        apply(cfg1, False, params, x)[0], apply(cfg0, False, params, x)[0]
    )
    y0, _ = apply(cfg0, True, params, x, rngs=("routing", "dropout"))
    y1, _ = apply(cfg1, True, params, x, rngs=("routing", "dropout"))
    assert float(jnp.max(jnp.abs(y1 - y0))) > 1e-2
