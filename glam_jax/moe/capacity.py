"""How many tokens an expert takes: routing groups, per-expert capacity, and slot priority.

Capacity and priority (first choices before second choices, then token order) are decided
here, once, for every capacity-bound dispatch path, so they all drop exactly the same tokens;
so is what the surviving gates weigh (`kept_gates`), for every path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from glam_jax.errors import GlamError

CAPACITY_CONVENTIONS = ("gshard", "praxis")
# moe.gate_norm: the router's gates as they are ('before_capacity': the router normalised
# them, Praxis' legacy_mtf_behavior, the default), or divided by the sum of the gates that
# survived capacity ('after_capacity': Praxis' non-legacy mode).
GATE_NORMS = ("before_capacity", "after_capacity")


class MoEError(GlamError):
    """A routing-group or capacity problem, reported in one sentence."""


def group_tokens(num_tokens: int, group_size: int, num_shards: int = 1) -> tuple[int, int]:
    """(G, T): groups of `group_size` tokens, never spanning two batch shards.

    A group is at most one shard's tokens, so G splits evenly over the devices that hold the
    batch (GShard: routing is local to a device's tokens).
    """
    per_shard = num_tokens // num_shards
    t = min(group_size, per_shard)
    if per_shard % t:
        raise MoEError(
            f"moe.group_size={group_size} must divide the {per_shard} tokens each of the "
            f"{num_shards} batch shards holds (rows x length / shards); pick a divisor of it."
        )
    return num_tokens // t, t


def expert_capacity(
    tokens_per_group: int,
    num_experts: int,
    num_selected: int,
    capacity_factor: float,
    convention: str = "gshard",
    min_capacity: int = 4,
) -> int:
    """Slots per expert and group.

    'gshard' (the GShard paper): ceil(k*T/E*cf). 'praxis' (Praxis top2_gating_on_logits):
    ceil(T*cf/E) rounded up to a multiple of 4, with no factor k. Never more than T.
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity factor must be > 0, got {capacity_factor}.")
    if convention == "gshard":
        cap = math.ceil(num_selected * tokens_per_group / num_experts * capacity_factor)
    elif convention == "praxis":
        cap = math.ceil(tokens_per_group * capacity_factor / num_experts)
        cap = 4 * math.ceil(cap / 4)
    else:
        raise ValueError(
            f"moe.capacity_convention={convention!r} is not valid; valid: {CAPACITY_CONVENTIONS}."
        )
    return int(min(max(cap, min_capacity), tokens_per_group))


def assign_slots(
    expert_index_gtk: jax.Array, dispatch_mask_gtk: jax.Array, num_experts: int, capacity: int
) -> tuple[jax.Array, jax.Array]:
    """Buffer position of every (token, choice) in its expert, and whether it fits.

    Priority: all first choices of a group in token order, then all second choices, ... .
    Computed by a stable sort of the choices by expert (O(T*k log T*k), no [T, E] one-hots).
    Returns position [G, T, k] int32 and kept [G, T, k] bool (dispatched and position < C).
    """
    g, t, k = expert_index_gtk.shape
    # Slot-major order: choice 0 of tokens 0..T-1, then choice 1 of tokens 0..T-1, ...
    e_gn = jnp.swapaxes(expert_index_gtk, 1, 2).reshape(g, k * t)
    m_gn = jnp.swapaxes(dispatch_mask_gtk, 1, 2).reshape(g, k * t)
    key_gn = jnp.where(m_gn, e_gn, num_experts)  # undispatched choices sort last
    order_gn = jnp.argsort(key_gn, axis=-1, stable=True)
    sorted_key_gn = jnp.take_along_axis(key_gn, order_gn, axis=-1)
    starts_ge = jax.vmap(lambda s: jnp.searchsorted(s, jnp.arange(num_experts + 1)))(sorted_key_gn)
    rank_sorted_gn = jnp.arange(k * t)[None] - jnp.take_along_axis(starts_ge, sorted_key_gn, -1)
    rank_gn = jax.vmap(lambda o, r: jnp.zeros_like(r).at[o].set(r))(order_gn, rank_sorted_gn)
    position_gtk = jnp.swapaxes(rank_gn.reshape(g, k, t), 1, 2).astype(jnp.int32)
    kept_gtk = dispatch_mask_gtk & (position_gtk < capacity)
    return position_gtk, kept_gtk


def kept_gates(weights_gtk: jax.Array, kept_gtk: jax.Array, gate_norm: str) -> jax.Array:
    """The combine weights of the choices that got a slot (0 for the others).

    'after_capacity' divides them by their sum per token, as Praxis' non-legacy top-2 gating
    does (a token whose choices were all dropped keeps zeros). On the dropless path nothing
    is dropped for capacity, so the sum runs over the dispatched choices (with GShard's
    random second expert, a token whose second expert was not sent gets weight 1 on its first).
    """
    w_gtk = jnp.where(kept_gtk, weights_gtk, 0.0)
    if gate_norm == "before_capacity":
        return w_gtk
    if gate_norm != "after_capacity":
        raise ValueError(f"moe.gate_norm={gate_norm!r} is not valid; valid: {GATE_NORMS}.")
    denom_gt1 = jnp.sum(w_gtk, axis=-1, keepdims=True)
    return w_gtk / jnp.where(denom_gt1 > 0, denom_gt1, 1.0)
