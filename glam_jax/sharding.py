"""The device mesh and the one table that maps logical axis names onto it (GSPMD style).

This is the only module that names mesh axes. Model code names *logical* axes (`batch`,
`embed`, `expert`, ...) on every parameter and key activation; `LOGICAL_RULES` decides where
each lands on the 2-D (data x expert) mesh, with an optional third `model` axis for tensor
parallelism. GShard layout: the batch is split over data*expert, expert weights over `expert`
(and their hidden width over `model`), and the stacked `layers` axis is never split, so device
d holds the same expert indices in every layer.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glam_jax.errors import GlamError

MESH_AXES = ("data", "expert", "model")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "expert")),  # rows of a batch: pure data parallelism over both axes
    ("length", None),  # sequence positions
    ("embed", None),  # model width M
    ("mlp", "model"),  # FFN / expert hidden width H: tensor parallel
    ("heads", "model"),  # attention heads: tensor parallel
    ("kv", None),  # per-head width
    ("vocab", "model"),  # vocabulary rows of the embedding / logits
    ("expert", "expert"),  # expert index of expert weights and dispatched tokens
    ("expert_group", "data"),  # routing groups once tokens are dispatched to experts
    ("group", ("data", "expert")),  # routing groups before dispatch (same split as batch)
    ("layers", None),  # stacked scan axis: never split
    ("rel_buckets", None),  # relative-position buckets
    ("capacity", None),  # expert buffer slots
    ("tokens", None),  # tokens inside one routing group
)
LOGICAL_AXES = frozenset(name for name, _ in LOGICAL_RULES)


class ShardingError(GlamError):
    """A mesh or axis-name problem, reported in one sentence."""


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """Resolves a (data, expert, model) shape with at most one -1 against the device count."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ShardingError(
            f"mesh.shape={shape} must have {len(MESH_AXES)} entries, one per axis {MESH_AXES}."
        )
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ShardingError(
            f"mesh.shape={shape} must hold positive sizes and at most one -1, e.g. (-1, 1, 1)."
        )
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ShardingError(
                f"mesh.shape={shape} does not divide the {num_devices} available devices."
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ShardingError(
            f"mesh.shape={shape} uses {math.prod(shape)} devices but {num_devices} are available."
        )
    return shape  # type: ignore[return-value]


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, expert, model) mesh; `expert`/`model` vary fastest (same host first)."""
    devices = list(jax.devices() if devices is None else devices)
    resolved = mesh_shape(shape, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(resolved, devices=devices)
    except Exception:  # fake CPU devices or odd counts: plain row-major order is fine there
        grid = np.asarray(devices).reshape(resolved)
    return Mesh(grid, MESH_AXES)


def check_logical_axes(names: Sequence[str | None], where: str = "") -> None:
    """Raises if a logical axis name is not in LOGICAL_RULES (catches typos at trace time)."""
    for name in names:
        if name is not None and name not in LOGICAL_AXES:
            raise ShardingError(
                f"unknown logical axis {name!r}{' in ' + where if where else ''}; "
                f"valid names: {sorted(LOGICAL_AXES)}."
            )


def logical_to_spec(names: Sequence[str | None]) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec through LOGICAL_RULES."""
    check_logical_axes(names)
    return nn.logical_to_mesh_axes(tuple(names), LOGICAL_RULES)


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[None]:
    """Context for tracing model code: logical constraints resolve via the table onto `mesh`."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield


def logical_specs(abstract_tree):
    """PartitionSpecs for a tree whose leaves carry logical names (nn.LogicallyPartitioned)."""
    logical = nn.get_partition_spec(abstract_tree)

    def to_spec(spec):
        check_logical_axes(tuple(spec))
        return nn.logical_to_mesh_axes(tuple(spec), LOGICAL_RULES)

    return jax.tree.map(to_spec, logical, is_leaf=lambda x: isinstance(x, PartitionSpec))


def named_shardings(mesh: Mesh, spec_tree):
    """NamedShardings on `mesh` for a tree of PartitionSpecs."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), spec_tree, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [batch, length] input array."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length")))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding (scalars, RNG keys)."""
    return NamedSharding(mesh, PartitionSpec())


def logical_axis_size(name: str) -> int:
    """Ways the logical axis `name` is split on the mesh being traced under (1 outside a mesh)."""
    check_logical_axes((name,))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = nn.logical_to_mesh_axes((name,), LOGICAL_RULES)[0]
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def ways_on_mesh_shape(name: str, shape: Sequence[int]) -> int:
    """Ways the logical axis `name` is split on a (data, expert, model) mesh of `shape` (for
    start-up checks, before any mesh exists)."""
    check_logical_axes((name,))
    axes = nn.logical_to_mesh_axes((name,), LOGICAL_RULES)[0]
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    sizes = dict(zip(MESH_AXES, shape, strict=True))
    return math.prod(sizes[a] for a in axes)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch axis is split (data x expert)."""
    return mesh.shape["data"] * mesh.shape["expert"]


def expert_all_to_all(fn, x_egcm: jax.Array, experts):
    """GShard expert parallelism with explicit all-to-alls around the expert computation.

    x_egcm [E, G, C, M] arrives with its routing groups G split like the batch. Each device
    sends the buffers of expert shard j to the devices of shard j (all-to-all over the mesh
    axis of `expert`), runs its local experts on [E/n, G*n/.., C, M], sums partial products over
    the axis of `mlp` when experts are tensor-parallel, and sends the results back.
    `experts` is a dispatch.Experts whose weights are split as LOGICAL_RULES says.
    """
    mesh = jax.sharding.get_abstract_mesh()
    expert_axis = nn.logical_to_mesh_axes(("expert",), LOGICAL_RULES)[0]
    if mesh.empty or mesh.shape[expert_axis] == 1:
        return fn(x_egcm, experts)
    mlp_axis = nn.logical_to_mesh_axes(("mlp",), LOGICAL_RULES)[0]
    groups = logical_to_spec((None, "group", None, None))
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
    expert_axis = nn.logical_to_mesh_axes(("expert",), LOGICAL_RULES)[0]
    mlp_axis = nn.logical_to_mesh_axes(("mlp",), LOGICAL_RULES)[0]
    groups = logical_to_spec(("group", None, None))
    specs = _expert_weight_specs(experts)

    gather_experts = mesh.shape[expert_axis] > 1
    sum_hidden = mlp_axis is not None and mesh.shape[mlp_axis] > 1

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
    w_in = logical_to_spec(("expert", "embed", "mlp"))
    return experts.replace(
        wi_0=w_in,
        wi_1=None if experts.wi_1 is None else w_in,
        wo=logical_to_spec(("expert", "mlp", "embed")),
    )


def _salt_per_device(experts):
    """Experts whose hidden_fn (expert dropout) draws its own mask on each device: inside a
    shard_map every device would otherwise reuse one key, one mask pattern, for its rows."""
    if experts.hidden_fn is None:
        return experts
    salt = jax.lax.axis_index(MESH_AXES)
    return experts.replace(hidden_fn=functools.partial(experts.hidden_fn, salt=salt))
