"""The MoE feed-forward layer as a pipeline: parameters -> route -> dispatch -> statistics.

Which router and which dispatch path run is chosen by `config.moe.router` (looked up in
`routers.ROUTERS`) and `config.moe.dispatch` (`dispatch.dispatch`); this module only owns the
parameters and passes values from one stage to the next.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glam_jax.layers import constrain, dtype_of, param_with_axes
from glam_jax.moe import dispatch as dispatch_lib
from glam_jax.moe import routers
from glam_jax.moe.capacity import MoEError, expert_capacity, group_tokens
from glam_jax.sharding import logical_axis_size

ROUTER_AXES = ("embed", None)  # router matrices [M, E]: replicated over experts
# The variable collection of the auxiliary-loss-free balancing bias: state, not a parameter
# (no gradient, not seen by the optimizer), carried in TrainState.model_state. Its [E] vector
# is replicated like the router matrix: it is added to the router scores, whose expert axis is
# replicated, so sharding it over experts would only add a gather.
STATE_COLLECTION = "moe_state"
BIAS_AXES = (None,)


class MoE(nn.Module):
    """Top-k sparse FFN: returns the combined expert outputs and a dict of routing stats.

    Token-choice routers also `sow` ('intermediates', 'routing') = (expert ids, combine
    weights), each [G, T, k], for glam_jax/analysis; nothing is stored unless asked for.
    """

    config: Any  # FrozenConfigDict of the whole run config
    train: bool = False

    @nn.compact
    def __call__(self, x_btm: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [B, S, M] -> (y [B, S, M], per-layer losses and metrics)."""
        mc, moe = self.config.model, self.config.moe
        b, s, m = x_btm.shape
        g, t = group_tokens(b * s, moe.group_size, logical_axis_size("group"))
        x_gtm = constrain(x_btm.reshape(g, t, m), ("group", "tokens", "embed"))
        spec = routers.get_router(moe.router)

        # ---- parameters (router float32, replicated over experts; experts stacked) ----
        router_init = nn.initializers.variance_scaling(
            moe.router_init_scale, "fan_in", "truncated_normal"
        )
        w_router = param_with_axes(
            self, "router", router_init, (m, moe.num_experts), jnp.float32, ROUTER_AXES
        )
        xr_gtm = self._router_input(x_gtm)
        rng = self.make_rng("routing") if self.train else None
        experts = self._experts(m)
        bias = self._choice_bias()
        extra = {
            p.name: param_with_axes(
                self, p.name, p.init, (m, moe.num_experts), jnp.float32, ROUTER_AXES
            )
            for p in spec.params
        }

        # ---- route ----
        cf = moe.capacity_factor_train if self.train else moe.capacity_factor_eval
        capacity = expert_capacity(
            t, moe.num_experts, moe.num_selected, cf, moe.capacity_convention, moe.min_capacity
        )
        routing = spec.fn(
            routers.RouterInputs(
                logits_gte=jnp.einsum("gtm,me->gte", xr_gtm, w_router),
                x_gtm=xr_gtm,
                params=extra,
                num_selected=moe.num_selected,
                capacity=capacity,
                rng=rng,
                train=self.train,
                options=moe,
                sequence_length=s,
                choice_bias_e=None if bias is None else bias.value,
            )
        )

        if isinstance(routing, routers.Routing):
            # For glam_jax/analysis: each token's k expert ids and combine weights, [G, T, k].
            # A no-op unless apply() makes 'intermediates' mutable, so training is unchanged.
            self.sow("intermediates", "routing", (routing.expert_index, routing.combine_weights))

        # ---- dispatch ----
        options = dispatch_lib.DispatchOptions(
            path=moe.dispatch,
            capacity=capacity,
            ragged_matmul=moe.ragged_matmul,
            fused_glu=moe.fused_glu,
            gate_norm=moe.gate_norm,
        )
        out = dispatch_lib.dispatch(x_gtm.astype(dtype_of(mc.dtype)), routing, experts, options)

        # ---- statistics (and the balancing bias's update from this step's load) ----
        y_btm = constrain(out.y_gtm.reshape(b, s, m), ("batch", "length", "embed"))
        stats = statistics(routing, out, (b, s))
        if bias is not None:
            stats["expert_bias"] = bias.value
            if self.train and self.is_mutable_collection(STATE_COLLECTION):
                bias.value = updated_bias(
                    bias.value, out.expert_load_e, moe.expert_bias_update_rate
                )
        return y_btm, stats

    def _choice_bias(self):
        """The [E] balancing-bias variable (moe.expert_bias_update_rate > 0), else None."""
        moe = self.config.moe
        if moe.expert_bias_update_rate <= 0:
            return None
        if not self.is_initializing() and not self.has_variable(STATE_COLLECTION, "expert_bias"):
            raise MoEError(
                f"moe.expert_bias_update_rate={moe.expert_bias_update_rate} routes with a learned "
                f"expert bias, but the model was applied without its {STATE_COLLECTION!r} "
                "collection; pass the train state's model_state beside the params."
            )
        init = nn.with_logical_partitioning(jnp.zeros, BIAS_AXES)
        return self.variable(STATE_COLLECTION, "expert_bias", init, (moe.num_experts,), jnp.float32)

    def _router_input(self, x_gtm: jax.Array) -> jax.Array:
        """x in float32, with Switch's multiplicative jitter while training."""
        xr_gtm = x_gtm.astype(jnp.float32)
        eps = self.config.moe.router_jitter
        if self.train and eps > 0:
            xr_gtm = xr_gtm * jax.random.uniform(
                self.make_rng("routing"), xr_gtm.shape, minval=1.0 - eps, maxval=1.0 + eps
            )
        return xr_gtm

    def _experts(self, m: int) -> dispatch_lib.Experts:
        """The stacked expert weights [E, ...] with their logical axes, cast for compute."""
        mc, moe = self.config.model, self.config.moe
        dtype, param_dtype = dtype_of(mc.dtype), dtype_of(mc.param_dtype)
        e, h = moe.num_experts, moe.expert_mlp_dim or mc.mlp_dim
        init = nn.initializers.normal(mc.init_std)
        axes_in, axes_out = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
        wi0 = param_with_axes(self, "wi_0", init, (e, m, h), param_dtype, axes_in)
        wi1 = None
        if mc.ffn_glu:
            wi1 = param_with_axes(self, "wi_1", init, (e, m, h), param_dtype, axes_in)
        wo = param_with_axes(self, "wo", init, (e, h, m), param_dtype, axes_out)
        return dispatch_lib.Experts(
            wi_0=wi0.astype(dtype),
            wi_1=None if wi1 is None else wi1.astype(dtype),
            wo=wo.astype(dtype),
            activation=mc.ffn_activation,
            hidden_fn=self._expert_dropout(),
            exchange=moe.expert_exchange,
        )

    def _expert_dropout(self):
        """Switch-style dropout inside the experts (fine-tuning), or None."""
        rate = self.config.moe.expert_dropout
        if not self.train or rate <= 0:
            return None
        rng = self.make_rng("dropout")

        def drop(h, salt=0):  # salt: the device index where h is one device's share
            keep = jax.random.bernoulli(jax.random.fold_in(rng, salt), 1.0 - rate, h.shape)
            return jnp.where(keep, h / (1.0 - rate), 0.0).astype(h.dtype)

        return drop


def updated_bias(bias_e: jax.Array, load_e: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3 (section 2.1.2): b_e += rate * sign(mean load - load_e), from the step's
    load (share of dispatched pairs per expert; no gradient flows through it)."""
    load_e = jax.lax.stop_gradient(load_e)
    return bias_e + rate * jnp.sign(jnp.mean(load_e) - load_e)


def statistics(
    routing: routers.Routing | routers.ExpertChoiceRouting,
    out: dispatch_lib.Dispatched,
    batch_shape: tuple[int, int],
) -> dict[str, jax.Array]:
    """The per-layer losses and metrics every router reports, whatever the dispatch path."""
    probs = routing.probs
    entropy = -jnp.mean(jnp.sum(probs * jnp.log(probs + 1e-9), axis=-1))
    return dict(
        aux_loss=routing.aux_loss,
        z_loss=routing.z_loss,
        importance_loss=routing.importance_loss,
        load_loss=routing.load_loss,
        sequence_aux_loss=routing.sequence_aux_loss,
        expert_load=out.expert_load_e,
        dropped_fraction=out.dropped_fraction,
        router_entropy=entropy,
        top1=jnp.argmax(probs, axis=-1).reshape(batch_shape).astype(jnp.int32),
    )
