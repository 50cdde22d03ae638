"""Moving rows between buffers with gathers both ways, never scatters.

A scatter-add of [rows, M] on a GPU is atomics; every row move of the MoE layer (into the
experts' buffer, across devices and back) knows its inverse, so its gradient can be a gather
and a sum instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def gather_rows(x_nm: jax.Array, index_i: jax.Array, inverse_nc: jax.Array) -> jax.Array:
    """x[index] -> [I, M], where index == N gives a zero row.

    inverse_nc lists for each row n of x the positions i with index[i] == n (padded with I),
    so the gradient is a gather and a sum too, not a scatter-add (atomics on a GPU).
    """
    return jnp.take(x_nm, index_i, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(x_nm, index_i, inverse_nc):
    return gather_rows(x_nm, index_i, inverse_nc), inverse_nc


def _gather_rows_bwd(inverse_nc, dy_im):
    dx_ncm = jnp.take(dy_im, inverse_nc, axis=0, mode="fill", fill_value=0)
    return jnp.sum(dx_ncm, axis=1, dtype=dy_im.dtype), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def inverse_permutation(order_p: jax.Array) -> jax.Array:
    """The permutation undoing `order_p`: P integers scattered to distinct places (as
    block_grouped_matmul.block_layout inverts its order), cheaper than sorting them again."""
    (p,) = order_p.shape
    positions = jnp.arange(p, dtype=order_p.dtype)
    return jnp.zeros_like(order_p).at[order_p].set(positions, unique_indices=True)
