"""Compile time and HLO size of a full train step versus depth (the scan keeps both flat).

python experiments/compile_probe.py --config=configs/glam_tiny.py --layers=4,8,16,32 [--json]
"""

from __future__ import annotations

import json
import time

import jax
from absl import flags
from ml_collections import config_flags

from glam_jax import cli, gpu_defaults, optim, sharding, steps

# Flags are defined only when run as a program, so importing this module (tests, notebooks)
# never clashes with another module's `--config`.
_FLAGS: dict = {}


def _define_flags() -> dict:
    """The command-line flags of this program."""
    return dict(
        config=config_flags.DEFINE_config_file(
            "config", None, "Model config file.", lock_config=False
        ),
        layers=flags.DEFINE_list("layers", ["4", "8", "16", "32"], "Depths to compile."),
        json=flags.DEFINE_bool("json", False, "Print a JSON list."),
    )


def hlo_op_count(hlo_text: str) -> int:
    """Instructions in an HLO module's text (lines that assign a value)."""
    return sum(1 for line in hlo_text.splitlines() if " = " in line and not line.startswith("//"))


def probe(config, num_layers: int, mesh) -> dict:
    """Lowers and compiles one train step at `num_layers` from abstract state (no allocation)."""
    config = config.copy_and_resolve_references()
    config.model.num_layers = num_layers
    model = steps.build_model(config)
    tx = optim.make_optimizer(config.train)
    start = time.perf_counter()
    abstract, shardings = steps.abstract_state(config, model, tx, mesh)
    b, s = config.train.batch_size, config.train.seq_len
    batch = {
        key: jax.ShapeDtypeStruct(
            (b, s),
            "float32" if key == "weights" else "int32",
            sharding=sharding.batch_sharding(mesh),
        )
        for key in steps.BATCH_KEYS
    }
    train_step = steps.make_train_step(config, model, tx, mesh, shardings)
    compiled = train_step.lower(abstract, batch).compile()
    seconds = time.perf_counter() - start
    text = compiled.as_text()
    return {
        "layers": num_layers,
        "compile_s": round(seconds, 3),
        "hlo_ops": hlo_op_count(text),
        "has_while_loop": " while(" in text,
    }


def main(argv) -> None:
    del argv
    config = _FLAGS["config"].value
    mesh = sharding.make_mesh(config.mesh.shape)
    rows = [probe(config, int(n), mesh) for n in _FLAGS["layers"].value]
    if _FLAGS["json"].value:
        print(json.dumps(rows))
        return
    print(f"{'layers':>6s} {'compile_s':>10s} {'hlo_ops':>8s} while")
    for r in rows:
        print(f"{r['layers']:6d} {r['compile_s']:10.2f} {r['hlo_ops']:8d} {r['has_while_loop']}")


if __name__ == "__main__":
    _FLAGS.update(_define_flags())
    flags.mark_flag_as_required("config")
    gpu_defaults.apply()  # XLA/CUDA settings for GPU hosts; nothing elsewhere
    cli.run(main)
