"""GShard placement: experts split over `expert`, layers never split, same experts per device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam_jax import optim, sharding, steps
from tests.helpers import tiny_config

# --dist loadgroup (pyproject.toml) gives this module to one xdist worker: the sharded state (a
# module fixture) is built once, not once per xdist worker.
pytestmark = pytest.mark.xdist_group("sharding")

EXPERT_LEAVES = ("wi_0", "wi_1", "wo")


def _expert_leaves(params):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf
        for path, leaf in flat
        if "/moe/" in jax.tree_util.keystr(path, simple=True, separator="/")
        and jax.tree_util.keystr(path, simple=True, separator="/").split("/")[-1] in EXPERT_LEAVES
    }


@pytest.fixture(scope="module")
def sharded_state():
    config = tiny_config()
    config.model.num_layers = 8  # 4 MoE layers
    mesh = sharding.make_mesh((2, 4, 1), jax.devices()[:8])
    model = steps.build_model(config)
    tx = optim.make_optimizer(config.train)
    state, shardings = steps.create_train_state(config, model, tx, mesh)
    return config, mesh, state, shardings


def test_expert_leaves_split_over_expert_axis_layers_unsplit(sharded_state):
    config, _, state, _ = sharded_state
    leaves = _expert_leaves(state.params)
    assert len(leaves) == 3
    for path, leaf in leaves.items():
        spec = leaf.sharding.spec
        assert spec[0] is None, f"{path}: layers axis must not be split, got {spec}"
        assert spec[1] == "expert", f"{path}: expert axis must map to mesh 'expert', got {spec}"
        assert leaf.shape[:2] == (4, config.moe.num_experts)


def test_each_device_holds_same_expert_ids_in_every_layer(sharded_state):
    """Write expert id e into every weight of expert e, then read the devices' shards back."""
    config, mesh, state, _ = sharded_state
    e = config.moe.num_experts
    for path, leaf in _expert_leaves(state.params).items():
        ids = np.broadcast_to(np.arange(e, dtype=np.float32)[None, :, None, None], leaf.shape)
        marked = jax.device_put(ids, leaf.sharding)
        held = {}
        for shard in marked.addressable_shards:
            data = np.asarray(shard.data)  # [layers, experts on this device, ...]
            assert data.shape[0] == leaf.shape[0], f"{path}: a device must hold every layer"
            per_layer = [
                sorted(set(data[layer].reshape(data.shape[1], -1)[:, 0]))
                for layer in range(data.shape[0])
            ]
            assert all(p == per_layer[0] for p in per_layer), f"{path}: experts differ by layer"
            held[shard.device.id] = per_layer[0]
        assert len(held) == 8
        # 4-way expert axis: each device holds E/4 experts; every expert lives on 2 devices (data).
        assert all(len(v) == e // 4 for v in held.values())
        counts = np.bincount(np.concatenate(list(held.values())).astype(int), minlength=e)
        assert counts.tolist() == [2] * e


def test_optimizer_state_of_experts_is_sharded_like_the_weights(sharded_state):
    _, _, state, _ = sharded_state
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        key = jax.tree_util.keystr(path)
        if "moe" in key and "wi_0" in key and leaf.ndim >= 2:
            assert leaf.sharding.spec[0] is None and leaf.sharding.spec[1] == "expert", key


def test_batch_split_over_data_and_expert(sharded_state):
    _, mesh, _, _ = sharded_state
    assert sharding.batch_sharding(mesh).spec == jax.sharding.PartitionSpec(
        ("data", "expert"), None
    )


def test_unknown_logical_axis_is_refused_in_one_sentence():
    with pytest.raises(sharding.ShardingError, match="unknown logical axis 'experts'"):
        sharding.logical_to_spec(("batch", "experts"))

    class Bad(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.with_logical_partitioning(nn.initializers.ones, ("embd",)), (4,))
            return x * w

    abstract = jax.eval_shape(lambda: Bad().init(jax.random.PRNGKey(0), jnp.ones(4))["params"])
    with pytest.raises(sharding.ShardingError, match="'embd'"):
        sharding.logical_specs(abstract)


def test_mesh_shape_resolution_and_errors():
    assert sharding.mesh_shape((-1, 4, 1), 8) == (2, 4, 1)
    with pytest.raises(sharding.ShardingError, match="does not divide"):
        sharding.mesh_shape((-1, 3, 1), 8)
    with pytest.raises(sharding.ShardingError, match="uses 4 devices"):
        sharding.mesh_shape((2, 2, 1), 8)


def _collectives(mesh_shape, **moe):
    from experiments.bench_utils import collective_counts

    config = tiny_config(**moe)
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:8])
    model = steps.build_model(config)
    tx = optim.make_optimizer(config.train)
    abstract, shardings = steps.abstract_state(config, model, tx, mesh)
    shape = (config.train.batch_size, config.train.seq_len)
    batch = {
        key: jax.ShapeDtypeStruct(
            shape,
            "float32" if key == "weights" else "int32",
            sharding=sharding.batch_sharding(mesh),
        )
        for key in steps.BATCH_KEYS
    }
    train_step = steps.make_train_step(config, model, tx, mesh, shardings)
    return collective_counts(train_step.lower(abstract, batch).compile().as_text())


def test_expert_parallel_step_moves_tokens_with_all_to_all():
    """GShard dispatch: tokens reach expert shards through all-to-all, not all-gathers."""
    data_parallel = _collectives((8, 1, 1))
    expert_parallel = _collectives((2, 4, 1))
    assert data_parallel["all-to-all"] == 0
    assert expert_parallel["all-to-all"] >= 4  # dispatch + combine, forward and backward


@pytest.mark.parametrize("mesh_shape, dispatch", [((2, 4, 1), "einsum"), ((1, 4, 2), "sort")])
def test_explicit_all_to_all_exchange_equals_the_partitioner(mesh_shape, dispatch):
    """moe.expert_exchange='all_to_all' (shard_map) gives the same step, with 4 all-to-alls."""
    from tests.helpers import random_batch

    def one_step(exchange):
        config = tiny_config(expert_exchange=exchange, dispatch=dispatch)
        mesh = sharding.make_mesh(mesh_shape, jax.devices()[:8])
        model = steps.build_model(config)
        tx = optim.make_optimizer(config.train)
        state, shardings = steps.create_train_state(config, model, tx, mesh)
        train_step = steps.make_train_step(config, model, tx, mesh, shardings)
        batch = steps.global_batch(random_batch(config), mesh)
        # One compilation serves both the step and the count of its collectives.
        compiled = train_step.lower(state, batch).compile()
        state, metrics = compiled(state, batch)
        return jax.device_get((metrics["loss"], state.params)), compiled.as_text()

    (loss_gspmd, params_gspmd), _ = one_step("gspmd")
    (loss_a2a, params_a2a), hlo = one_step("all_to_all")
    assert abs(float(loss_gspmd) - float(loss_a2a)) < 1e-6
    for a, b in zip(jax.tree.leaves(params_gspmd), jax.tree.leaves(params_a2a), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    from experiments.bench_utils import collective_counts

    counts = collective_counts(hlo)
    assert counts["all-to-all"] == 4  # dispatch and combine, forward and backward
    assert counts["all-gather"] == 0


def test_config_axis_rules_override_the_table():
    """mesh.axis_rules replaces a logical axis' mesh axes for everything laid out under it
    (here: the vocabulary no longer split over `model`); a bad mesh axis is one sentence."""
    config = tiny_config()
    mesh = sharding.make_mesh((1, 1, 2), jax.devices()[:2])
    model = steps.build_model(config)
    tx = optim.make_optimizer(config.train)

    def embedding_spec():
        with sharding.use_rules(sharding.axis_rules(config)):
            _, shardings = steps.abstract_state(config, model, tx, mesh)
        return shardings.params["embed"]["embedding"].spec

    assert embedding_spec() == jax.sharding.PartitionSpec("model", None)
    config.mesh.axis_rules = (("vocab", None),)
    assert embedding_spec() == jax.sharding.PartitionSpec(None, None)
    assert sharding.logical_to_spec(("vocab",)) == jax.sharding.PartitionSpec("model")  # outside
    config.mesh.axis_rules = (("vocab", "tensor"),)
    with pytest.raises(sharding.ShardingError, match="'tensor', which is not a mesh axis"):
        sharding.axis_rules(config)
