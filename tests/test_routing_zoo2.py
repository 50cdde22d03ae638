"""Routing zoo II, router side: scores, group-limited routing, the sampled second expert and
gate normalisation after capacity, each against numpy written from the papers' formulas.

References: OLMoE / Qwen-MoE (softmax, then top-k, norm_topk_prob on or off), DeepSeek-V3
(sigmoid scores, bias for the choice only, groups ranked by the sum of their top 2, gates
normalised then scaled, sequence-wise balance loss, eq. 17-20), Praxis top2_gating_on_logits
('sampling' second expert; legacy_mtf_behavior=False renormalises the gates after capacity).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam_jax.config_checks import ConfigError, check_run
from glam_jax.moe import capacity as capacity_lib
from glam_jax.moe import dispatch
from glam_jax.moe import routers as routing
from tests.helpers import tiny_config
from tests.test_dispatch import (
    init_params,
    inputs,
    loss_fn,
    make_config,
    np_all_experts,
    np_capacity_loop,
    np_combine,
    random_experts,
)
from tests.test_routing import (
    close,
    distinct_logits,
    fast_jit,
    np_aux,
    np_order_desc,
    np_softmax,
    np_z_loss,
)

TOPK_ARGS = (
    "k",
    "score",
    "norm_topk_prob",
    "routed_scaling_factor",
    "num_groups",
    "topk_groups",
    "group_score",
    "sequence_length",
)
topk = fast_jit(routing.topk, static_argnums=1, static_argnames=TOPK_ARGS[1:])
gshard_top2 = fast_jit(routing.gshard_top2, static_argnames=("train", "second_expert_policy"))


def np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def ref_topk(logits, k, score, norm, scale, bias=None, ng=1, tg=1, group_score="max"):
    """Per token: s = softmax|sigmoid(z); choose by s + b within the best groups; gates s."""
    z = np.asarray(logits, np.float64)
    s_all = np_softmax(z) if score == "softmax" else np_sigmoid(z)
    g, t, e = z.shape
    idx = np.zeros((g, t, k), np.int64)
    w = np.zeros((g, t, k))
    for gi in range(g):
        for ti in range(t):
            s = s_all[gi, ti]
            choice = s + (0.0 if bias is None else np.asarray(bias, np.float64))
            allowed = list(range(e))
            if ng > 1:
                per = e // ng
                members = [list(range(n * per, (n + 1) * per)) for n in range(ng)]
                if group_score == "max":
                    rank = [max(choice[m]) for m in members]
                else:
                    rank = [sum(sorted(choice[m], reverse=True)[:2]) for m in members]
                keep = np_order_desc(rank)[:tg]
                allowed = [x for n in keep for x in members[n]]
            top = [allowed[i] for i in np_order_desc([choice[a] for a in allowed])[:k]]
            gates = s[top]
            if norm:
                gates = gates / gates.sum()
            idx[gi, ti] = top
            w[gi, ti] = gates * scale
    probs = s_all / s_all.sum(-1, keepdims=True)
    return idx, w, probs


def ref_sequence_loss(probs, idx, seq_len):
    """DeepSeek-V3 eq. 17-20: per sequence sum_i f_i P_i, f_i = E/(k T) #chosen, P_i mean s'."""
    e, k = probs.shape[-1], idx.shape[-1]
    p = probs.reshape(-1, seq_len, e)
    chosen = idx.reshape(-1, seq_len, k)
    losses = []
    for b in range(p.shape[0]):
        f = np.zeros(e)
        for ti in range(seq_len):
            for j in range(k):
                f[chosen[b, ti, j]] += e / (k * seq_len)
        losses.append(np.sum(f * p[b].mean(0)))
    return float(np.mean(losses))


# ---------------------------------------------------------------------------------------------
# topk: softmax / sigmoid scores, norm_topk_prob, routed_scaling_factor, choice-only bias
# ---------------------------------------------------------------------------------------------

TOPK_CASES = [  # (score, norm_topk_prob, routed_scaling_factor, bias): OLMoE, Qwen3, DeepSeek
    ("softmax", False, 1.0, False),
    ("softmax", True, 1.0, False),
    ("sigmoid", True, 2.5, False),
    ("sigmoid", False, 1.0, True),
    ("softmax", True, 1.0, True),
]


@pytest.mark.parametrize("score,norm,scale,use_bias", TOPK_CASES)
def test_topk_matches_reference(score, norm, scale, use_bias):
    """Chosen experts, gates, probs and every loss equal the numpy per-token reference."""
    g, t, e, k = 2, 16, 8, 3
    logits = distinct_logits(20, (g, t, e))
    bias = (np.random.default_rng(21).normal(size=e) * 0.3).astype(np.float32)
    b = bias if use_bias else None
    r = topk(
        jnp.asarray(logits),
        k,
        score=score,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
        choice_bias_e=None if b is None else jnp.asarray(b),
        sequence_length=8,
    )
    idx, w, probs = ref_topk(logits, k, score, norm, scale, b)
    np.testing.assert_array_equal(r.expert_index, idx)
    close(r.combine_weights, w)
    close(r.probs, probs)
    assert np.all(np.asarray(r.dispatch_mask))
    close(r.aux_loss, np_aux(probs, idx[..., 0]))
    close(r.z_loss, np_z_loss(logits))
    close(r.sequence_aux_loss, ref_sequence_loss(probs, idx, 8))
    if use_bias:  # the bias changed some choices, the gates still read unbiased scores
        assert np.any(idx != ref_topk(logits, k, score, norm, scale)[0])


def test_softmax_topk_with_norm_is_mixtral_topk_softmax():
    """softmax, top-k, renormalise == softmax over the k largest logits (Mixtral)."""
    logits = jnp.asarray(distinct_logits(22, (2, 24, 8)))
    a = topk(logits, 2, score="softmax", norm_topk_prob=True)
    b = fast_jit(routing.topk_softmax, static_argnums=1)(logits, 2)
    np.testing.assert_array_equal(a.expert_index, b.expert_index)
    close(a.combine_weights, b.combine_weights)


@pytest.mark.parametrize("score,norm,scale,use_bias", TOPK_CASES[1:4])
def test_topk_gradients_match_finite_differences(score, norm, scale, use_bias):
    """d/dlogits of sum(c * gates) + sequence loss: jax.grad equals central differences of
    the float64 reference (the choice is locally constant: no ties)."""
    g, t, e, k = 1, 6, 6, 2
    logits = distinct_logits(23, (g, t, e), scale=1.0, gap=5e-2)
    bias = (np.random.default_rng(24).normal(size=e) * 0.2) if use_bias else None
    cot = np.random.default_rng(25).normal(size=(g, t, k))

    def f_jax(z):
        r = routing.topk(
            z,
            k,
            score=score,
            norm_topk_prob=norm,
            routed_scaling_factor=scale,
            choice_bias_e=None if bias is None else jnp.asarray(bias, jnp.float32),
            sequence_length=3,
        )
        return jnp.sum(r.combine_weights * cot) + r.sequence_aux_loss

    def f_ref(z):
        idx, w, probs = ref_topk(z, k, score, norm, scale, bias)
        return np.sum(w * cot) + ref_sequence_loss(probs, idx, 3)

    grad = np.asarray(fast_jit(jax.grad(f_jax))(jnp.asarray(logits)), np.float64)
    fd = np.zeros_like(grad)
    eps = 1e-5
    for i in np.ndindex(logits.shape):
        zp, zm = logits.astype(np.float64), logits.astype(np.float64)
        zp[i] += eps
        zm[i] -= eps
        fd[i] = (f_ref(zp) - f_ref(zm)) / (2 * eps)
    close(grad, fd, rtol=1e-4, atol=1e-5)
    assert np.abs(fd).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# group-limited routing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "score,group_score,use_bias,ng,tg,k",
    [
        ("sigmoid", "top2_sum", True, 4, 2, 4),  # DeepSeek-V3 style
        ("softmax", "max", False, 4, 1, 2),  # DeepSeek-V2 device-limited style
        ("sigmoid", "max", False, 2, 1, 3),
    ],
)
def test_group_topk_matches_reference(score, group_score, use_bias, ng, tg, k):
    """Experts and gates equal the reference: rank groups, keep the best, top-k inside."""
    g, t, e = 2, 20, 16
    logits = distinct_logits(30, (g, t, e))
    bias = (np.random.default_rng(31).normal(size=e) * 0.2).astype(np.float32)
    b = bias if use_bias else None
    r = topk(
        jnp.asarray(logits),
        k,
        score=score,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        choice_bias_e=None if b is None else jnp.asarray(b),
        num_groups=ng,
        topk_groups=tg,
        group_score=group_score,
    )
    idx, w, probs = ref_topk(logits, k, score, True, 2.5, b, ng, tg, group_score)
    np.testing.assert_array_equal(r.expert_index, idx)
    close(r.combine_weights, w)
    close(r.probs, probs)
    # the group limit changed some choices compared with plain top-k
    assert np.any(idx != ref_topk(logits, k, score, True, 2.5, b)[0])


def test_group_topk_never_picks_outside_the_chosen_groups():
    """Property over random logits, biases and shapes: every chosen expert lies in one of the
    token's topk_groups best groups (ranked as the reference ranks them)."""
    rng = np.random.default_rng(40)
    for trial in range(12):
        ng = int(rng.choice([2, 4, 8]))
        per = int(rng.choice([2, 3, 4]))
        e = ng * per
        tg = int(rng.integers(1, ng + 1))
        k = int(rng.integers(1, tg * per + 1))
        group_score = ["max", "top2_sum"][trial % 2]
        logits = rng.normal(size=(2, 16, e)).astype(np.float32) * 3
        bias = (rng.normal(size=e) * 0.5).astype(np.float32)
        r = routing.topk(
            jnp.asarray(logits),
            k,
            score=["softmax", "sigmoid"][trial % 3 == 0],
            choice_bias_e=jnp.asarray(bias),
            num_groups=ng,
            topk_groups=tg,
            group_score=group_score,
        )
        scores = np.asarray(
            jax.nn.softmax(logits) if trial % 3 else jax.nn.sigmoid(logits), np.float64
        )
        grouped = (scores + bias).reshape(2, 16, ng, per)
        rank = grouped.max(-1) if group_score == "max" else np.sort(grouped, -1)[..., -2:].sum(-1)
        best = np.argsort(-rank, axis=-1)[..., :tg]
        groups_of_choice = np.asarray(r.expert_index) // per
        inside = (groups_of_choice[..., :, None] == best[..., None, :]).any(-1)
        assert inside.all(), (trial, ng, tg, k)
        assert len(set(np.asarray(r.expert_index)[0, 0])) == k  # k distinct experts


# ---------------------------------------------------------------------------------------------
# gshard_top2 second_expert_policy='sampling'
# ---------------------------------------------------------------------------------------------


def test_sampled_second_expert_follows_the_renormalised_gates():
    """Training: expert 2 ~ p_j / (1 - p_1) over j != first (Praxis Gumbel-max); each observed
    frequency is within 3 standard errors; gates are g/(g1+g2) of the drawn pair; all sent."""
    n = 20000
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = np.broadcast_to(np.log(probs), (2, n // 2, 6)).astype(np.float32)
    r = gshard_top2(
        jnp.asarray(logits), rng=jax.random.key(9), train=True, second_expert_policy="sampling"
    )
    idx = np.asarray(r.expert_index).reshape(n, 2)
    assert (idx[:, 0] == 0).all()
    want = probs[1:] / probs[1:].sum()
    freq = np.array([(idx[:, 1] == j).mean() for j in range(1, 6)])
    se = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(freq - want) < 3 * se), (freq, want)
    g2 = probs[idx[:, 1]]
    close(
        np.asarray(r.combine_weights).reshape(n, 2),
        np.stack([0.4 / (0.4 + g2), g2 / (0.4 + g2)], -1),
    )
    assert np.all(np.asarray(r.dispatch_mask))
    # evaluation: the second-best expert, as with policy 'all'
    r_eval = gshard_top2(
        jnp.asarray(logits), rng=None, train=False, second_expert_policy="sampling"
    )
    np.testing.assert_array_equal(np.asarray(r_eval.expert_index)[..., 1], 1)


# ---------------------------------------------------------------------------------------------
# gate normalisation after capacity (Praxis non-legacy)
# ---------------------------------------------------------------------------------------------


def test_after_capacity_gates_match_praxis_reference_with_drops():
    """Gates / sum of the kept gates per token (zeros where all dropped); through einsum and
    sort dispatch the layer output equals the per-token loop with those weights."""
    g, t, e, c = 2, 24, 4, 5
    logits = distinct_logits(50, (g, t, e))
    r = gshard_top2(
        jnp.asarray(logits), rng=jax.random.key(1), train=True, second_expert_policy="random"
    )
    idx, w, mask = (np.asarray(a) for a in (r.expert_index, r.combine_weights, r.dispatch_mask))
    _, kept = np_capacity_loop(idx, mask, e, c)
    assert (mask & ~kept).any() and (~mask).any()  # capacity drops and unsent second experts
    raw = np.take_along_axis(np_softmax(logits), idx, -1)  # Praxis: un-normalised gates
    ref = np.where(kept, raw, 0.0)
    denom = ref.sum(-1, keepdims=True)
    ref = ref / np.where(denom > 0, denom, 1.0)
    got = fast_jit(capacity_lib.kept_gates, static_argnums=2)(
        r.combine_weights, jnp.asarray(kept), "after_capacity"
    )
    close(got, ref)
    before = fast_jit(capacity_lib.kept_gates, static_argnums=2)(
        r.combine_weights, jnp.asarray(kept), "before_capacity"
    )
    close(before, np.where(kept, w, 0.0))
    p, experts = random_experts(0, e)
    x = np.random.default_rng(3).normal(size=(g, t, 16)).astype(np.float32)
    y_all = np_all_experts(p, x.reshape(-1, 16)).reshape(g, t, e, 16)
    want = np_combine(y_all, idx, ref, kept)
    for path in ("einsum", "sort"):
        o = dispatch.DispatchOptions(path=path, capacity=c, gate_norm="after_capacity")
        out = fast_jit(lambda xx, rr, o=o: dispatch.dispatch(xx, rr, experts, o))(jnp.asarray(x), r)
        close(out.y_gtm, want)


def test_after_capacity_on_dropless_divides_by_the_dispatched_gates():
    """Dropless drops nothing for capacity: the sum runs over the dispatched choices."""
    w = jnp.asarray([[[0.6, 0.4], [0.7, 0.3]]])
    sent = jnp.asarray([[[True, True], [True, False]]])
    close(capacity_lib.kept_gates(w, sent, "after_capacity"), [[[0.6, 0.4], [1.0, 0.0]]])


# ---------------------------------------------------------------------------------------------
# the layer with each new option: einsum, sort and dropless agree
# ---------------------------------------------------------------------------------------------

LAYER_CASES = [
    ("topk", 3, dict(router_score="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5)),
    ("topk", 2, dict(router_score="softmax", sequence_aux_loss_weight=1e-3)),
    (
        "group_topk",
        3,
        dict(router_score="sigmoid", num_groups=4, topk_groups=2, group_score="top2_sum"),
    ),
    ("gshard_top2", 2, dict(second_expert_policy="sampling")),
    ("gshard_top2", 2, dict(second_expert_policy="random", gate_norm="after_capacity")),
]


@pytest.mark.parametrize("router,k,extra", LAYER_CASES, ids=[str(c[2]) for c in LAYER_CASES])
def test_paths_agree_with_each_new_option(router, k, extra):
    """Training step through the MoE module (same rng): outputs, sequence loss and parameter
    gradients of einsum, sort and dropless agree within 1e-5; nothing dropped."""
    x, cot = inputs(0)
    cfg0 = make_config(router, "einsum", e=8, k=k, **extra)
    check_run(_as_run_config(cfg0), (1, 1, 1))  # the combination passes the start-up checks
    params = init_params(cfg0, x)
    results = {}
    for path in dispatch.DISPATCHES:
        cfg = make_config(router, path, e=8, k=k, **extra)
        (loss, (y, st)), grads = loss_fn(cfg, True, x, cot)(params)
        assert float(st["dropped_fraction"]) == 0.0
        results[path] = (y, st, grads)
    y0, st0, g0 = results["einsum"]
    assert float(jnp.std(y0)) > 0.1
    for path in ("sort", "dropless"):
        y, st, grads = results[path]
        np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(st["sequence_aux_loss"], st0["sequence_aux_loss"], rtol=1e-6)
        for name in grads:
            np.testing.assert_allclose(grads[name], g0[name], rtol=1e-5, atol=1e-5)
    if router == "topk" and "sequence_aux_loss_weight" in extra:
        assert float(st0["sequence_aux_loss"]) > 0.5  # reported (1.0 when balanced)


def _as_run_config(frozen_cfg):
    """A full mutable run config with the MoE fields of a frozen test config."""
    config = tiny_config()
    for key, value in frozen_cfg.moe.items():
        config.moe[key] = value
    return config


# ---------------------------------------------------------------------------------------------
# start-up checks: one sentence naming the bad value and what is valid
# ---------------------------------------------------------------------------------------------

BAD = [
    (
        dict(router="expert_choice", router_score="sigmoid"),
        "moe.router_score='sigmoid' is not read",
    ),
    (dict(router="gshard_top2", norm_topk_prob=True), "moe.norm_topk_prob=True is not read"),
    (
        dict(router="switch_top1", num_selected=1, routed_scaling_factor=2.5),
        "routed_scaling_factor",
    ),
    (dict(router="group_topk", num_groups=4, topk_groups=5), "moe.topk_groups=5 is larger than"),
    (dict(router="group_topk", num_groups=3, topk_groups=1), "moe.num_experts=8 is not divisible"),
    (
        dict(router="group_topk", num_groups=4, topk_groups=1, num_selected=3),
        "moe.num_selected=3 is larger than the 2 experts",
    ),
    (dict(router="topk", num_groups=2), "moe.num_groups=2 is not read by moe.router='topk'"),
    (dict(router="topk", router_score="tanh"), "moe.router_score='tanh' is not valid; valid:"),
    (dict(router="group_topk", group_score="mean"), "moe.group_score='mean' is not valid; valid:"),
    (dict(second_expert_policy="greedy"), "moe.second_expert_policy='greedy' is not valid"),
    (dict(gate_norm="late"), "moe.gate_norm='late' is not valid; valid:"),
    (dict(router="topk", routed_scaling_factor=0.0), "moe.routed_scaling_factor=0.0 must be > 0"),
    (
        dict(router="topk_softmax", second_expert_policy="sampling"),
        "moe.second_expert_policy='sampling' samples gshard_top2",
    ),
    (
        dict(router="switch_top1", num_selected=1, gate_norm="after_capacity"),
        "makes every kept gate 1",
    ),
    (dict(router="expert_choice", gate_norm="after_capacity"), "no per-token choices"),
    (dict(router="noisy_topk", expert_bias_update_rate=1e-3), "expert_bias_update_rate=0.001"),
    (dict(router="switch_top1", num_selected=1, sequence_aux_loss_weight=1e-4), "sequence_aux"),
]


@pytest.mark.parametrize("fields, words", BAD, ids=[str(f) for f, _ in BAD])
def test_bad_routing_combination_is_refused_in_one_sentence(fields, words):
    config = tiny_config()
    for key, value in fields.items():
        config.moe[key] = value
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")) as info:
        check_run(config, (1, 1, 1))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "fields",
    [
        dict(router="topk", router_score="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5),
        dict(router="group_topk", num_groups=4, topk_groups=2, group_score="top2_sum"),
        dict(router="topk", expert_bias_update_rate=1e-3, sequence_aux_loss_weight=1e-4),
        dict(router="gshard_top2", second_expert_policy="sampling", gate_norm="after_capacity"),
    ],
)
def test_valid_routing_combinations_pass(fields):
    config = tiny_config()
    for key, value in fields.items():
        config.moe[key] = value
    check_run(config, (1, 1, 1))
