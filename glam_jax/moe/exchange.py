"""How expert buffers meet expert weights on a mesh: the MoE layer's `shard_map` exchanges.

The mesh axes come from the logical-axis rules (`glam_jax.sharding`), looked up by the logical
names `expert` and `mlp`, so these exchanges follow whatever the rule table says.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from glam_jax import sharding
from glam_jax.moe import rows


def expert_all_to_all(fn, x_egcm: jax.Array, experts):
    """GShard expert parallelism with explicit all-to-alls around the expert computation.

    x_egcm [E, G, C, M] arrives with its routing groups G split like the batch. Each device
    sends the buffers of expert shard j to the devices of shard j (all-to-all over the mesh
    axis of `expert`), runs its local experts on [E/n, G*n/.., C, M], sums partial products over
    the axis of `mlp` when experts are tensor-parallel, and sends the results back.
    `experts` is a dispatch.Experts whose weights are split as the rule table says.
    """
    mesh = jax.sharding.get_abstract_mesh()
    expert_axis = sharding.mesh_axes_of("expert")
    if mesh.empty or sharding.logical_axis_size("expert") == 1:
        return fn(x_egcm, experts)
    mlp_axis = sharding.mesh_axes_of("mlp")
    groups = sharding.logical_to_spec((None, "group", None, None))
    specs = _expert_weight_specs(experts)

    def body(x_local, experts_local):
        experts_local = _salt_per_device(experts_local)
        x_local = jax.lax.all_to_all(x_local, expert_axis, 0, 1, tiled=True)
        y_local = fn(x_local, experts_local)
        if mlp_axis is not None:  # partial sums over the hidden width (a no-op at size 1)
            y_local = jax.lax.psum(y_local, mlp_axis)
        return jax.lax.all_to_all(y_local, expert_axis, 1, 0, tiled=True)

    return jax.shard_map(body, mesh=mesh, in_specs=(groups, specs), out_specs=groups)(
        x_egcm, experts
    )


def per_shard_dropless(fn, x_gtm, expert_index_gtk, weights_gtk, mask_gtk, experts):
    """Dropless MoE where every device routes and computes only its own routing groups.

    fn(x, expert_index, weights, mask, experts) is the single-device dropless layer. Written
    for the whole mesh, its global sort and gathers would make XLA's partitioner gather every
    token onto every device and run all of them there (and a Pallas grouped-matmul kernel has
    no partitioning rule at all). Dropless routing couples no tokens, so each device runs fn
    on its groups, with the expert weights all-gathered over `expert` (their gradients are
    reduce-scattered back) and partial outputs summed over the axis of `mlp` when experts are
    tensor-parallel. Outside a mesh, or on one device, fn runs as is.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(x_gtm, expert_index_gtk, weights_gtk, mask_gtk, experts)
    expert_axis = sharding.mesh_axes_of("expert")
    mlp_axis = sharding.mesh_axes_of("mlp")
    groups = sharding.logical_to_spec(("group", None, None))
    specs = _expert_weight_specs(experts)

    gather_experts = sharding.logical_axis_size("expert") > 1
    sum_hidden = sharding.logical_axis_size("mlp") > 1

    def body(x, index, weights, mask, local):
        local = _salt_per_device(local)
        if gather_experts:
            gather = lambda w: jax.lax.all_gather(w, expert_axis, axis=0, tiled=True)  # noqa: E731
            local = local.replace(
                wi_0=gather(local.wi_0),
                wi_1=None if local.wi_1 is None else gather(local.wi_1),
                wo=gather(local.wo),
            )
        y = fn(x, index, weights, mask, local)
        return jax.lax.psum(y, mlp_axis) if sum_hidden else y

    # check_vma off: the Pallas kernels fn may call carry no varying-axes rules.
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(groups, groups, groups, groups, specs),
        out_specs=groups,
        check_vma=False,
    )(x_gtm, expert_index_gtk, weights_gtk, mask_gtk, experts)


def expert_parallel_dropless(
    fn, x_gtm, expert_index_gtk, weights_gtk, mask_gtk, experts, *, ragged
):
    """Dropless expert parallelism: each token's rows travel to the devices that hold its
    experts, and the results come back; expert weights never move.

    fn(x, expert_index, weights, mask, experts) is the single-device dropless layer; here it
    runs on the rows a device receives, each row one (token, choice) pair for one of its local
    experts. Every device routes its own groups and sorts its dispatched pairs by expert, so by
    owning device (each expert shard holds contiguous experts), then:
    - ragged=False: one all-to-all of [n, P, M] buffers, a slot per pair for each of the n
      expert shards: nothing can overflow however unbalanced the routing (P = the device's
      pairs), at the price of sending the unused slots too;
    - ragged=True: `jax.lax.ragged_all_to_all` sends only the rows each device owns, into a
      receive buffer of n * P rows (overflow-free as well). XLA:CPU cannot run it.
    Receive-buffer rows that hold no pair are masked, so no kernel computes them. Partial
    outputs are summed over the axis of `mlp` when experts are tensor-parallel. The expert
    weights' gradients stay on their device (shard_map sums those of replicas over other axes).
    """
    mesh = jax.sharding.get_abstract_mesh()
    n = sharding.logical_axis_size("expert")
    if mesh.empty or n == 1:  # nothing to exchange: the per-device layer is the whole story
        return per_shard_dropless(fn, x_gtm, expert_index_gtk, weights_gtk, mask_gtk, experts)
    expert_axis = sharding.mesh_axes_of("expert")
    mlp_axis = sharding.mesh_axes_of("mlp")
    sum_hidden = sharding.logical_axis_size("mlp") > 1
    groups = sharding.logical_to_spec(("group", None, None))
    e = experts.num_experts
    e_local = e // n
    route = _RaggedRoute if ragged else _PaddedRoute

    def body(x, index, weights, mask, local):
        local = _salt_per_device(local)
        g, t, m = x.shape
        k = index.shape[-1]
        p = g * t * k
        valid_p = mask.reshape(p)
        key_p = jnp.where(valid_p, index.reshape(p), e)  # not dispatched: key E, sorted last
        order_p = jnp.argsort(key_p, stable=True)
        key_s = key_p[order_p]
        # Every row move below is a gather whose gradient is a gather (rows.gather_rows): the
        # sorted row s of pair order_p[s] reads token order_p[s] // k, and token n's k pairs
        # sit at the sorted positions inverse[n * k : n * k + k].
        inverse_p = rows.inverse_permutation(order_p)
        rows_sm = rows.gather_rows(x.reshape(g * t, m), order_p // k, inverse_p.reshape(g * t, k))
        expert_s = jnp.where(key_s < e, key_s % e_local, e_local)  # the receiver's expert id
        r = route(key_s // e_local, n, expert_axis)  # owning device of each pair (n: none)
        recv_rm, recv_expert_r = r.send(rows_sm), r.send(expert_s, fill=e_local)
        valid_r = recv_expert_r < e_local
        y_rm = fn(
            recv_rm[None],
            jnp.minimum(recv_expert_r, e_local - 1)[None, :, None],
            jnp.ones((1, recv_rm.shape[0], 1), jnp.float32),
            valid_r[None, :, None],
            local,
        )[0]
        if sum_hidden:  # partial sums over the hidden width
            y_rm = jax.lax.psum(y_rm, mlp_axis)
        y_sm = r.receive_back(y_rm)
        y_pm = rows.gather_rows(y_sm, inverse_p, order_p[:, None])  # back to pair order
        w_p = jnp.where(valid_p, weights.reshape(p), 0.0).astype(y_pm.dtype)
        return jnp.sum((y_pm * w_p[:, None]).reshape(g, t, k, m), axis=2)

    # check_vma off: the Pallas kernels fn may call carry no varying-axes rules.
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(groups, groups, groups, groups, _expert_weight_specs(experts)),
        out_specs=groups,
        check_vma=False,
    )(x_gtm, expert_index_gtk, weights_gtk, mask_gtk, experts)


class _PaddedRoute:
    """Rows sorted by owning device -> [n, P] slots, one all-to-all each way.

    Slot j of the flat [n * P] send buffer holds sorted row source_j (P: an empty slot, a
    zero row); sorted row s sits in slot place_s (n * P: nowhere, a pair not dispatched). Each
    map is the other's inverse, so both moves and their gradients are gathers.
    """

    def __init__(self, dest_s, n, axis):
        (p,) = dest_s.shape
        count_d = jnp.bincount(dest_s, length=n)  # drops dest n (pairs not dispatched)
        start_d = jnp.cumsum(count_d) - count_d
        slot_s = jnp.arange(p) - start_d[jnp.minimum(dest_s, n - 1)]
        self.place_s = jnp.where(dest_s < n, dest_s * p + slot_s, n * p)
        d_j, i_j = jnp.divmod(jnp.arange(n * p), p)
        self.source_j = jnp.where(i_j < count_d[d_j], start_d[d_j] + i_j, p)
        self.n, self.p, self.axis = n, p, axis

    def send(self, v_s, fill=0):
        """[P, ...] sorted rows -> [n * P, ...] received, block s from device s."""
        if jnp.issubdtype(v_s.dtype, jnp.floating):
            buf = rows.gather_rows(v_s, self.source_j, self.place_s[:, None])
        else:  # labels (expert ids): no gradient, empty slots get `fill`
            buf = jnp.take(v_s, self.source_j, axis=0, mode="fill", fill_value=fill)
        buf = buf.reshape(self.n, self.p, *v_s.shape[1:])
        out = jax.lax.all_to_all(buf, self.axis, 0, 0, tiled=True)
        return out.reshape(self.n * self.p, *v_s.shape[1:])

    def receive_back(self, y_r):
        """[n * P, M] results -> [P, M] in the sorted order they were sent (0 if not sent)."""
        back = jax.lax.all_to_all(y_r.reshape(self.n, self.p, -1), self.axis, 0, 0, tiled=True)
        back = back.reshape(self.n * self.p, -1)
        return rows.gather_rows(back, self.place_s, self.source_j[:, None])


class _RaggedRoute:
    """Rows sorted by owning device travel with `jax.lax.ragged_all_to_all`: only real rows."""

    def __init__(self, dest_s, n, axis):
        (p,) = dest_s.shape
        count_d = jnp.bincount(dest_s, length=n).astype(jnp.int32)  # what I send to each
        counts_sd = jax.lax.all_gather(count_d, axis)  # [source, destination], every device
        me = jax.lax.axis_index(axis)
        start_sd = jnp.cumsum(counts_sd, axis=1) - counts_sd  # where each source's rows start
        # where my rows land in each destination's buffer: after those of lower sources
        below = (jnp.arange(n) < me)[:, None]
        self.out_offset_d = jnp.sum(jnp.where(below, counts_sd, 0), axis=0).astype(jnp.int32)
        self.count_d, self.start_d = count_d, start_sd[me].astype(jnp.int32)
        self.recv_s = counts_sd[:, me].astype(jnp.int32)  # what each source sends me
        self.recv_start_s = (jnp.cumsum(self.recv_s) - self.recv_s).astype(jnp.int32)
        self.back_offset_s = start_sd[:, me].astype(jnp.int32)  # my rows' place at each source
        self.n, self.p, self.axis = n, p, axis

    def send(self, v_s, fill=0):
        """[P, ...] sorted rows -> [n * P, ...]: rows from source 0, then 1, ...; rest `fill`."""
        out = jnp.full((self.n * self.p, *v_s.shape[1:]), fill, v_s.dtype)
        return jax.lax.ragged_all_to_all(
            v_s,
            out,
            self.start_d,
            self.count_d,
            self.out_offset_d,
            self.recv_s,
            axis_name=self.axis,
        )

    def receive_back(self, y_r):
        """[n * P, M] results -> [P, M] where the sorted rows were (0 for pairs not sent)."""
        out = jnp.zeros((self.p, y_r.shape[-1]), y_r.dtype)
        return jax.lax.ragged_all_to_all(
            y_r,
            out,
            self.recv_start_s,
            self.recv_s,
            self.back_offset_s,
            self.count_d,
            axis_name=self.axis,
        )


def _expert_weight_specs(experts):
    """`experts` (a dispatch.Experts) with each weight replaced by its PartitionSpec."""
    w_in = sharding.logical_to_spec(("expert", "embed", "mlp"))
    return experts.replace(
        wi_0=w_in,
        wi_1=None if experts.wi_1 is None else w_in,
        wo=sharding.logical_to_spec(("expert", "mlp", "embed")),
    )


def _salt_per_device(experts):
    """Experts whose hidden_fn (expert dropout) draws its own mask on each device: inside a
    shard_map every device would otherwise reuse one key, one mask pattern, for its rows."""
    if experts.hidden_fn is None:
        return experts
    salt = jax.lax.axis_index(sharding.MESH_AXES)
    return experts.replace(hidden_fn=functools.partial(experts.hidden_fn, salt=salt))
