"""The MoE feed-forward layer: router weights, stacked expert weights, routing, dispatch, stats.

Which router and which dispatch path run is chosen by `config.moe.router` and
`config.moe.dispatch`; the maths lives in `routing.py` and `dispatch.py`, this module only
owns parameters and glues the pieces together.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glam_jax import dispatch as dispatch_lib
from glam_jax import routing
from glam_jax.errors import GlamError
from glam_jax.layers import constrain, dtype_of, param_with_axes
from glam_jax.sharding import logical_axis_size


class MoEError(GlamError):
    """A routing-group or capacity problem, reported in one sentence."""


def group_tokens(num_tokens: int, group_size: int, num_shards: int = 1) -> tuple[int, int]:
    """(G, T): groups of `group_size` tokens, never spanning two batch shards.

    A group is at most one shard's tokens, so G splits evenly over the devices that hold the
    batch (GShard: routing is local to a device's tokens).
    """
    per_shard = num_tokens // num_shards
    t = min(group_size, per_shard)
    if per_shard % t:
        raise MoEError(
            f"moe.group_size={group_size} must divide the {per_shard} tokens each of the "
            f"{num_shards} batch shards holds (rows x length / shards); pick a divisor of it."
        )
    return num_tokens // t, t


class MoE(nn.Module):
    """Top-k sparse FFN: returns the combined expert outputs and a dict of routing stats."""

    config: Any  # FrozenConfigDict of the whole run config
    train: bool = False

    @nn.compact
    def __call__(self, x_btm: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        mc, moe = self.config.model, self.config.moe
        dtype, param_dtype = dtype_of(mc.dtype), dtype_of(mc.param_dtype)
        b, s, m = x_btm.shape
        e, k = moe.num_experts, moe.num_selected
        h = moe.expert_mlp_dim or mc.mlp_dim
        g, t = group_tokens(b * s, moe.group_size, logical_axis_size("group"))
        x_gtm = constrain(x_btm.reshape(g, t, m), ("group", "tokens", "embed"))

        # ---- router (float32, replicated over experts) ----
        router_init = nn.initializers.variance_scaling(
            moe.router_init_scale, "fan_in", "truncated_normal"
        )
        w_router = param_with_axes(
            self, "router", router_init, (m, e), jnp.float32, ("embed", None)
        )
        xr_gtm = x_gtm.astype(jnp.float32)
        if self.train and moe.router_jitter > 0:
            eps = moe.router_jitter
            xr_gtm = xr_gtm * jax.random.uniform(
                self.make_rng("routing"), xr_gtm.shape, minval=1.0 - eps, maxval=1.0 + eps
            )
        logits_gte = jnp.einsum("gtm,me->gte", xr_gtm, w_router)
        rng = self.make_rng("routing") if self.train else None
        cf = moe.capacity_factor_train if self.train else moe.capacity_factor_eval
        capacity = dispatch_lib.expert_capacity(
            t, e, k, cf, moe.capacity_convention, moe.min_capacity
        )

        init = nn.initializers.normal(mc.init_std)
        axes_in, axes_out = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
        wi0 = param_with_axes(self, "wi_0", init, (e, m, h), param_dtype, axes_in)
        wi1 = (
            param_with_axes(self, "wi_1", init, (e, m, h), param_dtype, axes_in)
            if mc.ffn_glu
            else None
        )
        wo = param_with_axes(self, "wo", init, (e, h, m), param_dtype, axes_out)
        experts = dispatch_lib.Experts(
            wi_0=wi0.astype(dtype),
            wi_1=None if wi1 is None else wi1.astype(dtype),
            wo=wo.astype(dtype),
            activation=mc.ffn_activation,
            hidden_fn=self._expert_dropout(),
            exchange=moe.expert_exchange,
        )
        x_gtm = x_gtm.astype(dtype)

        if moe.router == "expert_choice":
            r = routing.expert_choice(logits_gte, capacity)
            path = {
                "einsum": dispatch_lib.expert_choice_einsum,
                "sort": dispatch_lib.expert_choice_sort,
            }
            y_gtm = path[moe.dispatch](x_gtm, r.token_index, r.combine_weights, experts)
            chosen_gt = jnp.zeros((g, t), jnp.float32)
            chosen_gt = jax.vmap(lambda c, idx: c.at[idx].add(1.0))(
                chosen_gt, r.token_index.reshape(g, -1)
            )
            load_e = jnp.full((e,), 1.0 / e)
            dropped = jnp.mean((chosen_gt == 0).astype(jnp.float32))
            losses = dict(aux_loss=r.aux_loss, z_loss=r.z_loss)
            losses.update(importance_loss=jnp.zeros(()), load_loss=jnp.zeros(()))
        else:
            r = self._route(logits_gte, xr_gtm, rng, k)
            mask_gtk = r.dispatch_mask
            if moe.dispatch == "dropless":
                y_gtm = dispatch_lib.dropless_dispatch(
                    x_gtm,
                    r.expert_index,
                    r.combine_weights,
                    mask_gtk,
                    experts,
                    moe.ragged_matmul,
                    moe.fused_glu,
                )
                kept_gtk = mask_gtk
            else:
                position_gtk, kept_gtk = dispatch_lib.assign_slots(
                    r.expert_index, mask_gtk, e, capacity
                )
                path = {"einsum": dispatch_lib.einsum_dispatch, "sort": dispatch_lib.sort_dispatch}
                y_gtm = path[moe.dispatch](
                    x_gtm,
                    r.expert_index,
                    r.combine_weights,
                    kept_gtk,
                    position_gtk,
                    experts,
                    capacity,
                )
            onehot_gtke = jax.nn.one_hot(r.expert_index, e, dtype=jnp.float32)
            sent = mask_gtk.astype(jnp.float32)
            load_e = jnp.einsum("gtke,gtk->e", onehot_gtke, sent) / jnp.maximum(jnp.sum(sent), 1.0)
            # (sent - kept) / sent, not 1 - kept / sent: exactly 0 when nothing drops
            dropped = (jnp.sum(sent) - jnp.sum(kept_gtk)) / jnp.maximum(jnp.sum(sent), 1.0)
            losses = dict(
                aux_loss=r.aux_loss,
                z_loss=r.z_loss,
                importance_loss=r.importance_loss,
                load_loss=r.load_loss,
            )

        probs = r.probs
        entropy = -jnp.mean(jnp.sum(probs * jnp.log(probs + 1e-9), axis=-1))
        stats = dict(
            losses,
            expert_load=load_e,
            dropped_fraction=dropped,
            router_entropy=entropy,
            top1=jnp.argmax(probs, axis=-1).reshape(b, s).astype(jnp.int32),
        )
        y_btm = constrain(y_gtm.reshape(b, s, m), ("batch", "length", "embed"))
        return y_btm, stats

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

    def _route(self, logits_gte, xr_gtm, rng, k) -> routing.Routing:
        moe = self.config.moe
        if moe.router == "gshard_top2":
            return routing.gshard_top2(
                logits_gte, rng=rng, train=self.train, second_expert_policy=moe.second_expert_policy
            )
        if moe.router == "switch_top1":
            return routing.switch_top1(logits_gte)
        if moe.router == "topk_softmax":
            return routing.topk_softmax(logits_gte, k)
        if moe.router == "noisy_topk":
            w_noise = param_with_axes(
                self,
                "router_noise",
                nn.initializers.zeros,
                (xr_gtm.shape[-1], logits_gte.shape[-1]),
                jnp.float32,
                ("embed", None),
            )
            noise_std = jax.nn.softplus(jnp.einsum("gtm,me->gte", xr_gtm, w_noise))
            if not moe.noisy_gating:
                noise_std = jnp.zeros_like(noise_std)
            return routing.noisy_topk(logits_gte, noise_std, k, rng=rng, train=self.train)
        raise MoEError(f"moe.router={moe.router!r} is not valid; valid: {routing.ROUTERS}.")
