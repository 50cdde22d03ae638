"""Three ways to send tokens to experts and back; all compute the same MoE layer.

`dispatch` is the one entry the layer calls: it picks the path of `moe.dispatch` for the kind
of routing it is given and reports the expert load and the dropped fraction the same way for
every path.

- `einsum`: GShard one-hot dispatch/combine tensors [G, T, E, C]; simple, shards cleanly,
  O(T*E*C) memory per group.
- `sort`: a slot->token table built from the same slot assignment, then gathers into
  [E, G, C, M] and back; O(T*k) index work.
- `dropless`: no capacity; token-expert pairs sorted by expert through a grouped matmul
  (`jax.lax.ragged_dot`, or on Hopper GPUs our block-aligned kernels or jax's ragged ones).

Capacity and priority are decided in one place, `capacity.assign_slots`, used by both
capacity paths, so they drop exactly the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from glam_jax.layers import activation_fn, constrain
from glam_jax.moe import exchange, rows
from glam_jax.moe.capacity import assign_slots, kept_gates
from glam_jax.moe.routers import ExpertChoiceRouting, Routing
from glam_jax.moe.rows import gather_rows

DISPATCHES = ("einsum", "sort", "dropless")


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
        """E."""
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
# How tokens reach the devices holding their experts. Capacity paths (einsum, sort): 'gspmd'
# lets XLA's partitioner choose the collectives from the sharding constraints; 'all_to_all'
# exchanges the buffers explicitly, GShard style (exchange.expert_all_to_all). Dropless:
# 'gspmd' keeps each device's tokens home and all-gathers the expert weights
# (exchange.per_shard_dropless); 'all_to_all' (padded slots) and 'ragged_all_to_all' (only the
# real rows; not on XLA:CPU) send the tokens to their experts (exchange.expert_parallel_dropless).
EXCHANGES = ("gspmd", "all_to_all", "ragged_all_to_all")


def run_experts(x_egcm: jax.Array, experts: Experts) -> jax.Array:
    """Dispatched buffers [E, G, C, M] through their experts, on whichever devices hold them."""
    if experts.exchange == "all_to_all":
        x_egcm = constrain(x_egcm, (None, "group", "capacity", "embed"))
        return exchange.expert_all_to_all(
            lambda x, ex: ex.batched(x, constrain_hidden=False), x_egcm, experts
        )
    if experts.exchange != "gspmd":
        raise ValueError(
            f"moe.expert_exchange={experts.exchange!r} is not valid; valid: {EXCHANGES}."
        )
    x_egcm = constrain(x_egcm, EGCM)
    return constrain(experts.batched(x_egcm), EGCM)


def _xla_ragged_dot(x_nm, w_emh, group_sizes_e):
    """XLA's grouped matmul (everywhere; a dense masked dot on GPUs)."""
    return jax.lax.ragged_dot(x_nm, w_emh, group_sizes_e.astype(jnp.int32))


def _mgpu_ragged_dot(x_nm, w_emh, group_sizes_e):
    """jax's Mosaic-GPU ragged kernels with our VJP (Hopper GPUs)."""
    from glam_jax.kernels.grouped_matmul import grouped_matmul

    return grouped_matmul(x_nm, w_emh, group_sizes_e)


def _dropless_blocked_kernels(x_gtm, expert_index_gtk, weights_gtk, mask_gtk, experts, fused_glu):
    """Dropless through our block-aligned Hopper kernels (fused gated FFN if asked)."""
    from glam_jax.kernels import block_grouped_matmul as bg

    glu = bg.glu_block_matmul if fused_glu else None
    return dropless_blocked_dispatch(
        x_gtm, expert_index_gtk, weights_gtk, mask_gtk, experts, bg.block_matmul, glu
    )


def _dropless_sorted(
    x_gtm, expert_index_gtk, weights_gtk, dispatch_mask_gtk, experts, fused_glu, *, ragged_dot
):
    """Pairs sorted by expert (unpadded groups) through ragged_dot(x, w, group_sizes)."""
    del fused_glu  # only the blocked kernels fuse the gated FFN
    g, t, m = x_gtm.shape
    e, k = experts.num_experts, expert_index_gtk.shape[-1]
    x_nm = x_gtm.reshape(g * t, m)
    # Pairs that are not dispatched get key E: sorted last and in no group, so never computed.
    valid_p = dispatch_mask_gtk.reshape(-1)
    e_p = jnp.where(valid_p, expert_index_gtk.reshape(-1), e)
    order_p = jnp.argsort(e_p, stable=True)
    inverse_p = rows.inverse_permutation(order_p)  # gathers both ways, as in the blocked path
    xs_pm = rows.gather_rows(x_nm, order_p // k, inverse_p.reshape(g * t, k))
    group_sizes_e = jnp.bincount(e_p, length=e)  # drops key E
    ys_pm = experts.ragged(xs_pm, lambda x, w: ragged_dot(x, w, group_sizes_e))
    y_pm = rows.gather_rows(ys_pm, inverse_p, order_p[:, None])
    # rows outside every group are left undefined by some kernels: zero them, not 0 * value
    y_pm = jnp.where(valid_p[:, None], y_pm, jnp.zeros((), y_pm.dtype))
    return _combine_pairs(y_pm, weights_gtk, dispatch_mask_gtk)


# The grouped-matmul implementations of the dropless path, by moe.ragged_matmul name: one fixed
# table (the kernels know nothing of it). Each runs (x, expert_index, weights, mask, experts,
# fused_glu) on one device's groups. 'blocked': our Hopper kernels over expert groups padded to
# whole row tiles (fastest); 'mgpu': jax's Mosaic-GPU ragged kernels over unpadded groups;
# 'xla': jax.lax.ragged_dot.
GROUPED_MATMULS = types.MappingProxyType(
    {
        "xla": functools.partial(_dropless_sorted, ragged_dot=_xla_ragged_dot),
        "mgpu": functools.partial(_dropless_sorted, ragged_dot=_mgpu_ragged_dot),
        "blocked": _dropless_blocked_kernels,
    }
)
RAGGED_MATMUL_CHOICES = ("auto", *GROUPED_MATMULS)


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
            return choice
    if name != "auto":
        raise ValueError(
            f"moe.ragged_matmul={name!r} cannot run here: {reasons[name]}; use 'auto' or 'xla'."
        )
    return "xla"


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

    On a mesh each device does this for its own routing groups: with the expert weights
    gathered to it (moe.expert_exchange='gspmd'), or sending its pairs to the devices that
    hold their experts ('all_to_all', 'ragged_all_to_all'): see EXCHANGES.
    fused_glu: with 'blocked', a gated FFN's two input matmuls and activation are one kernel.
    """

    def local(x_gtm, expert_index_gtk, weights_gtk, dispatch_mask_gtk, experts):
        name = resolve_ragged_matmul(matmul, experts)  # on the per-device expert shapes
        return GROUPED_MATMULS[name](
            x_gtm, expert_index_gtk, weights_gtk, dispatch_mask_gtk, experts, fused_glu
        )

    if experts.exchange == "gspmd":
        return exchange.per_shard_dropless(
            local, x_gtm, expert_index_gtk, weights_gtk, dispatch_mask_gtk, experts
        )
    return exchange.expert_parallel_dropless(
        local,
        x_gtm,
        expert_index_gtk,
        weights_gtk,
        dispatch_mask_gtk,
        experts,
        ragged=experts.exchange == "ragged_all_to_all",
    )


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
    layout = block_grouped_matmul.block_layout(
        expert_index_gtk.reshape(p), e, valid_p=dispatch_mask_gtk.reshape(p)
    )
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


# ---- the one entry of the layer ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DispatchOptions:
    """How routed tokens travel: the path, the capacity and the dropless grouped matmul."""

    path: str  # moe.dispatch: one of DISPATCHES
    capacity: int  # slots per expert and group (capacity paths)
    ragged_matmul: str = "auto"  # moe.ragged_matmul (dropless)
    fused_glu: bool = True  # moe.fused_glu (dropless, 'blocked')
    gate_norm: str = "before_capacity"  # moe.gate_norm (capacity.kept_gates), every path


@struct.dataclass
class Dispatched:
    """The layer's output and what it cost: how load spread and how much was dropped."""

    y_gtm: jax.Array  # combined expert outputs [G, T, M]
    expert_load_e: jax.Array  # [E] share of the dispatched (token, expert) pairs per expert
    dropped_fraction: jax.Array  # scalar: share of dispatched work that found no slot


def _capacity_path(fn):
    """einsum/sort for token choice: slots from assign_slots, then fn through them."""

    def run(x_gtm, r: Routing, experts: Experts, opts: DispatchOptions):
        e = experts.num_experts
        position_gtk, kept_gtk = assign_slots(r.expert_index, r.dispatch_mask, e, opts.capacity)
        w_gtk = kept_gates(r.combine_weights, kept_gtk, opts.gate_norm)
        y_gtm = fn(x_gtm, r.expert_index, w_gtk, kept_gtk, position_gtk, experts, opts.capacity)
        return y_gtm, kept_gtk

    return run


def _dropless_path(x_gtm, r: Routing, experts: Experts, opts: DispatchOptions):
    """dropless for token choice: every dispatched choice is kept."""
    y_gtm = dropless_dispatch(
        x_gtm,
        r.expert_index,
        kept_gates(r.combine_weights, r.dispatch_mask, opts.gate_norm),
        r.dispatch_mask,
        experts,
        opts.ragged_matmul,
        opts.fused_glu,
    )
    return y_gtm, r.dispatch_mask


# moe.dispatch -> path(x, routing, experts, options) -> (y, kept) for token-choice routing ...
TOKEN_CHOICE_PATHS = {
    "einsum": _capacity_path(einsum_dispatch),
    "sort": _capacity_path(sort_dispatch),
    "dropless": _dropless_path,
}
# ... and -> y for expert-choice routing (capacity is fixed by the router: no dropless).
EXPERT_CHOICE_PATHS = {"einsum": expert_choice_einsum, "sort": expert_choice_sort}


def _dispatch_token_choice(x_gtm, r: Routing, experts: Experts, opts) -> Dispatched:
    """Token choice: load over dispatched choices; dropped = dispatched but over capacity."""
    y_gtm, kept_gtk = TOKEN_CHOICE_PATHS[opts.path](x_gtm, r, experts, opts)
    onehot_gtke = jax.nn.one_hot(r.expert_index, experts.num_experts, dtype=jnp.float32)
    sent_gtk = r.dispatch_mask.astype(jnp.float32)
    sent = jnp.maximum(jnp.sum(sent_gtk), 1.0)
    load_e = jnp.einsum("gtke,gtk->e", onehot_gtke, sent_gtk) / sent
    # (sent - kept) / sent, not 1 - kept / sent: exactly 0 when nothing drops
    dropped = (jnp.sum(sent_gtk) - jnp.sum(kept_gtk)) / sent
    return Dispatched(y_gtm=y_gtm, expert_load_e=load_e, dropped_fraction=dropped)


def _dispatch_expert_choice(x_gtm, r: ExpertChoiceRouting, experts: Experts, opts) -> Dispatched:
    """Expert choice: load is uniform by construction; dropped = tokens no expert picked."""
    y_gtm = EXPERT_CHOICE_PATHS[opts.path](x_gtm, r.token_index, r.combine_weights, experts)
    g, t = x_gtm.shape[:2]
    chosen_gt = jax.vmap(lambda c, idx: c.at[idx].add(1.0))(
        jnp.zeros((g, t), jnp.float32), r.token_index.reshape(g, -1)
    )
    e = experts.num_experts
    return Dispatched(
        y_gtm=y_gtm,
        expert_load_e=jnp.full((e,), 1.0 / e),
        dropped_fraction=jnp.mean((chosen_gt == 0).astype(jnp.float32)),
    )


def dispatch(
    x_gtm: jax.Array,
    routing: Routing | ExpertChoiceRouting,
    experts: Experts,
    options: DispatchOptions,
) -> Dispatched:
    """Tokens [G, T, M] to their experts and back along `options.path`, with load statistics."""
    if isinstance(routing, ExpertChoiceRouting):
        return _dispatch_expert_choice(x_gtm, routing, experts, options)
    return _dispatch_token_choice(x_gtm, routing, experts, options)
