"""The layer stack is one scan: HLO size does not grow with depth and a while loop is present."""

import jax

from experiments.compile_probe import probe
from glam_jax import sharding
from tests.helpers import tiny_config


def test_hlo_size_flat_in_depth_and_loop_present():
    config = tiny_config()
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    shallow = probe(config, 4, mesh)
    deep = probe(config, 32, mesh)
    assert shallow["has_while_loop"] and deep["has_while_loop"]
    assert deep["hlo_ops"] <= 1.1 * shallow["hlo_ops"], (shallow, deep)
