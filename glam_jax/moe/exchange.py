"""How expert buffers meet expert weights on a mesh: the MoE layer's `shard_map` exchanges.

The mesh axes come from the logical-axis rules (`glam_jax.sharding`), looked up by the logical
names `expert` and `mlp`, so these exchanges follow whatever the rule table says.
"""

from __future__ import annotations

import functools

import jax

from glam_jax import sharding


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
