"""Grouped matmul for dropless MoE on Hopper GPUs, with its own VJP.

Rows of x are sorted by expert; expert g owns `group_sizes[g]` consecutive rows and multiplies
them by w[g]. Forward and the input gradient use jax's Pallas Mosaic-GPU `ragged_dot` kernel
(the latter with the weights transposed in-kernel); the weight gradient uses its
`transposed_ragged_dot` kernel (x_g^T dy_g per group). `jax.lax.ragged_dot` computes the same
thing everywhere else, but XLA lowers it to a dense masked matmul on GPU (out of memory at
GLaM shapes: docs/moe_reference.md section 6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Tile sizes (rows, cols, reduction), pipeline depth and column-grid grouping, tuned on an H200
# at the GLaM-1.7B expert shapes with `experiments/bench.py --what=gmm_tune` (2026-11-26).
FORWARD_TILES = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=6, grid_block_n=4)
INPUT_GRAD_TILES = dict(
    block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=4
)
WEIGHT_GRAD_TILES = dict(
    block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=4
)


def unsupported_reason(w_emh: jax.Array | None = None, width: int | None = None) -> str | None:
    """None where the kernels can run (on weights w [G, M, H] if given), else why not.

    width: what the expert widths must be multiples of (default: these kernels' tiles).
    """
    try:
        device = jax.devices()[0]
        if device.platform != "gpu":
            return f"the backend is {device.platform}, not a GPU"
        major = int(str(getattr(device, "compute_capability", "0")).split(".")[0])
        from jax.experimental.pallas.ops.gpu import (  # noqa: F401
            ragged_dot_mgpu,
            transposed_ragged_dot_mgpu,
        )
    except Exception as err:  # noqa: BLE001 - any import/device problem means: not available
        return f"jax's Mosaic-GPU kernels are unavailable ({type(err).__name__})"
    if major < 9:
        return f"the GPU is sm_{major}x, the kernels need Hopper (sm_90) or newer"
    if w_emh is not None:
        if w_emh.dtype not in (jnp.bfloat16, jnp.float16):
            return f"the expert weights are {w_emh.dtype}, the kernels take bfloat16/float16"
        tile = width or max(FORWARD_TILES["block_n"], WEIGHT_GRAD_TILES["block_m"])
        if any(d % tile for d in w_emh.shape[1:]):
            return f"expert widths {tuple(w_emh.shape[1:])} are not multiples of {tile}"
    return None


def available() -> bool:
    """True on a Hopper-class (sm_90+) NVIDIA GPU with jax's Mosaic-GPU kernels importable."""
    return unsupported_reason() is None


def _ragged(x, w, group_sizes, transpose_rhs=False):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    tiles = INPUT_GRAD_TILES if transpose_rhs else FORWARD_TILES
    return ragged_dot_mgpu.ragged_dot(
        x, w, group_sizes=group_sizes, transpose_rhs=transpose_rhs, **tiles
    )


def _weight_grad(x, dy, group_sizes):
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    return transposed_ragged_dot_mgpu.transposed_ragged_dot(
        x, dy, group_sizes=group_sizes, **WEIGHT_GRAD_TILES
    )


@jax.custom_vjp
def grouped_matmul(x_nk: jax.Array, w_gkm: jax.Array, group_sizes_g: jax.Array) -> jax.Array:
    """y[rows of group g] = x[rows of group g] @ w[g]; x [N, K], w [G, K, M] -> y [N, M]."""
    return _ragged(x_nk, w_gkm, group_sizes_g.astype(jnp.int32))


def _forward(x_nk, w_gkm, group_sizes_g):
    return grouped_matmul(x_nk, w_gkm, group_sizes_g), (x_nk, w_gkm, group_sizes_g)


def _backward(residuals, dy_nm):
    x_nk, w_gkm, group_sizes_g = residuals
    gs = group_sizes_g.astype(jnp.int32)
    dy_nm = dy_nm.astype(x_nk.dtype)
    dx_nk = _ragged(dy_nm, w_gkm, gs, transpose_rhs=True)  # dy_g @ w_g^T
    dw_gkm = _weight_grad(x_nk, dy_nm, gs)  # x_g^T @ dy_g
    return dx_nk, dw_gkm.astype(w_gkm.dtype), None


grouped_matmul.defvjp(_forward, _backward)
