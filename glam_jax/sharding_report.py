"""python -m glam_jax.sharding_report --config=configs/glam_tiny.py --mesh=2,4,1 [--json]

Prints the PartitionSpec of every parameter and, for the expert weights, which expert indices
each device holds in each layer. Shapes only: nothing is allocated. On a CPU host with fewer
devices than the mesh needs, that many CPU devices are simulated.
"""

from __future__ import annotations

import json
import math
import os

from absl import app, flags
from ml_collections import config_flags

from glam_jax import cli

# Flags are defined only when run as a program, so importing this module (tests, notebooks)
# never clashes with another module's `--config`.
_FLAGS: dict = {}


def _define_flags() -> dict:
    """The command-line flags of this program."""
    return dict(
        config=config_flags.DEFINE_config_file(
            "config", None, "Model config file.", lock_config=False
        ),
        mesh=flags.DEFINE_string("mesh", "1,1,1", "Mesh sizes data,expert,model."),
        json=flags.DEFINE_bool("json", False, "Print one JSON object."),
    )


def parse_mesh(text: str) -> tuple[int, int, int]:
    """'2,4,1' -> (2, 4, 1), or a usage error in one sentence."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or any(v < 1 for v in shape):
        raise app.UsageError(f"--mesh={text!r} must be three positive sizes data,expert,model.")
    return shape  # type: ignore[return-value]


def report(config, mesh_shape) -> dict:
    """The report of `config` on a mesh of `mesh_shape`, under the config's axis rules."""
    from glam_jax import sharding

    with sharding.use_rules(sharding.axis_rules(config)):
        return _report(config, mesh_shape)


def _report(config, mesh_shape) -> dict:
    """{'params': {path: spec}, 'expert_placement': {device: [[ids per layer], ...]}}."""
    import flax.linen as nn
    import jax
    from jax.sharding import PartitionSpec

    from glam_jax import config_checks, sharding, steps

    config_checks.check_model(config)
    if config.moe.num_experts and config.moe.num_experts % mesh_shape[1]:
        raise app.UsageError(
            f"moe.num_experts={config.moe.num_experts} is not divisible by the expert axis "
            f"{mesh_shape[1]}."
        )
    devices = jax.devices()[: math.prod(mesh_shape)]
    mesh = sharding.make_mesh(mesh_shape, devices)
    model = steps.build_model(config)
    abstract = steps.abstract_boxed_params(model, config)
    specs = sharding.logical_specs(abstract)
    flat_specs = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )[0]
    params = {jax.tree_util.keystr(p, simple=True, separator="/"): str(s) for p, s in flat_specs}
    placement = {}
    logical = jax.tree_util.tree_flatten_with_path(
        nn.get_partition_spec(abstract), is_leaf=lambda x: isinstance(x, PartitionSpec)
    )[0]
    for (path, spec), (_, names) in zip(flat_specs, logical, strict=True):
        if path[-1].key != "wi_0" or "expert" not in tuple(names):
            continue  # one expert weight per MoE layer (stack) is enough to show placement
        names = tuple(names)
        leaf = nn_value(abstract, path)  # scanned: [layers, E, M, H]; unrolled: [E, M, H]
        axis, stacked = names.index("expert"), names[0] == "layers"
        shard = jax.sharding.NamedSharding(mesh, spec)
        for device, index in shard.devices_indices_map(leaf.shape).items():
            ids = list(range(leaf.shape[axis]))[index[axis]]
            layers = len(range(leaf.shape[0])[index[0]]) if stacked else 1
            placement.setdefault(device.id, []).extend([ids] * layers)
    return {"mesh": list(mesh_shape), "params": params, "expert_placement": placement}


def nn_value(tree, path):
    """The unboxed abstract leaf at `path` of a tree of LogicallyPartitioned boxes."""
    node = tree
    for p in path:
        node = node[p.key]
    return node.value if hasattr(node, "value") else node


def main(argv) -> None:
    """Prints the report of --config on --mesh, simulating CPU devices if needed."""
    del argv
    shape = parse_mesh(_FLAGS["mesh"].value)
    need = math.prod(shape)
    flags_env = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags_env:
        os.environ["XLA_FLAGS"] = f"{flags_env} --xla_force_host_platform_device_count={need}"
    out = report(_FLAGS["config"].value, shape)
    if _FLAGS["json"].value:
        print(json.dumps(out))
        return
    print(f"mesh (data, expert, model) = {tuple(shape)}")
    width = max(len(k) for k in out["params"])
    for path, spec in out["params"].items():
        print(f"{path:{width}s}  {spec}")
    if out["expert_placement"]:
        print("\nexpert ids held by each device, per layer:")
        for device, layers in out["expert_placement"].items():
            same = all(ids == layers[0] for ids in layers)
            print(
                f"device {device}: {layers[0]} in all {len(layers)} MoE layers"
                if same
                else f"device {device}: {layers}"
            )


if __name__ == "__main__":
    _FLAGS.update(_define_flags())
    flags.mark_flag_as_required("config")
    cli.run(main)
