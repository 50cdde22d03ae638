"""Routers of the MoE literature as pure functions of float32 router logits, and their registry.

Token-choice routers return a `Routing`: for each token, k expert choices in priority order
with their combine weights and whether each is dispatched at all (GShard's random second
expert). Capacity is *not* applied here: `glam_jax.moe.capacity` does that, once, for every
path. Expert choice (each expert picks tokens) returns an `ExpertChoiceRouting` instead.

`ROUTERS` maps each `moe.router` name to a `RouterSpec`; the MoE layer, the config checks,
decoding and the tests all read it, so a new router is one function and one entry.

Shapes: G routing groups, T tokens per group, E experts, k choices per token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.scipy.stats import norm

from glam_jax.moe.capacity import MoEError

# gshard_top2's second expert: 'random' dispatches it with prob min(1, 2*g2) (GShard), 'all'
# always sends it, 'sampling' draws it in training from the other experts in proportion to
# their gates (Praxis, Gumbel-max).
SECOND_EXPERT_POLICIES = ("random", "all", "sampling")
ROUTER_SCORES = ("softmax", "sigmoid")  # moe.router_score: how topk/group_topk score experts
GROUP_SCORES = ("max", "top2_sum")  # moe.group_score: a group's rank (DeepSeek-V2 / V3)


@struct.dataclass
class Routing:
    """Token-choice routing decisions for one MoE layer (before capacity)."""

    expert_index: jax.Array  # [G, T, k] int32, choice 0 has priority over choice 1, ...
    combine_weights: jax.Array  # [G, T, k] float32, 0 where a choice is not dispatched
    dispatch_mask: jax.Array  # [G, T, k] bool, choice is sent to its expert (before capacity)
    probs: jax.Array  # [G, T, E] float32 router probabilities, for losses and metrics
    aux_loss: jax.Array  # scalar GShard/Switch load-balancing loss, 1.0 when balanced
    z_loss: jax.Array  # scalar ST-MoE router z-loss
    importance_loss: jax.Array  # scalar Shazeer CV(importance)^2 (0 for other routers)
    load_loss: jax.Array  # scalar Shazeer CV(load)^2 (0 for other routers)
    # scalar DeepSeek-V3 sequence-wise balance loss (topk/group_topk; 0 for other routers)
    sequence_aux_loss: jax.Array = struct.field(default_factory=lambda: jnp.zeros((), jnp.float32))


@struct.dataclass
class ExpertChoiceRouting:
    """Expert-choice routing: each expert's chosen tokens and their weights."""

    token_index: jax.Array  # [G, E, C] int32, token picked for each expert slot
    combine_weights: jax.Array  # [G, E, C] float32
    probs: jax.Array  # [G, T, E] float32
    aux_loss: jax.Array  # scalar (reported; balanced by construction)
    z_loss: jax.Array  # scalar
    importance_loss: jax.Array  # scalar, always 0 (Shazeer's losses are for noisy_topk)
    load_loss: jax.Array  # scalar, always 0
    sequence_aux_loss: jax.Array = struct.field(default_factory=lambda: jnp.zeros((), jnp.float32))


def load_balancing_loss(probs_gte: jax.Array, first_choice_gt: jax.Array) -> jax.Array:
    """GShard/Switch aux loss E * sum_e f_e * P_e per group, averaged over groups.

    f_e: fraction of tokens whose first choice is e (no gradient); P_e: mean router prob.
    Equals 1.0 when routing is perfectly uniform.
    """
    num_experts = probs_gte.shape[-1]
    f_ge = jnp.mean(jax.nn.one_hot(first_choice_gt, num_experts, dtype=jnp.float32), axis=1)
    p_ge = jnp.mean(probs_gte, axis=1)
    return jnp.mean(jnp.sum(jax.lax.stop_gradient(f_ge) * p_ge, axis=-1)) * num_experts


def router_z_loss(logits_gte: jax.Array) -> jax.Array:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2 (keeps router logits small)."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_gte, axis=-1)))


def _gather_e(x_gte: jax.Array, idx_gtk: jax.Array) -> jax.Array:
    """x[g, t, idx[g, t, j]] -> [G, T, k]."""
    return jnp.take_along_axis(x_gte, idx_gtk, axis=-1)


def _common(logits_gte, probs_gte, first_gt):
    """The probabilities and losses every token-choice router reports the same way."""
    return dict(
        probs=probs_gte,
        aux_loss=load_balancing_loss(probs_gte, first_gt),
        z_loss=router_z_loss(logits_gte),
        importance_loss=jnp.zeros((), jnp.float32),
        load_loss=jnp.zeros((), jnp.float32),
    )


def gshard_top2(
    logits_gte: jax.Array, *, rng: jax.Array | None, train: bool, second_expert_policy: str
) -> Routing:
    """GShard top-2: argmax, then argmax of the rest; gates renormalised by g1 + g2.

    In training with policy 'random', the second expert is dispatched only with probability
    min(1, 2*g2) (g2 normalised), as in GShard's Algorithm 1. With policy 'sampling' it is
    drawn from the other experts with probability proportional to their gates, by Gumbel-max
    on the logits with the first expert masked (Praxis top2_gating_on_logits); it is always
    dispatched. In evaluation both pick the second-best expert.
    """
    if second_expert_policy not in SECOND_EXPERT_POLICIES:
        raise ValueError(
            f"moe.second_expert_policy={second_expert_policy!r} is not valid; "
            f"valid: {', '.join(SECOND_EXPERT_POLICIES)}."
        )
    probs = jax.nn.softmax(logits_gte, axis=-1)
    num_experts = probs.shape[-1]
    idx1 = jnp.argmax(probs, axis=-1)
    first_gte = jax.nn.one_hot(idx1, num_experts, dtype=jnp.bool_)
    if train and second_expert_policy == "sampling":
        if rng is None:
            raise ValueError("gshard_top2 sampling needs an rng while training.")
        idx2 = _gumbel_second_choice(logits_gte, first_gte, rng)
    else:
        idx2 = jnp.argmax(jnp.where(first_gte, -1.0, probs), axis=-1)
    idx_gtk = jnp.stack([idx1, idx2], axis=-1).astype(jnp.int32)
    g_gtk = _gather_e(probs, idx_gtk)
    g_gtk = g_gtk / (jnp.sum(g_gtk, axis=-1, keepdims=True) + 1e-9)
    send2 = jnp.ones(idx1.shape, jnp.bool_)
    if train and second_expert_policy == "random":
        if rng is None:
            raise ValueError("gshard_top2 random routing needs an rng while training.")
        send2 = jax.random.uniform(rng, idx1.shape) < 2.0 * g_gtk[..., 1]
    mask_gtk = jnp.stack([jnp.ones_like(send2), send2], axis=-1)
    return Routing(
        expert_index=idx_gtk,
        combine_weights=jnp.where(mask_gtk, g_gtk, 0.0),
        dispatch_mask=mask_gtk,
        **_common(logits_gte, probs, idx1),
    )


def _gumbel_second_choice(logits_gte: jax.Array, first_gte: jax.Array, rng: jax.Array):
    """argmax(logits + Gumbel noise) over the experts other than the first: a draw from
    softmax(logits) restricted to them, i.e. in proportion to their gates (Praxis)."""
    u_gte = jax.random.uniform(rng, logits_gte.shape, dtype=logits_gte.dtype)
    gumbel_gte = -jnp.log(-jnp.log(u_gte))
    very_negative = -0.7 * jnp.finfo(logits_gte.dtype).max  # Praxis' mask value
    return jnp.argmax(jnp.where(first_gte, very_negative, logits_gte) + gumbel_gte, axis=-1)


def switch_top1(logits_gte: jax.Array) -> Routing:
    """Switch: argmax expert; combine weight is its gate probability so the router learns."""
    probs = jax.nn.softmax(logits_gte, axis=-1)
    idx_gtk = jnp.argmax(probs, axis=-1)[..., None].astype(jnp.int32)
    return Routing(
        expert_index=idx_gtk,
        combine_weights=_gather_e(probs, idx_gtk),
        dispatch_mask=jnp.ones(idx_gtk.shape, jnp.bool_),
        **_common(logits_gte, probs, idx_gtk[..., 0]),
    )


def topk_softmax(logits_gte: jax.Array, k: int, choice_bias_e: jax.Array | None = None) -> Routing:
    """Mixtral: top-k of the logits, softmax over the k kept logits.

    choice_bias_e (DeepSeek-V3's balancing bias) moves only which experts are chosen, the top k
    of probs + bias (without it, of the logits: the same order); the gates stay the unbiased
    softmax over the chosen experts' logits.
    """
    probs = jax.nn.softmax(logits_gte, axis=-1)
    choice_gte = logits_gte if choice_bias_e is None else probs + choice_bias_e
    idx_gtk = jax.lax.top_k(choice_gte, k)[1]
    top_logits_gtk = _gather_e(logits_gte, idx_gtk)
    return Routing(
        expert_index=idx_gtk.astype(jnp.int32),
        combine_weights=jax.nn.softmax(top_logits_gtk, axis=-1),
        dispatch_mask=jnp.ones(idx_gtk.shape, jnp.bool_),
        **_common(logits_gte, probs, idx_gtk[..., 0]),
    )


def sequence_balance_loss(
    probs_gte: jax.Array, expert_index_gtk: jax.Array, sequence_length: int
) -> jax.Array:
    """DeepSeek-V3's sequence-wise balance loss sum_i f_i * P_i, averaged over sequences.

    Per sequence of T tokens: f_i = E/(k T) * #(tokens that chose i), P_i = mean_t s'_{i,t}
    with s' the scores normalised per token (`probs`). 1.0 when balanced; f has no gradient.
    Tokens are in batch-row order, so the [G, T] routing groups regroup into sequences.
    """
    g, t, e = probs_gte.shape
    k = expert_index_gtk.shape[-1]
    s = sequence_length or t  # 0: each routing group is one sequence
    probs_bse = probs_gte.reshape(-1, s, e)
    chosen_bse = jnp.sum(jax.nn.one_hot(expert_index_gtk, e, dtype=jnp.float32), axis=-2)
    f_be = jnp.sum(chosen_bse.reshape(-1, s, e), axis=1) * (e / (k * s))
    p_be = jnp.mean(probs_bse, axis=1)
    return jnp.mean(jnp.sum(jax.lax.stop_gradient(f_be) * p_be, axis=-1))


def group_limit_mask(
    choice_gte: jax.Array, num_groups: int, topk_groups: int, group_score: str
) -> jax.Array:
    """[G, T, E] bool: experts in each token's `topk_groups` best of `num_groups` equal groups.

    A group ranks by its best choice score ('max', DeepSeek-V2) or the sum of its best two
    ('top2_sum', DeepSeek-V3); experts e*ng/E.. of consecutive ids form a group.
    """
    g, t, e = choice_gte.shape
    grouped_gtnx = choice_gte.reshape(g, t, num_groups, e // num_groups)
    if group_score == "max":
        group_gtn = jnp.max(grouped_gtnx, axis=-1)
    elif group_score == "top2_sum":
        group_gtn = jnp.sum(jax.lax.top_k(grouped_gtnx, 2)[0], axis=-1)
    else:
        raise ValueError(f"moe.group_score={group_score!r} is not valid; valid: {GROUP_SCORES}.")
    _, keep_gtj = jax.lax.top_k(group_gtn, topk_groups)
    keep_gtn = jnp.any(jax.nn.one_hot(keep_gtj, num_groups, dtype=jnp.bool_), axis=-2)
    return jnp.repeat(keep_gtn, e // num_groups, axis=-1)


def topk(
    logits_gte: jax.Array,
    k: int,
    *,
    score: str = "softmax",
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    choice_bias_e: jax.Array | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "max",
    sequence_length: int = 0,
) -> Routing:
    """Top-k of the expert scores, in the forms of OLMoE/Qwen-MoE (softmax) and DeepSeek-V3.

    s = softmax(logits) or sigmoid(logits); the k experts are chosen by s + b (b: the
    auxiliary-loss-free bias, DeepSeek-V3 2.1.2), within the `topk_groups` best groups when
    num_groups > 1 (others masked to -inf); gates are the unbiased s of the chosen experts,
    divided by their sum if norm_topk_prob, then times routed_scaling_factor. `probs` (for the
    losses) are s normalised per token. softmax + norm_topk_prob equals Mixtral's topk_softmax.
    """
    if score == "softmax":
        scores_gte = jax.nn.softmax(logits_gte, axis=-1)
        probs_gte = scores_gte
    elif score == "sigmoid":
        scores_gte = jax.nn.sigmoid(logits_gte)
        probs_gte = scores_gte / jnp.sum(scores_gte, axis=-1, keepdims=True)
    else:
        raise ValueError(f"moe.router_score={score!r} is not valid; valid: {ROUTER_SCORES}.")
    choice_gte = scores_gte if choice_bias_e is None else scores_gte + choice_bias_e
    if num_groups > 1:
        keep_gte = group_limit_mask(choice_gte, num_groups, topk_groups, group_score)
        choice_gte = jnp.where(keep_gte, choice_gte, -jnp.inf)
    _, idx_gtk = jax.lax.top_k(jax.lax.stop_gradient(choice_gte), k)
    idx_gtk = idx_gtk.astype(jnp.int32)
    gates_gtk = _gather_e(scores_gte, idx_gtk)
    if norm_topk_prob:
        gates_gtk = gates_gtk / (jnp.sum(gates_gtk, axis=-1, keepdims=True) + 1e-20)
    common = _common(logits_gte, probs_gte, idx_gtk[..., 0])
    common["sequence_aux_loss"] = sequence_balance_loss(probs_gte, idx_gtk, sequence_length)
    return Routing(
        expert_index=idx_gtk,
        combine_weights=gates_gtk * routed_scaling_factor,
        dispatch_mask=jnp.ones(idx_gtk.shape, jnp.bool_),
        **common,
    )


def cv_squared(x_e: jax.Array) -> jax.Array:
    """Squared coefficient of variation, var/mean^2 (Shazeer's balancing losses)."""
    mean = jnp.mean(x_e)
    return jnp.var(x_e) / (jnp.square(mean) + 1e-10)


def noisy_topk(
    clean_gte: jax.Array, noise_std_gte: jax.Array, k: int, *, rng: jax.Array | None, train: bool
) -> Routing:
    """Shazeer 2017: top-k of x W_g + N(0,1) softplus(x W_noise) (noise in training only).

    Combine weights are the softmax over the k kept noisy logits. Importance loss is
    CV(sum_t gates)^2; load loss is CV(sum_t P(e kept))^2 with P from the normal CDF of the
    margin between the clean logit and the k-th largest noisy logit of the other experts.
    """
    num_experts = clean_gte.shape[-1]
    if k >= num_experts:
        raise ValueError(f"noisy_topk needs k < num_experts, got k={k}, E={num_experts}.")
    noisy_gte = clean_gte
    if train:
        if rng is None:
            raise ValueError("noisy_topk needs an rng while training.")
        noisy_gte = clean_gte + jax.random.normal(rng, clean_gte.shape) * noise_std_gte
    top_gtk1, idx_gtk1 = jax.lax.top_k(noisy_gte, k + 1)
    idx_gtk = idx_gtk1[..., :k].astype(jnp.int32)
    weights_gtk = jax.nn.softmax(top_gtk1[..., :k], axis=-1)
    gates_gte = jnp.sum(jax.nn.one_hot(idx_gtk, num_experts) * weights_gtk[..., None], axis=-2)
    importance_loss = cv_squared(jnp.sum(gates_gte, axis=(0, 1)))
    # k-th largest noisy logit excluding expert e: the (k+1)-th if e is in the top k, else k-th.
    in_top_gte = jnp.sum(jax.nn.one_hot(idx_gtk, num_experts), axis=-2) > 0
    threshold_gte = jnp.where(in_top_gte, top_gtk1[..., k : k + 1], top_gtk1[..., k - 1 : k])
    prob_kept_gte = norm.cdf((clean_gte - threshold_gte) / (noise_std_gte + 1e-9))
    load_loss = cv_squared(jnp.sum(prob_kept_gte, axis=(0, 1)))
    probs = jax.nn.softmax(clean_gte, axis=-1)
    common = _common(clean_gte, probs, idx_gtk[..., 0])
    common.update(importance_loss=importance_loss, load_loss=load_loss)
    return Routing(
        expert_index=idx_gtk,
        combine_weights=weights_gtk,
        dispatch_mask=jnp.ones(idx_gtk.shape, jnp.bool_),
        **common,
    )


def expert_choice(logits_gte: jax.Array, capacity: int) -> ExpertChoiceRouting:
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by router prob.

    Balanced by construction, but a token's experts depend on later tokens of its group, so
    it is not causal: do not use it for autoregressive decoding.
    """
    probs = jax.nn.softmax(logits_gte, axis=-1)
    capacity = min(capacity, probs.shape[1])
    weights_gec, token_gec = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), capacity)
    return ExpertChoiceRouting(
        token_index=token_gec.astype(jnp.int32),
        combine_weights=weights_gec,
        probs=probs,
        aux_loss=load_balancing_loss(probs, jnp.argmax(probs, axis=-1)),
        z_loss=router_z_loss(logits_gte),
        importance_loss=jnp.zeros((), jnp.float32),
        load_loss=jnp.zeros((), jnp.float32),
    )


# ---- registry ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RouterInputs:
    """Everything a registered router may read, so every entry has one signature."""

    logits_gte: jax.Array  # float32 router logits x W_router
    x_gtm: jax.Array  # float32 router input (after jitter)
    params: Mapping[str, jax.Array]  # the extra [M, E] matrices its RouterSpec.params names
    num_selected: int  # moe.num_selected (k)
    capacity: int  # slots per expert and group (expert choice fills exactly these)
    rng: jax.Array | None  # routing randomness, training only
    train: bool
    options: Any  # the config's `moe` section, for router-specific knobs
    # [E] float32 auxiliary-loss-free bias (DeepSeek-V3 2.1.2), added to the scores for the
    # top-k choice only (gates stay unbiased); None: off. Read by RouterSpec.choice_bias routers.
    choice_bias_e: jax.Array | None = None
    sequence_length: int = 0  # tokens per batch row (sequence-wise loss); 0: one routing group


@dataclasses.dataclass(frozen=True)
class RouterParam:
    """An extra float32 [M, E] router matrix with axes (embed, None), created by the layer."""

    name: str
    init: Callable = nn.initializers.zeros


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    """One router: its function and the facts the layer and the config checks need."""

    fn: Callable[[RouterInputs], Routing | ExpertChoiceRouting]
    fixed_k: int | None = None  # k the algorithm fixes (config checks compare moe.num_selected)
    causal: bool = True  # False: a token's experts depend on later tokens (cannot decode)
    params: tuple[RouterParam, ...] = ()  # extra parameters beside the router matrix
    # Router-specific config rule: check(moe config) -> None, or the one-sentence complaint.
    check: Callable[[Any], str | None] = lambda moe: None
    # Reads moe.router_score, moe.norm_topk_prob, moe.routed_scaling_factor and reports the
    # sequence-wise loss (the config checks refuse non-default values for other routers).
    scored: bool = False
    choice_bias: bool = False  # honours RouterInputs.choice_bias_e (moe.expert_bias_update_rate)
    grouped: bool = False  # honours moe.num_groups / moe.topk_groups / moe.group_score


def _route_gshard_top2(r: RouterInputs) -> Routing:
    """gshard_top2 with moe.second_expert_policy."""
    policy = r.options.second_expert_policy
    return gshard_top2(r.logits_gte, rng=r.rng, train=r.train, second_expert_policy=policy)


def _route_noisy_topk(r: RouterInputs) -> Routing:
    """noisy_topk with the learned noise scale softplus(x W_noise) (zero if noisy_gating off)."""
    noise_std_gte = jax.nn.softplus(jnp.einsum("gtm,me->gte", r.x_gtm, r.params["router_noise"]))
    if not r.options.noisy_gating:
        noise_std_gte = jnp.zeros_like(noise_std_gte)
    return noisy_topk(r.logits_gte, noise_std_gte, r.num_selected, rng=r.rng, train=r.train)


def _route_topk(r: RouterInputs) -> Routing:
    """topk / group_topk with the score, normalisation, scaling and group knobs of `moe`."""
    o = r.options
    return topk(
        r.logits_gte,
        r.num_selected,
        score=o.router_score,
        norm_topk_prob=o.norm_topk_prob,
        routed_scaling_factor=o.routed_scaling_factor,
        choice_bias_e=r.choice_bias_e,
        num_groups=o.num_groups,
        topk_groups=o.topk_groups,
        group_score=o.group_score,
        sequence_length=r.sequence_length,
    )


def _check_group_topk(moe) -> str | None:
    """Groups must tile the experts, be chosen from what exists and hold k experts."""
    ng, tg, e, k = moe.num_groups, moe.topk_groups, moe.num_experts, moe.num_selected
    if e % ng:
        return f"moe.num_experts={e} is not divisible by moe.num_groups={ng}; pick a divisor."
    if tg > ng:
        return f"moe.topk_groups={tg} is larger than moe.num_groups={ng}; use 1..{ng}."
    if k > tg * (e // ng):
        return (
            f"moe.num_selected={k} is larger than the {tg * (e // ng)} experts in the "
            f"moe.topk_groups={tg} chosen groups of {e // ng}; use k <= {tg * (e // ng)}."
        )
    if moe.group_score == "top2_sum" and e // ng < 2:
        return (
            f"moe.group_score='top2_sum' needs >= 2 experts per group, but moe.num_experts={e} "
            f"over moe.num_groups={ng} gives 1; use group_score='max'."
        )
    return None


def _check_noisy_topk(moe) -> str | None:
    """noisy_topk's load loss needs a (k+1)-th expert to compare with."""
    if moe.num_selected >= moe.num_experts:
        return (
            f"moe.router='noisy_topk' needs moe.num_selected < moe.num_experts, got "
            f"{moe.num_selected} and {moe.num_experts}."
        )
    return None


def _check_expert_choice(moe) -> str | None:
    """Expert choice fills fixed-size expert buffers: only the capacity paths apply."""
    if moe.dispatch == "dropless":
        return (
            "moe.router='expert_choice' fixes each expert's capacity, so moe.dispatch='dropless' "
            "does not apply; use 'einsum' or 'sort'."
        )
    return None


# moe.router -> RouterSpec: the one place a router is registered.
ROUTERS: dict[str, RouterSpec] = {
    "gshard_top2": RouterSpec(_route_gshard_top2, fixed_k=2),
    "switch_top1": RouterSpec(lambda r: switch_top1(r.logits_gte), fixed_k=1),
    "topk_softmax": RouterSpec(
        lambda r: topk_softmax(r.logits_gte, r.num_selected, r.choice_bias_e), choice_bias=True
    ),
    "topk": RouterSpec(_route_topk, scored=True, choice_bias=True),
    "group_topk": RouterSpec(
        _route_topk, check=_check_group_topk, scored=True, choice_bias=True, grouped=True
    ),
    "noisy_topk": RouterSpec(
        _route_noisy_topk, params=(RouterParam("router_noise"),), check=_check_noisy_topk
    ),
    "expert_choice": RouterSpec(
        lambda r: expert_choice(r.logits_gte, r.capacity), causal=False, check=_check_expert_choice
    ),
}


def get_router(name: str) -> RouterSpec:
    """The RouterSpec registered as `name`, or one sentence naming the valid ones."""
    if name not in ROUTERS:
        raise MoEError(f"moe.router={name!r} is not valid; valid: {tuple(ROUTERS)}.")
    return ROUTERS[name]
