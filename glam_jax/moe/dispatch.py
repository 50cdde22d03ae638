"""Three ways to send tokens to experts and back; all compute the same MoE layer.

- `einsum`: GShard one-hot dispatch/combine tensors [G, T, E, C]; simple, shards cleanly,
  O(T*E*C) memory per group.
- `sort`: a slot->token table built from the same slot assignment, then gathers into
  [E, G, C, M] and back; O(T*k) index work.
- `dropless`: no capacity; token-expert pairs sorted by expert through a grouped matmul
  (`jax.lax.ragged_dot`, or on Hopper GPUs our block-aligned kernels or jax's ragged ones).

Capacity and priority (first choices before second choices, then token order) are decided in
one place, `assign_slots`, used by both capacity paths, so they drop exactly the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from glam_jax import sharding
from glam_jax.layers import activation_fn, constrain

DISPATCHES = ("einsum", "sort", "dropless")
CAPACITY_CONVENTIONS = ("gshard", "praxis")


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


@struct.dataclass
class Experts:
    """E gated FFNs with stacked weights; applied batched ([E, ..., M]) or ragged (sorted)."""

    wi_0: jax.Array  # [E, M, H]
    wi_1: jax.Array | None  # [E, M, H] (None: non-gated FFN)
    wo: jax.Array  # [E, H, M]
    activation: str = struct.field(pytree_node=False, default="gelu")
    # expert dropout: hidden_fn(h, salt=0), salt set per device where h is one device's share
    hidden_fn: Callable | None = struct.field(pytree_node=False, default=None)
    exchange: str = struct.field(pytree_node=False, default="gspmd")  # see EXCHANGES

    @property
    def num_experts(self) -> int:
        return self.wi_0.shape[0]

    def batched(self, x_egcm: jax.Array, constrain_hidden: bool = True) -> jax.Array:
        """Expert e applied to its buffer x[e]: [E, G, C, M] -> [E, G, C, M]."""
        act = activation_fn(self.activation)
        h_egch = act(jnp.einsum("egcm,emh->egch", x_egcm, self.wi_0))
        if self.wi_1 is not None:
            h_egch = h_egch * jnp.einsum("egcm,emh->egch", x_egcm, self.wi_1)
        if constrain_hidden:  # (not inside shard_map, where values are per-device)
            h_egch = constrain(h_egch, ("expert", "expert_group", "capacity", "mlp"))
        if self.hidden_fn is not None:
            h_egch = self.hidden_fn(h_egch)
        return jnp.einsum("egch,ehm->egcm", h_egch, self.wo)

    def ragged(
        self, x_nm: jax.Array, matmul: Callable, glu_matmul: Callable | None = None
    ) -> jax.Array:
        """Rows of x sorted by expert through their expert; matmul(x [N, K], w [E, K, H])
        knows which rows belong to which expert (a grouped matmul). glu_matmul(x, wi_0, wi_1),
        if given, computes a gated FFN's act(x wi_0) * (x wi_1) in one go."""
        if self.wi_1 is not None and glu_matmul is not None:
            h_nh = glu_matmul(x_nm, self.wi_0, self.wi_1)
        else:
            h_nh = activation_fn(self.activation)(matmul(x_nm, self.wi_0))
            if self.wi_1 is not None:
                h_nh = h_nh * matmul(x_nm, self.wi_1)
        if self.hidden_fn is not None:
            h_nh = self.hidden_fn(h_nh)
        return matmul(h_nh, self.wo)


EGCM = ("expert", "expert_group", "capacity", "embed")
# How dispatched buffers reach the devices holding their experts (capacity paths):
# 'gspmd' lets XLA's partitioner choose the collectives from the sharding constraints;
# 'all_to_all' exchanges them explicitly, GShard style (glam_jax.sharding.expert_all_to_all).
EXCHANGES = ("gspmd", "all_to_all")


def run_experts(x_egcm: jax.Array, experts: Experts) -> jax.Array:
    """Dispatched buffers [E, G, C, M] through their experts, on whichever devices hold them."""
    if experts.exchange == "all_to_all":
        x_egcm = constrain(x_egcm, (None, "group", "capacity", "embed"))
        return sharding.expert_all_to_all(
            lambda x, ex: ex.batched(x, constrain_hidden=False), x_egcm, experts
        )
    if experts.exchange != "gspmd":
        raise ValueError(
            f"moe.expert_exchange={experts.exchange!r} is not valid; valid: {EXCHANGES}."
        )
    x_egcm = constrain(x_egcm, EGCM)
    return constrain(experts.batched(x_egcm), EGCM)


def _xla_ragged_dot(x_nm, w_emh, group_sizes_e):
    return jax.lax.ragged_dot(x_nm, w_emh, group_sizes_e.astype(jnp.int32))


# Grouped-GEMM implementations by name; GPU kernels register themselves here.
RAGGED_MATMULS: dict[str, Callable] = {"xla": _xla_ragged_dot}
# 'blocked': our Hopper kernels over expert groups padded to whole row tiles (fastest);
# 'mgpu': jax's Mosaic-GPU ragged kernels over unpadded groups; 'xla': jax.lax.ragged_dot.
RAGGED_MATMUL_CHOICES = ("auto", "xla", "mgpu", "blocked")


def resolve_ragged_matmul(name: str, experts: Experts | None = None) -> str:
    """'auto' -> the fastest grouped matmul that runs these experts here, else XLA's ragged_dot.

    The Hopper kernels need an sm_90 GPU, bfloat16/float16 weights and widths that are
    multiples of their tiles; 'auto' falls back, an explicit 'blocked'/'mgpu' says why not.
    """
    if name not in RAGGED_MATMUL_CHOICES:
        raise ValueError(
            f"moe.ragged_matmul={name!r} is not valid; valid: {RAGGED_MATMUL_CHOICES}."
        )
    if name == "xla":
        return name
    from glam_jax.kernels import block_grouped_matmul, grouped_matmul

    w = experts.wi_0 if experts is not None else None
    reasons = {
        "blocked": block_grouped_matmul.unsupported_reason(w),
        "mgpu": grouped_matmul.unsupported_reason(w),
    }
    for choice in ("blocked", "mgpu") if name == "auto" else (name,):
        if reasons[choice] is None:
            if choice == "mgpu":
                grouped_matmul.register()
            return choice
    if name != "auto":
        raise ValueError(
            f"moe.ragged_matmul={name!r} cannot run here: {reasons[name]}; use 'auto' or 'xla'."
        )
    return "xla"


@jax.custom_vjp
def gather_rows(x_nm: jax.Array, index_i: jax.Array, inverse_nc: jax.Array) -> jax.Array:
    """x[index] -> [I, M], where index == N gives a zero row.

    inverse_nc lists for each row n of x the positions i with index[i] == n (padded with I),
    so the gradient is a gather and a sum too, not a scatter-add (atomics on a GPU).
    """
    return jnp.take(x_nm, index_i, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(x_nm, index_i, inverse_nc):
    return gather_rows(x_nm, index_i, inverse_nc), inverse_nc


def _gather_rows_bwd(inverse_nc, dy_im):
    dx_ncm = jnp.take(dy_im, inverse_nc, axis=0, mode="fill", fill_value=0)
    return jnp.sum(dx_ncm, axis=1, dtype=dy_im.dtype), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def einsum_dispatch(
    x_gtm, expert_index_gtk, weights_gtk, kept_gtk, position_gtk, experts: Experts, capacity
):
    """GShard: one-hot dispatch/combine tensors [G, T, E, C] and two einsums around experts."""
    e, dtype = experts.num_experts, x_gtm.dtype
    onehot_gtke = jax.nn.one_hot(expert_index_gtk, e, dtype=dtype)
    onehot_gtkc = jax.nn.one_hot(jnp.where(kept_gtk, position_gtk, capacity), capacity, dtype=dtype)
    dispatch_gtec = jnp.einsum("gtke,gtkc->gtec", onehot_gtke, onehot_gtkc)
    w_gtk = jnp.where(kept_gtk, weights_gtk, 0.0).astype(dtype)
    combine_gtec = jnp.einsum("gtke,gtkc,gtk->gtec", onehot_gtke, onehot_gtkc, w_gtk)
    x_egcm = jnp.einsum("gtec,gtm->egcm", dispatch_gtec, x_gtm)
    y_egcm = run_experts(x_egcm, experts)
    return jnp.einsum("gtec,egcm->gtm", combine_gtec, y_egcm)


def sort_dispatch(
    x_gtm, expert_index_gtk, weights_gtk, kept_gtk, position_gtk, experts: Experts, capacity
):
    """Gather tokens into [E, G, C, M] through a slot->token table; gather results back."""
    g, t, m = x_gtm.shape
    e, k = experts.num_experts, expert_index_gtk.shape[-1]
    trash = e * capacity  # slot index for choices that were dropped or not dispatched
    slot_gtk = jnp.where(kept_gtk, expert_index_gtk * capacity + position_gtk, trash)
    token_gtk = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :, None], (g, t, k))
    table_gs = jax.vmap(lambda s, tok: jnp.full((trash + 1,), t, jnp.int32).at[s].set(tok))(
        slot_gtk.reshape(g, -1), token_gtk.reshape(g, -1)
    )[:, :trash]  # empty slots point at the zero row t
    x_pad = jnp.concatenate([x_gtm, jnp.zeros((g, 1, m), x_gtm.dtype)], axis=1)
    x_gsm = jnp.take_along_axis(x_pad, table_gs[..., None], axis=1)
    x_egcm = jnp.swapaxes(x_gsm.reshape(g, e, capacity, m), 0, 1)
    y_egcm = run_experts(x_egcm, experts)
    y_gsm = jnp.swapaxes(y_egcm, 0, 1).reshape(g, trash, m)
    y_pad = jnp.concatenate([y_gsm, jnp.zeros((g, 1, m), y_gsm.dtype)], axis=1)
    y_gtkm = jnp.take_along_axis(y_pad, slot_gtk.reshape(g, t * k, 1), axis=1).reshape(g, t, k, m)
    w_gtk = jnp.where(kept_gtk, weights_gtk, 0.0).astype(y_gtkm.dtype)
    return jnp.einsum("gtkm,gtk->gtm", y_gtkm, w_gtk)


def dropless_dispatch(
    x_gtm,
    expert_index_gtk,
    weights_gtk,
    dispatch_mask_gtk,
    experts: Experts,
    matmul="xla",
    fused_glu: bool = True,
):
    """No capacity: sort all (token, choice) pairs by expert and run a grouped matmul.

    On a mesh each device does this for its own routing groups (sharding.per_shard_dropless).
    fused_glu: with 'blocked', a gated FFN's two input matmuls and activation are one kernel.
    """

    def local(x_gtm, expert_index_gtk, weights_gtk, dispatch_mask_gtk, experts):
        name = resolve_ragged_matmul(matmul, experts)  # on the per-device expert shapes
        if name == "blocked":
            from glam_jax.kernels import block_grouped_matmul as bg

            return dropless_blocked_dispatch(
                x_gtm,
                expert_index_gtk,
                weights_gtk,
                dispatch_mask_gtk,
                experts,
                bg.block_matmul,
                bg.glu_block_matmul if fused_glu else None,
            )
        return _dropless_sorted(
            x_gtm, expert_index_gtk, weights_gtk, dispatch_mask_gtk, experts, name
        )

    return sharding.per_shard_dropless(
        local, x_gtm, expert_index_gtk, weights_gtk, dispatch_mask_gtk, experts
    )


def _dropless_sorted(x_gtm, expert_index_gtk, weights_gtk, dispatch_mask_gtk, experts, matmul):
    """Pairs sorted by expert (unpadded groups) through RAGGED_MATMULS[matmul]."""
    g, t, m = x_gtm.shape
    e, k = experts.num_experts, expert_index_gtk.shape[-1]
    x_nm = x_gtm.reshape(g * t, m)
    e_p = expert_index_gtk.reshape(-1)
    order_p = jnp.argsort(e_p, stable=True)
    xs_pm = jnp.take(x_nm, order_p // k, axis=0)
    group_sizes_e = jnp.bincount(e_p, length=e)
    grouped = RAGGED_MATMULS[matmul]
    ys_pm = experts.ragged(xs_pm, lambda x, w: grouped(x, w, group_sizes_e))
    y_pm = jnp.zeros_like(ys_pm).at[order_p].set(ys_pm)
    return _combine_pairs(y_pm, weights_gtk, dispatch_mask_gtk)


def dropless_blocked_dispatch(
    x_gtm,
    expert_index_gtk,
    weights_gtk,
    dispatch_mask_gtk,
    experts: Experts,
    block_matmul,
    glu_block_matmul=None,
):
    """Dropless through a buffer where each expert's rows fill whole row tiles (zero-padded).

    block_matmul(x [R, K], w [E, K, N], layout) is the Hopper kernel or its XLA twin
    (glam_jax.kernels.block_grouped_matmul), and so is glu_block_matmul(x, w0, w1, layout,
    activation) for gated experts (None: two block_matmuls); moving rows in and out are
    gathers both ways.
    """
    from glam_jax.kernels import block_grouped_matmul

    g, t, m = x_gtm.shape
    e, k = experts.num_experts, expert_index_gtk.shape[-1]
    n, p = g * t, g * t * k
    layout = block_grouped_matmul.block_layout(expert_index_gtk.reshape(p), e)
    token_r = jnp.where(layout.row_pair < p, layout.row_pair // k, n)  # n: a zero row
    xs_rm = gather_rows(x_gtm.reshape(n, m), token_r, layout.pair_row.reshape(n, k))
    glu = None
    if glu_block_matmul is not None:

        def glu(x, w0, w1):
            return glu_block_matmul(x, w0, w1, layout, experts.activation)

    ys_rm = experts.ragged(xs_rm, lambda x, w: block_matmul(x, w, layout), glu)
    y_pm = gather_rows(ys_rm, layout.pair_row, layout.row_pair[:, None])
    return _combine_pairs(y_pm, weights_gtk, dispatch_mask_gtk)


def _combine_pairs(y_pm, weights_gtk, dispatch_mask_gtk):
    """Expert outputs of the (token, choice) pairs [G*T*k, M], token-major -> [G, T, M]: each
    token's choices weighted (0 where not dispatched) and summed."""
    g, t, k = weights_gtk.shape
    w_p = jnp.where(dispatch_mask_gtk, weights_gtk, 0.0).reshape(-1).astype(y_pm.dtype)
    return jnp.sum((y_pm * w_p[:, None]).reshape(g, t, k, -1), axis=2)


def expert_choice_einsum(x_gtm, token_gec, weights_gec, experts: Experts):
    """Expert choice with one-hot [G, E, C, T] dispatch/combine tensors."""
    t, dtype = x_gtm.shape[1], x_gtm.dtype
    onehot_gect = jax.nn.one_hot(token_gec, t, dtype=dtype)
    y_egcm = run_experts(jnp.einsum("gect,gtm->egcm", onehot_gect, x_gtm), experts)
    return jnp.einsum("gect,gec,egcm->gtm", onehot_gect, weights_gec.astype(dtype), y_egcm)


def expert_choice_sort(x_gtm, token_gec, weights_gec, experts: Experts):
    """Expert choice by gathering each expert's tokens and scatter-adding results back."""
    g, t, m = x_gtm.shape
    _, e, c = token_gec.shape
    x_gsm = jnp.take_along_axis(x_gtm, token_gec.reshape(g, e * c, 1), axis=1)
    y_egcm = run_experts(jnp.swapaxes(x_gsm.reshape(g, e, c, m), 0, 1), experts)
    y_gsm = jnp.swapaxes(y_egcm, 0, 1).reshape(g, e * c, m)
    y_gsm = y_gsm * weights_gec.reshape(g, e * c, 1).astype(y_gsm.dtype)
    return jax.vmap(lambda idx, y: jnp.zeros((t, m), y.dtype).at[idx].add(y))(
        token_gec.reshape(g, e * c), y_gsm
    )
