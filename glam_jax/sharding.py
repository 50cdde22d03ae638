"""The device mesh and the one table that maps logical axis names onto it (GSPMD style).

This is the only module that names mesh axes. Model code names *logical* axes (`batch`,
`embed`, `expert`, ...) on every parameter and key activation; `LOGICAL_RULES` decides where
each lands on the 2-D (data x expert) mesh, with an optional third `model` axis for tensor
parallelism. GShard layout: the batch is split over data*expert, expert weights over `expert`
(and their hidden width over `model`), and the stacked `layers` axis is never split, so device
d holds the same expert indices in every layer.

A config can override or extend the table (`mesh.axis_rules`, pairs of logical name and mesh
axes): `axis_rules(config)` builds the table, `use_rules` makes it the active one for
everything traced or laid out inside, and every lookup here reads the active table.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence

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
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


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


def axis_rules(config=None) -> Rules:
    """LOGICAL_RULES with the config's `mesh.axis_rules` pairs replacing entries of the same
    logical name or, for new names, added at the end."""
    overrides = tuple(config.mesh.get("axis_rules", ()) or ()) if config is not None else ()
    table = dict(LOGICAL_RULES)
    for pair in overrides:
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ShardingError(
                f"mesh.axis_rules entry {pair!r} must be a (logical name, mesh axes) pair."
            )
        name, axes = pair[0], pair[1]
        axes = tuple(axes) if isinstance(axes, list | tuple) else axes
        for axis in (axes,) if isinstance(axes, str) or axes is None else axes:
            if axis is not None and axis not in MESH_AXES:
                raise ShardingError(
                    f"mesh.axis_rules maps {name!r} to {axis!r}, which is not a mesh axis; "
                    f"valid: {MESH_AXES} or None."
                )
        table[name] = axes
    return tuple(table.items())


def active_rules() -> Rules:
    """The rule table in force: the one `use_rules`/`use_mesh` set, else LOGICAL_RULES."""
    return tuple(nn.get_logical_axis_rules()) or LOGICAL_RULES


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[None]:
    """Makes `rules` (see axis_rules) the active table for everything inside."""
    with nn.logical_axis_rules(rules):
        yield


def with_config_rules(fn: Callable) -> Callable:
    """Decorates an entry point fn(config, ...) to run under the config's rule table."""

    @functools.wraps(fn)
    def run(config, *args, **kwargs):
        with use_rules(axis_rules(config)):
            return fn(config, *args, **kwargs)

    return run


def check_logical_axes(names: Sequence[str | None], where: str = "") -> None:
    """Raises if a logical axis name is not in the rule table (catches typos at trace time)."""
    known = {name for name, _ in active_rules()}
    for name in names:
        if name is not None and name not in known:
            raise ShardingError(
                f"unknown logical axis {name!r}{' in ' + where if where else ''}; "
                f"valid names: {sorted(known)}."
            )


def logical_to_spec(names: Sequence[str | None]) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec through the active rule table."""
    check_logical_axes(names)
    return nn.logical_to_mesh_axes(tuple(names), active_rules())


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[None]:
    """Context for tracing model code: logical constraints resolve via the table onto `mesh`."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(active_rules()):
        yield


def logical_specs(abstract_tree):
    """PartitionSpecs for a tree whose leaves carry logical names (nn.LogicallyPartitioned)."""
    logical = nn.get_partition_spec(abstract_tree)

    def to_spec(spec):
        check_logical_axes(tuple(spec))
        return nn.logical_to_mesh_axes(tuple(spec), active_rules())

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


def mesh_axes_of(name: str) -> str | tuple[str, ...] | None:
    """The mesh axis (or axes, or None) the logical axis `name` maps to under the rules."""
    check_logical_axes((name,))
    return nn.logical_to_mesh_axes((name,), active_rules())[0]


def logical_axis_size(name: str) -> int:
    """Ways the logical axis `name` is split on the mesh being traced under (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = mesh_axes_of(name)
    if mesh.empty or axes is None:
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
