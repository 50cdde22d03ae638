"""Every router of `glam_jax.moe.routers` against a numpy reference (docs/moe_reference.md 1).

The references below are written from the papers' formulas with explicit per-token loops in
float64; the library computes in float32, hence the 1e-5-ish tolerances. Logits are drawn so
that no two candidates of a selection are closer than a margin (no ties).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam_jax.moe import routers as routing

# Jitted with XLA's CPU backend optimisation off: the same maths, compiled several times faster.
FAST = {"xla_backend_optimization_level": 0}


def fast_jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=FAST, **kwargs)


gshard_top2 = fast_jit(routing.gshard_top2, static_argnames=("train", "second_expert_policy"))
switch_top1 = fast_jit(routing.switch_top1)
topk_softmax = fast_jit(routing.topk_softmax, static_argnums=1)
noisy_topk = fast_jit(routing.noisy_topk, static_argnums=2, static_argnames="train")
expert_choice = fast_jit(routing.expert_choice, static_argnums=1)
router_z_loss = fast_jit(routing.router_z_loss)
cv_squared = fast_jit(routing.cv_squared)

# ---------------------------------------------------------------------------------------------
# numpy reference
# ---------------------------------------------------------------------------------------------


def np_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    ez = np.exp(z)
    return ez / ez.sum(-1, keepdims=True)


def np_logsumexp(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]


def np_order_desc(v):
    """Indices of v from largest to smallest (a reference top-k, independent of lax.top_k)."""
    return sorted(range(len(v)), key=lambda i: -v[i])


def np_aux(probs_gte, first_gt):
    """E * sum_e f_e * P_e per group (f from first choices), averaged over groups."""
    g, t, e = probs_gte.shape
    losses = []
    for gi in range(g):
        f = np.zeros(e)
        for ti in range(t):
            f[first_gt[gi, ti]] += 1.0 / t
        p = probs_gte[gi].mean(0)
        losses.append(e * np.sum(f * p))
    return float(np.mean(losses))


def np_z_loss(logits):
    return float(np.mean(np_logsumexp(logits) ** 2))


def np_cv2(v):
    v = np.asarray(v, np.float64)
    return float(v.var() / v.mean() ** 2)


def np_norm_cdf(z):
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(z, np.float64) / math.sqrt(2.0)))


def distinct_logits(seed, shape, scale=2.0, gap=2e-3, axis=-1):
    """Random normal logits whose entries along `axis` differ pairwise by at least `gap`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=shape) * scale
    while True:
        s = np.sort(np.moveaxis(z, axis, -1), axis=-1)
        bad = np.any(np.diff(s, axis=-1) < gap, axis=-1)
        if not bad.any():
            return z.astype(np.float32)
        zm = np.moveaxis(z, axis, -1)
        zm[bad] = rng.normal(size=zm[bad].shape) * scale
        z = np.moveaxis(zm, -1, axis)


def ref_gshard(logits):
    """GShard top-2: argmax, argmax of the rest, gates g / (g1 + g2)."""
    probs = np_softmax(logits)
    g, t, _ = probs.shape
    idx = np.zeros((g, t, 2), np.int64)
    w = np.zeros((g, t, 2))
    for gi in range(g):
        for ti in range(t):
            p = probs[gi, ti]
            i1 = int(np.argmax(p))
            rest = p.copy()
            rest[i1] = -np.inf
            i2 = int(np.argmax(rest))
            idx[gi, ti] = (i1, i2)
            w[gi, ti] = (p[i1] / (p[i1] + p[i2]), p[i2] / (p[i1] + p[i2]))
    return idx, w, probs


def ref_topk_softmax(logits, k):
    """Mixtral: the k largest logits, softmax over those k."""
    g, t, _ = logits.shape
    idx = np.zeros((g, t, k), np.int64)
    w = np.zeros((g, t, k))
    for gi in range(g):
        for ti in range(t):
            top = np_order_desc(logits[gi, ti])[:k]
            idx[gi, ti] = top
            w[gi, ti] = np_softmax(logits[gi, ti][top].astype(np.float64))
    return idx, w


def kth_excluding(v, e, k):
    """k-th largest entry of v once entry e is removed (Shazeer's threshold for expert e)."""
    others = [v[j] for j in range(len(v)) if j != e]
    return sorted(others, reverse=True)[k - 1]


def ref_noisy_topk(clean, noisy, noise_std, k):
    """Shazeer 2017: selection/weights from the noisy logits; importance and load losses."""
    g, t, e = clean.shape
    idx = np.zeros((g, t, k), np.int64)
    w = np.zeros((g, t, k))
    gates = np.zeros((g, t, e))
    p_kept = np.zeros((g, t, e))
    for gi in range(g):
        for ti in range(t):
            v = noisy[gi, ti].astype(np.float64)
            top = np_order_desc(v)[:k]
            idx[gi, ti] = top
            w[gi, ti] = np_softmax(v[top])
            gates[gi, ti, top] = w[gi, ti]
            for ei in range(e):
                margin = clean[gi, ti, ei] - kth_excluding(v, ei, k)
                p_kept[gi, ti, ei] = np_norm_cdf(margin / noise_std[gi, ti, ei])
    importance = np_cv2(gates.sum((0, 1)))
    load = np_cv2(p_kept.sum((0, 1)))
    return idx, w, importance, load


def close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol, atol)


# ---------------------------------------------------------------------------------------------
# token-choice routers: exact comparison
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train,policy", [(False, "random"), (True, "all"), (False, "all")])
def test_gshard_top2_matches_reference(train, policy):
    """GShard top-2 (random routing off): experts, g/(g1+g2) weights, mask, aux and z-loss."""
    logits = distinct_logits(0, (3, 40, 8))
    r = gshard_top2(
        jnp.asarray(logits), rng=jax.random.key(0), train=train, second_expert_policy=policy
    )
    idx, w, probs = ref_gshard(logits)
    np.testing.assert_array_equal(r.expert_index, idx)
    close(r.combine_weights, w)
    assert np.all(np.asarray(r.dispatch_mask))
    close(r.probs, probs)
    close(r.aux_loss, np_aux(probs, idx[..., 0]))
    close(r.z_loss, np_z_loss(logits))
    assert float(r.importance_loss) == 0.0 and float(r.load_loss) == 0.0


def test_gshard_rejects_unknown_policy():
    """An invalid second_expert_policy is a ValueError naming the valid ones."""
    with pytest.raises(ValueError, match="random, all"):
        gshard_top2(jnp.zeros((1, 4, 4)), rng=None, train=True, second_expert_policy="sometimes")


def test_switch_top1_matches_reference():
    """Switch: argmax expert; combine weight is the gate probability g1 (not 1)."""
    logits = distinct_logits(1, (2, 50, 8))
    r = switch_top1(jnp.asarray(logits))
    probs = np_softmax(logits)
    first = np.array([[np_order_desc(row)[0] for row in grp] for grp in logits])
    np.testing.assert_array_equal(r.expert_index[..., 0], first)
    close(r.combine_weights[..., 0], np.take_along_axis(probs, first[..., None], -1)[..., 0])
    assert r.expert_index.shape == (2, 50, 1) and np.all(np.asarray(r.dispatch_mask))
    close(r.aux_loss, np_aux(probs, first))
    close(r.z_loss, np_z_loss(logits))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_softmax_matches_reference(k):
    """Mixtral top-k: the k largest logits in order, softmax over only those k."""
    logits = distinct_logits(2, (2, 30, 8))
    r = topk_softmax(jnp.asarray(logits), k)
    idx, w = ref_topk_softmax(logits, k)
    np.testing.assert_array_equal(r.expert_index, idx)
    close(r.combine_weights, w)
    close(np.sum(r.combine_weights, -1), 1.0)
    close(r.aux_loss, np_aux(np_softmax(logits), idx[..., 0]))
    close(r.z_loss, np_z_loss(logits))


@pytest.mark.parametrize("k", [1, 2])
def test_noisy_topk_eval_matches_reference(k):
    """Shazeer eval (no noise): top-k of the clean logits, importance CV^2 and Phi-load CV^2."""
    clean = distinct_logits(3, (2, 24, 6), scale=1.0)
    std = np.log1p(np.exp(np.random.default_rng(4).normal(size=clean.shape))).astype(np.float32)
    r = noisy_topk(jnp.asarray(clean), jnp.asarray(std), k, rng=None, train=False)
    idx, w, importance, load = ref_noisy_topk(clean, clean, std, k)
    np.testing.assert_array_equal(r.expert_index, idx)
    close(r.combine_weights, w)
    close(r.importance_loss, importance)
    close(r.load_loss, load, rtol=1e-4)
    close(r.aux_loss, np_aux(np_softmax(clean), idx[..., 0]))
    close(r.z_loss, np_z_loss(clean))


def test_noisy_topk_train_matches_reference_given_the_noise():
    """Shazeer training: with the same N(0,1) draw, selection and losses use noisy logits.

    The reference reproduces the library's draw (`jax.random.normal(rng, shape)`) and then
    recomputes top-k, weights, importance and the load loss Phi((clean - kth_excl(noisy)) / std).
    """
    k, key = 2, jax.random.key(7)
    clean = distinct_logits(5, (2, 24, 6), scale=1.0)
    std = np.log1p(np.exp(np.random.default_rng(6).normal(size=clean.shape))).astype(np.float32)
    draw = fast_jit(lambda c, s, key: c + jax.random.normal(key, c.shape) * s)
    noisy = np.asarray(draw(jnp.asarray(clean), jnp.asarray(std), key), np.float64)
    gaps = np.diff(np.sort(noisy, -1), axis=-1)
    assert gaps.min() > 1e-4  # no ties in the noisy logits for this seed
    r = noisy_topk(jnp.asarray(clean), jnp.asarray(std), k, rng=key, train=True)
    idx, w, importance, load = ref_noisy_topk(clean, noisy, std, k)
    np.testing.assert_array_equal(r.expert_index, idx)
    close(r.combine_weights, w)
    close(r.importance_loss, importance)
    close(r.load_loss, load, rtol=1e-4)
    # the noise changed the routing of some tokens compared with the clean logits
    assert np.any(np.asarray(r.expert_index) != ref_topk_softmax(clean, k)[0])


def test_noisy_topk_noise_std_and_absent_in_eval():
    """Noise added to logit e has std noise_std_e (measured on 4096 tokens) and is off in eval.

    Experts 0..2 have clean logit 0, expert 3 is never in the top 3; with k=3 the combine
    weights are a softmax over experts 0..2, so log(w_e / w_0) = noise_e - noise_0 exactly.
    Expert 0 has std 0, so the log-ratio of expert e is N(0, std_e^2).
    """
    n, k = 4096, 3
    stds = np.array([0.0, 0.5, 1.5, 0.0], np.float32)
    clean = np.zeros((1, n, 4), np.float32)
    clean[..., 3] = -1e4
    std = np.broadcast_to(stds, clean.shape).copy()
    r = noisy_topk(jnp.asarray(clean), jnp.asarray(std), k, rng=jax.random.key(11), train=True)
    idx = np.asarray(r.expert_index)
    w = np.asarray(r.combine_weights, np.float64)
    assert np.all(np.sort(idx, -1) == [0, 1, 2])
    w_e = np.zeros((n, 4))
    np.put_along_axis(w_e, idx[0], w[0], axis=-1)
    for e in (1, 2):
        d = np.log(w_e[:, e] / w_e[:, 0])
        se_mean, se_std = stds[e] / np.sqrt(n), stds[e] / np.sqrt(2 * n)
        assert abs(d.mean()) < 3 * se_mean
        assert abs(d.std() - stds[e]) < 3 * se_std
    # the two experts' noises are independent
    d1, d2 = np.log(w_e[:, 1] / w_e[:, 0]), np.log(w_e[:, 2] / w_e[:, 0])
    assert abs(np.corrcoef(d1, d2)[0, 1]) < 3 / np.sqrt(n)
    # eval: no noise, the weights are exactly the clean softmax (1/3 each)
    r_eval = noisy_topk(jnp.asarray(clean), jnp.asarray(std), k, rng=None, train=False)
    close(r_eval.combine_weights, np.full((1, n, 3), 1 / 3))


# ---------------------------------------------------------------------------------------------
# GShard random routing (statistical)
# ---------------------------------------------------------------------------------------------


def test_gshard_random_second_expert_rate():
    """Training with policy 'random': expert 2 is dispatched with probability min(1, 2*g2).

    Four blocks of 4000 tokens have normalised second gates g2 = 0.05, 0.15, 0.3, 0.45; the
    observed dispatch rate of each block is within 3 standard errors of 2*g2. Undispatched
    second choices have combine weight 0, the first weight stays g1/(g1+g2).
    """
    n, g2s = 4000, np.array([0.05, 0.15, 0.3, 0.45])
    logits = np.full((len(g2s), n, 4), -20.0, np.float32)
    logits[..., 1] = np.log(1 - g2s)[:, None]
    logits[..., 2] = np.log(g2s)[:, None]
    r = gshard_top2(
        jnp.asarray(logits), rng=jax.random.key(3), train=True, second_expert_policy="random"
    )
    np.testing.assert_array_equal(r.expert_index[..., 0], 1)
    np.testing.assert_array_equal(r.expert_index[..., 1], 2)
    mask = np.asarray(r.dispatch_mask)
    assert mask[..., 0].all()
    rate = mask[..., 1].mean(1)
    p = np.minimum(1.0, 2 * g2s)
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(rate - p) < 3 * se), (rate, p)
    w = np.asarray(r.combine_weights)
    close(w[..., 0], np.broadcast_to((1 - g2s)[:, None], (len(g2s), n)), atol=1e-5)
    close(w[..., 1], np.where(mask[..., 1], g2s[:, None], 0.0), atol=1e-5)
    # another key gives another (equally distributed) draw
    r2 = gshard_top2(
        jnp.asarray(logits), rng=jax.random.key(4), train=True, second_expert_policy="random"
    )
    assert np.any(np.asarray(r2.dispatch_mask) != mask)


def test_gshard_random_routing_is_off_in_eval_and_with_policy_all():
    """Eval (any policy) and training with policy 'all' always dispatch the second expert."""
    logits = jnp.asarray(distinct_logits(8, (2, 64, 8)))
    for train, policy in [(False, "random"), (True, "all")]:
        r = gshard_top2(logits, rng=jax.random.key(0), train=train, second_expert_policy=policy)
        assert np.all(np.asarray(r.dispatch_mask))


# ---------------------------------------------------------------------------------------------
# expert choice
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [5, 100])
def test_expert_choice_matches_reference(capacity):
    """Expert choice: each expert takes its top-C tokens by router prob (C capped at T)."""
    g, t, e = 2, 20, 4
    probs = None
    for seed in range(9, 40):  # logits whose probs have no near-ties along the token axis
        logits = distinct_logits(seed, (g, t, e))
        probs = np_softmax(logits)
        if np.diff(np.sort(probs, axis=1), axis=1).min() > 1e-5:
            break
    r = expert_choice(jnp.asarray(logits), capacity)
    c = min(capacity, t)
    assert r.token_index.shape == (g, e, c)
    for gi in range(g):
        for ei in range(e):
            top = np_order_desc(probs[gi, :, ei])[:c]
            np.testing.assert_array_equal(r.token_index[gi, ei], top)
            close(r.combine_weights[gi, ei], probs[gi, top, ei])
    close(r.probs, probs)
    close(r.aux_loss, np_aux(probs, probs.argmax(-1)))
    close(r.z_loss, np_z_loss(logits))


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------


def _all_routers(logits):
    lj = jnp.asarray(logits)
    e = logits.shape[-1]
    return {
        "gshard_top2": gshard_top2(lj, rng=None, train=False, second_expert_policy="random"),
        "switch_top1": switch_top1(lj),
        "topk_softmax": topk_softmax(lj, 2),
        "noisy_topk": noisy_topk(lj, jnp.ones_like(lj), 2, rng=None, train=False),
        "expert_choice": expert_choice(lj, logits.shape[1] * 2 // e),
    }


def test_aux_loss_is_one_under_uniform_routing_and_larger_otherwise():
    """Aux loss = 1 (+-1e-6) when f_e = P_e = 1/E for every router; > 1 for skewed routing."""
    g, t, e = 2, 32, 8
    # token t prefers expert t % E by the same margin: f_e = 1/E and, by symmetry, P_e = 1/E
    uniform = np.broadcast_to(3.0 * np.eye(e, dtype=np.float32)[np.arange(t) % e], (g, t, e))
    for name, r in _all_routers(uniform).items():
        assert abs(float(r.aux_loss) - 1.0) < 1e-6, name
    # all-equal logits: P_e = 1/E, so the loss is 1 whatever the tie-break of f
    for name, r in _all_routers(np.zeros((g, t, e), np.float32)).items():
        assert abs(float(r.aux_loss) - 1.0) < 1e-6, name
    # skewed: every token prefers expert 0; half the experts get all tokens; a biased router
    rng = np.random.default_rng(0)
    skewed = [
        np.where(np.arange(e) == 0, 2.0, 0.0) + rng.normal(size=(g, t, e)) * 0.3,
        np.broadcast_to(3.0 * np.eye(e)[np.arange(t) % (e // 2)], (g, t, e)),
        rng.normal(size=(g, t, e)) + np.linspace(0.0, 2.0, e),
    ]
    for logits in skewed:
        logits = logits.astype(np.float32)
        for name, r in _all_routers(logits).items():
            assert float(r.aux_loss) > 1.0 + 1e-3, name
            close(r.aux_loss, np_aux(np_softmax(logits), np_softmax(logits).argmax(-1)))


def test_aux_loss_gradient_treats_f_as_constant():
    """d aux / d logits = E/(G T) * p_j * (f_j - sum_e f_e p_e): only P carries gradient."""
    logits = distinct_logits(12, (2, 16, 4))
    g, t, e = logits.shape

    def aux(z):
        return routing.gshard_top2(z, rng=None, train=False, second_expert_policy="all").aux_loss

    grad = np.asarray(fast_jit(jax.grad(aux))(jnp.asarray(logits)), np.float64)
    probs = np_softmax(logits)
    f = np.stack([np.bincount(probs[gi].argmax(-1), minlength=e) / t for gi in range(g)])
    expected = (
        e / (g * t) * probs * (f[:, None, :] - np.sum(f[:, None, :] * probs, -1, keepdims=True))
    )
    close(grad, expected, atol=1e-7)


@pytest.mark.parametrize("scale", [1.0, 60.0])
def test_z_loss_matches_mean_logsumexp_squared(scale):
    """z-loss = mean over tokens of logsumexp(logits)^2, stable for large logits."""
    logits = (np.random.default_rng(13).normal(size=(3, 17, 8)) * scale).astype(np.float32)
    close(router_z_loss(jnp.asarray(logits)), np_z_loss(logits))
    close(router_z_loss(jnp.zeros((1, 5, 8))), np.log(8.0) ** 2)


def test_cv_squared():
    """CV^2 = population variance / mean^2; 0 for a constant vector."""
    v = np.array([1.0, 2.0, 3.0, 6.0])
    close(cv_squared(jnp.asarray(v, jnp.float32)), np_cv2(v))
    close(cv_squared(jnp.full((4,), 3.0)), 0.0)
