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

SECOND_EXPERT_POLICIES = ("random", "all")  # gshard_top2: sample the 2nd expert, or always send


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
    min(1, 2*g2) (g2 normalised), as in GShard's Algorithm 1.
    """
    if second_expert_policy not in SECOND_EXPERT_POLICIES:
        raise ValueError(
            f"moe.second_expert_policy={second_expert_policy!r} is not valid; "
            f"valid: {', '.join(SECOND_EXPERT_POLICIES)}."
        )
    probs = jax.nn.softmax(logits_gte, axis=-1)
    num_experts = probs.shape[-1]
    idx1 = jnp.argmax(probs, axis=-1)
    probs_rest = jnp.where(jax.nn.one_hot(idx1, num_experts, dtype=jnp.bool_), -1.0, probs)
    idx2 = jnp.argmax(probs_rest, axis=-1)
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
    # [E] float32 auxiliary-loss-free balancing bias (DeepSeek-V3): added to the scores for the
    # top-k choice only, gates from the unbiased scores; None when moe.expert_bias_update_rate=0
    choice_bias_e: jax.Array | None = None


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
    choice_bias: bool = False  # reads RouterInputs.choice_bias_e (moe.expert_bias_update_rate)


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
