"""Train state created already sharded, the loss, and the jitted train/eval steps.

Pure functions of (config, model, optimizer, mesh); the training loop in `train.py` only calls
them. Shardings come from the parameters' logical axis names through `glam_jax.sharding`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glam_jax import losses, sharding
from glam_jax.layers import dtype_of
from glam_jax.model import Transformer, cast_for_compute, frozen
from glam_jax.moe.layer import STATE_COLLECTION
from glam_jax.optim import learning_rate_schedule

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights", "target_chars")
# Variable collections besides 'params' that training carries and updates (never by gradient):
# the MoE layers' auxiliary-loss-free balancing bias. Absent from the model when it is off.
MODEL_STATE_COLLECTIONS = (STATE_COLLECTION,)


@struct.dataclass
class TrainState:
    """Everything a checkpoint needs besides the data-iterator state."""

    step: jax.Array  # int32 scalar
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2]; per-step keys are fold_in(rng, step), so resumes are exact
    # Steps whose update was skipped: all of them, and how many in a row up to this step.
    nonfinite_steps: jax.Array  # int32 scalar
    nonfinite_streak: jax.Array  # int32 scalar; >= train.max_nonfinite_steps stops the run
    # Non-parameter variables {collection: tree} (MODEL_STATE_COLLECTIONS), {} when the model
    # has none: updated inside the step by the model itself, checkpointed like the params.
    model_state: Any = struct.field(default_factory=dict)


def build_model(config: ml_collections.ConfigDict) -> Transformer:
    """The Transformer of `config` (frozen, so modules can hash it)."""
    return Transformer(frozen(config))


def _dummy_inputs(config) -> jax.Array:
    return jnp.zeros((1, config.train.seq_len), jnp.int32)


def abstract_boxed_params(model: Transformer, config) -> Any:
    """Parameter shapes with their logical-axis boxes, without allocating anything."""
    return abstract_boxed_variables(model, config)["params"]


def abstract_boxed_variables(model: Transformer, config) -> Any:
    """Shapes of every variable collection (params and model state), boxed, no allocation."""
    return jax.eval_shape(
        lambda rng: model.init({"params": rng}, _dummy_inputs(config)), jax.random.PRNGKey(0)
    )


def split_variables(variables) -> tuple[Any, dict]:
    """model.init's variables -> (params, model_state of MODEL_STATE_COLLECTIONS)."""
    state = {c: variables[c] for c in MODEL_STATE_COLLECTIONS if c in variables}
    return variables["params"], state


def model_variables(params, model_state: dict | None) -> dict:
    """The variables model.apply takes: params and the model state (may be empty)."""
    return {"params": params, **(model_state or {})}


def param_partition_specs(model: Transformer, config) -> Any:
    """PartitionSpec of every parameter (same tree as the unboxed params)."""
    return sharding.logical_specs(abstract_boxed_params(model, config))


def _opt_leaf_spec(leaf, param, spec: PartitionSpec) -> PartitionSpec:
    """An optimizer-state leaf shares its parameter's spec; factored moments drop one axis."""
    spec = tuple(spec) + (None,) * (param.ndim - len(tuple(spec)))
    if leaf.shape == param.shape:
        return PartitionSpec(*spec)
    if leaf.shape == param.shape[:-1]:  # Adafactor row statistics
        return PartitionSpec(*spec[:-1])
    if leaf.shape == param.shape[:-2] + param.shape[-1:]:  # Adafactor column statistics
        return PartitionSpec(*(spec[:-2] + spec[-1:]))
    return PartitionSpec()


def opt_state_specs(abstract_opt_state, abstract_params, p_specs) -> Any:
    """Specs for optimizer state: each per-parameter subtree mirrors the parameter tree."""
    params_def = jax.tree.structure(abstract_params)
    flat_params = params_def.flatten_up_to(abstract_params)
    flat_specs = params_def.flatten_up_to(p_specs)

    def is_param_tree(x):
        try:
            return jax.tree.structure(x) == params_def
        except Exception:  # noqa: BLE001 - odd leaves are simply not parameter trees
            return False

    def specs_for(sub):
        if is_param_tree(sub):
            leaves = params_def.flatten_up_to(sub)
            return params_def.unflatten(
                [
                    _opt_leaf_spec(lf, p, s)
                    for lf, p, s in zip(leaves, flat_params, flat_specs, strict=True)
                ]
            )
        return jax.tree.map(lambda _: PartitionSpec(), sub)

    return jax.tree.map(specs_for, abstract_opt_state, is_leaf=is_param_tree)


def create_train_state(
    config, model: Transformer, tx: optax.GradientTransformation, mesh: Mesh
) -> tuple[TrainState, TrainState]:
    """Initialises params and optimizer state directly into their shardings on `mesh`.

    Returns (state, state_shardings).
    """

    init_fn = make_init_fn(config, model, tx)
    rng = jax.random.PRNGKey(config.seed)
    abstract, shardings = abstract_state(config, model, tx, mesh)
    with sharding.use_mesh(mesh):
        state = jax.jit(init_fn, out_shardings=shardings)(rng)
    return state, shardings


def make_init_fn(config, model: Transformer, tx: optax.GradientTransformation) -> Callable:
    """rng -> fresh TrainState (params from `rng`, per-step keys from config.seed + 1)."""

    def init_fn(rng):
        params, model_state = split_variables(
            nn.unbox(model.init({"params": rng}, _dummy_inputs(config)))
        )
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.PRNGKey(config.seed + 1),
            nonfinite_steps=jnp.zeros((), jnp.int32),
            nonfinite_streak=jnp.zeros((), jnp.int32),
            model_state=model_state,
        )

    return init_fn


def abstract_state(
    config, model: Transformer, tx: optax.GradientTransformation, mesh: Mesh
) -> tuple[TrainState, TrainState]:
    """(ShapeDtypeStructs carrying their shardings, shardings) of the train state; no allocation."""
    with sharding.use_mesh(mesh):
        shapes = jax.eval_shape(make_init_fn(config, model, tx), jax.random.PRNGKey(0))
        shardings = state_shardings(config, model, shapes, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )
    return abstract, shardings


def state_shardings(config, model: Transformer, abstract: TrainState, mesh: Mesh) -> TrainState:
    """NamedShardings for every leaf of the train state."""
    params_boxed, state_boxed = split_variables(abstract_boxed_variables(model, config))
    p_specs = sharding.logical_specs(params_boxed)
    o_specs = opt_state_specs(abstract.opt_state, abstract.params, p_specs)
    specs = TrainState(
        step=PartitionSpec(),
        params=p_specs,
        opt_state=o_specs,
        rng=PartitionSpec(),
        nonfinite_steps=PartitionSpec(),
        nonfinite_streak=PartitionSpec(),
        model_state=sharding.logical_specs(state_boxed),
    )
    return sharding.named_shardings(mesh, specs)


def loss_and_metrics(
    params,
    batch,
    rng,
    model: Transformer,
    config,
    train: bool,
    objective: Callable | None = None,
    model_state: dict | None = None,
):
    """Total loss = CE + logits z-loss + weighted MoE losses; also returns metrics.

    objective(logits_btv, ce, weights_bt, denom) -> (token objective, extra metrics) replaces
    the CE term of the total (distillation mixes it with a soft CE against a teacher); None
    keeps the plain CE. model_state: the TrainState's non-parameter variables; in training the
    model updates them and metrics['model_state'] holds the new values (the step takes them out).
    """
    moe, tc = config.moe, config.train
    rngs = {}
    if rng is not None:
        r_route, r_drop = jax.random.split(rng)
        rngs = {"routing": r_route, "dropout": r_drop}
    compute_params = cast_for_compute(params, dtype_of(config.model.dtype))
    mutable = list(model_state) if train and model_state else False
    out = model.apply(
        model_variables(compute_params, model_state),
        batch["inputs"],
        batch["segment_ids"],
        batch["positions"],
        train=train,
        rngs=rngs,
        mutable=mutable,
    )
    (logits, stats), new_state = out if mutable else (out, None)
    weights = batch["weights"].astype(jnp.float32)
    nll_bt, logz_bt = losses.cross_entropy(logits, batch["targets"], weights)
    denom = jnp.maximum(jnp.sum(weights), 1.0)
    ce = jnp.sum(nll_bt) / denom
    logits_z = jnp.sum(jnp.square(logz_bt) * weights) / denom
    token_objective, extra = (
        (ce, {}) if objective is None else objective(logits, ce, weights, denom)
    )
    loss = (
        token_objective
        + tc.logits_z_loss_weight * logits_z
        + moe.aux_loss_weight * stats["aux_loss"]
        + moe.z_loss_weight * stats["z_loss"]
        + moe.importance_loss_weight * stats["importance_loss"]
        + moe.load_loss_weight * stats["load_loss"]
        + moe.sequence_aux_loss_weight * stats["sequence_aux_loss"]
    )
    metrics = dict(stats, loss=loss, ce_loss=ce, logits_z_loss=logits_z, **extra)
    metrics["nll_sum"] = jnp.sum(nll_bt)
    metrics["weight_sum"] = jnp.sum(weights)
    metrics["char_sum"] = jnp.sum(batch["target_chars"].astype(jnp.float32) * weights)
    if new_state is not None:
        metrics["model_state"] = dict(new_state)
    return loss, metrics


def make_train_step(
    config,
    model: Transformer,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    shardings: TrainState,
    *,
    loss_fn: Callable | None = None,
    aux_shardings: Any = None,
) -> Callable:
    """jit(state, batch) -> (state, metrics), state donated, batch split over data x expert.

    A step whose loss or gradient norm is not finite keeps the old parameters and optimizer
    state (a select over the update: no host sync; XLA fuses it into most updates, but not
    all: on the E=64 GLaM step six weight-sized selects cost 15 ms of 285, docs/performance.md)
    and counts in state.nonfinite_*. Once train.max_nonfinite_steps such steps come in a row, every
    later update is skipped too, so the state the loop finds at its next check (and refuses to
    save) is the one from before the run went bad.

    loss_fn(params, batch, rng, aux, model_state) -> (loss, metrics) replaces
    `loss_and_metrics`; with aux_shardings the step is jit(state, batch, aux) and passes `aux`
    (e.g. a frozen teacher's params) to loss_fn as a plain input: not donated, not
    differentiated, not updated. metrics['model_state'], where loss_fn returns it, becomes the
    new state.model_state (the expert bias, updated by the model from the step's routing; kept
    like the parameters when the step is skipped).
    """
    schedule_lr = learning_rate_schedule(config.train)
    max_streak = config.train.max_nonfinite_steps
    if loss_fn is None:

        def loss_fn(params, batch, rng, aux, model_state):
            del aux
            return loss_and_metrics(
                params, batch, rng, model, config, True, model_state=model_state
            )

    def train_step(state: TrainState, batch, aux=None):
        rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, metrics), grads = grad_fn(state.params, batch, rng, aux, state.model_state)
        model_state = metrics.pop("model_state", state.model_state)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.nonfinite_streak < max_streak)
        params, opt_state, model_state = jax.tree.map(
            lambda new, old: jnp.where(ok, new, old),
            (params, opt_state, model_state),
            (state.params, state.opt_state, state.model_state),
        )
        nonfinite_steps = state.nonfinite_steps + jnp.where(ok, 0, 1)
        nonfinite_streak = jnp.where(ok, 0, state.nonfinite_streak + 1)
        metrics["grad_norm"] = grad_norm
        metrics["learning_rate"] = schedule_lr(state.step)
        metrics["nonfinite_steps"] = nonfinite_steps
        metrics["nonfinite_streak"] = nonfinite_streak
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            nonfinite_steps=nonfinite_steps,
            nonfinite_streak=nonfinite_streak,
            model_state=model_state,
        )
        return new_state, metrics

    batch_shardings = {key: sharding.batch_sharding(mesh) for key in BATCH_KEYS}
    in_shardings = (shardings, batch_shardings)
    if aux_shardings is not None:
        in_shardings += (aux_shardings,)
    jitted = jax.jit(
        train_step,
        in_shardings=in_shardings,
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return _in_mesh(jitted, mesh)


def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of `tree` is finite (a jit-able reduction)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_eval_step(
    config, model: Transformer, mesh: Mesh, param_shardings, state_shardings=None
) -> Callable:
    """jit(params, batch, model_state=None) -> metrics summed over the batch (nll, weights,
    characters); model_state (TrainState.model_state, in state_shardings) is read, not updated."""

    def eval_step(params, batch, model_state):
        _, metrics = loss_and_metrics(
            params, batch, None, model, config, False, model_state=model_state
        )
        return metrics

    batch_shardings = {key: sharding.batch_sharding(mesh) for key in BATCH_KEYS}
    jitted = jax.jit(
        eval_step,
        in_shardings=(param_shardings, batch_shardings, state_shardings),
        out_shardings=sharding.replicated(mesh),
    )
    in_mesh = _in_mesh(jitted, mesh)
    return lambda params, batch, model_state=None: in_mesh(params, batch, model_state or {})


def _in_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """Calls (and so traces) fn with the mesh and logical rules active; keeps .lower()."""

    def wrapped(*args):
        with sharding.use_mesh(mesh):
            return fn(*args)

    def lower(*args):
        with sharding.use_mesh(mesh):
            return fn.lower(*args)

    wrapped.lower = lower
    return wrapped


@functools.lru_cache(maxsize=8)
def _process_row_share(mesh: Mesh) -> int:
    """How many ways the global batch is larger than one process's rows.

    The data pipeline gives process i of P rows [i*B/P, (i+1)*B/P) of each global batch, so the
    batch's row blocks on this process's devices must be exactly that contiguous share.
    """
    shard: NamedSharding = sharding.batch_sharding(mesh)
    blocks = sharding.data_parallel_size(mesh)  # row blocks of the batch, one per (data, expert)
    index_map = shard.addressable_devices_indices_map((blocks, 1))
    held = sorted({index[0].start or 0 for index in index_map.values()})
    p, count = jax.process_index(), jax.process_count()
    if held != list(range(p * len(held), (p + 1) * len(held))) or len(held) * count != blocks:
        raise sharding.ShardingError(
            f"process {p} of {count} holds batch row blocks {held} of {blocks} (mesh "
            f"{dict(mesh.shape)}), but the input pipeline feeds each process an equal contiguous "
            "share in process order; split the batch (data x expert) over all processes."
        )
    return count


def global_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's numpy rows -> global jax arrays split over data x expert.

    Each process passes only its own rows (its share, in process order); the global batch has
    process_count times as many.
    """
    shard: NamedSharding = sharding.batch_sharding(mesh)
    share = _process_row_share(mesh)
    return {
        key: jax.make_array_from_process_local_data(
            shard, batch[key], (batch[key].shape[0] * share, *batch[key].shape[1:])
        )
        for key in BATCH_KEYS
    }
