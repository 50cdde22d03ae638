"""Grouped matmul over block-aligned groups on Hopper GPUs (MegaBlocks-style layout).

Rows are sorted by expert and every expert's rows are padded to a multiple of `BLOCK_ROWS`, so
each row tile belongs to exactly one expert. The kernels then are plain warp-specialised GEMMs
(the structure of jax's `hopper_matmul_mgpu`: one TMA producer warpgroup, two wgmma consumer
warpgroups, a 128 x 256 tile) that look up their expert per row tile: no masking, no tile
computed twice at a group boundary. `jax.experimental.pallas.ops.gpu.ragged_dot_mgpu` instead
lets a tile straddle two groups and computes it once per group, which at 64 experts and 512
rows each costs ~25% extra work; the padding here costs half of that on average and nothing
when groups are already multiples of the block.

Three kernels, all bfloat16/float16 in, same dtype out, float32 accumulation:
- `tile_matmul(x, w, tile_expert, num_used_tiles)`: rows of tile t times w[tile_expert[t]]
- the same with `transpose_w=True`: dy @ w[e]^T (the input gradient)
- `expert_weight_grad(x, dy, expert_start, expert_blocks)`: x_e^T @ dy_e per expert (the
  weight gradient), reducing over the expert's padded rows (a dynamic pipeline length).
and for gated FFNs (GLaM's gated GELU, SwiGLU), which otherwise need an element-wise pass over
both [R, H] products each way:
- `glu_matmul(x, w0, w1, ...)`: gate, up and h = act(gate) * up from one kernel (the
  activation computed from the float32 accumulators in the epilogue)
- `glu_input_grad(d_gate, d_up, w0, w1, ...)`: d_gate @ w0[e]^T + d_up @ w1[e]^T
- `expert_weight_grad(x, (d_gate, d_up), ...)`: both weight gradients, sharing the x tiles.
Row tiles past `num_used_tiles` (the unused tail of the static buffer) are skipped and their
output rows left undefined. `block_matmul(x, w, layout)` and `glu_block_matmul(x, w0, w1,
layout, activation)` are the differentiable ops built from them; `block_layout` places
token-expert pairs in the buffer, and the `*_xla` twins compute the same functions through
`jax.lax.ragged_dot` (any backend).
On an H100 the three run at 0.77x cuBLAS on the same useful FLOPs at 64 experts x 512 rows
and 0.91x at 8 experts x 8192 rows (docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

BLOCK_ROWS = 128  # row tile of every kernel = the alignment of each expert's rows
# Gated FFNs: hidden units per CTA in the fused kernels, which accumulate the gate and up
# products (or their two weight gradients) of the same units side by side, each consumer
# warpgroup for WG_ROWS rows.
GLU_UNITS = 128
WG_ROWS = BLOCK_ROWS // 2


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile shape and pipeline depth of a warp-specialised kernel (rows are BLOCK_ROWS).

    The defaults were the fastest of those tried on an H100 at GLaM-1.7B expert shapes: three
    pipeline stages, tile_k=32, tile_n=64 and grid_tile_widths of 1, 2, 3, 8 or 16 were slower
    (or, for one kernel, under 1% faster), and cluster=2 gave nothing measurable in the MoE
    step.
    """

    tile_n: int = 128  # columns per consumer warpgroup (the CTA computes 2 x tile_n)
    tile_k: int = 64
    max_concurrent_steps: int = 4
    epi_tile_n: int = 64
    epi_tile_m: int = 64
    grid_tile_width: int = 4  # column tiles walked together before moving down the rows
    cluster: int = 1  # 2: CTA pairs on neighbouring column tiles share (multicast) x tiles


FORWARD = Tiles()
INPUT_GRAD = Tiles()
WEIGHT_GRAD = Tiles()
# Each step holds two gradient and two weight blocks: half the steps in flight fit SMEM.
GLU_INPUT_GRAD = Tiles(max_concurrent_steps=2)


def _transforms(minor_elems: int, dtype):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    swizzle = plgpu.find_swizzle(minor_elems * jnp.dtype(dtype).itemsize * 8)
    swizzle_elems = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(swizzle))


def _require_16bit(kernel: str, a: jax.Array, b: jax.Array) -> None:
    if a.dtype != b.dtype or a.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"{kernel} takes two bfloat16 or two float16 arrays, got {a.dtype}, {b.dtype}."
        )


def _grid(cluster: int) -> dict:
    """A persistent grid of one CTA (or one cluster of `cluster` CTAs) per group of SMs."""
    num_sms = jax.devices()[0].core_count
    return dict(
        grid=(num_sms // cluster,),
        grid_names=("cluster_grid",),
        cluster=(cluster,),
        cluster_names=("cluster",),
    )


def _pipeline(body, context, steps, specs, transforms, tiles: Tiles):
    """The pipeline every kernel here runs: a TMA producer warpgroup feeding two wgmma consumers.

    specs: (block shape, index map, multicast) per input; with tiles.cluster > 1 a multicast
    input is loaded once for the CTAs of a cluster, which share it.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(steps,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec(
                block,
                index,
                transforms=transforms,
                memory_space=plgpu.SMEM,
                collective_axes=("cluster",) if multicast and tiles.cluster > 1 else (),
            )
            for block, index, multicast in specs
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=tiles.max_concurrent_steps,
        compute_context=context,
    )


def _store(tile, out_smem, out_ref):
    """A finished tile (registers, output dtype) -> out_ref in (epi_m, epi_n) pieces through
    two SMEM slots (TMA stores)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    epi_m, epi_n = out_smem.shape[-2:]
    tile_m, tile_n = tile.shape
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for i in range(tile_m // epi_m):
        for j in range(tile_n // epi_n):
            rows = slice(i * epi_m, (i + 1) * epi_m)
            cols = slice(j * epi_n, (j + 1) * epi_n)
            slot = (i * (tile_n // epi_n) + j) % out_smem.shape[0]
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            out_smem[slot] = tile[rows, cols]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[slot], out_ref.at[rows, cols])


# Activations as the epilogue computes them (float32, primitives Mosaic GPU lowers); the same
# functions as glam_jax.layers.activation_fn (tests/test_block_dispatch.py checks).
_SQRT_2_OVER_PI = 0.7978845608028654
EPILOGUE_ACTIVATIONS = {
    "gelu": lambda x: 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * (x * x * x)))),
    "silu": lambda x: x / (1.0 + jnp.exp(-x)),
    "relu": lambda x: jnp.maximum(x, 0.0),
}


def _row_tile_call(
    name: str,
    inputs: list[jax.Array],
    out_type,
    tile_expert_t: jax.Array,
    num_used_tiles: jax.Array,
    *,
    n_iters: int,
    k_iters: int,
    specs: list,
    views,
    acc_shapes: list[tuple[int, int]],
    mma,
    epilogue,
    tiles: Tiles,
):
    """The persistent kernel shared by the row-tile matmuls.

    Walks (row tile, column tile) pairs of the used row tiles; for each runs the K pipeline
    over `views(in_refs, expert, m_slice, ni)` (gmem windows, one per spec), calling
    mma(smem refs, acc refs, wg) per step on float32 accumulators of `acc_shapes` (per
    consumer warpgroup), then epilogue(acc values, wg, m_slice, ni, out refs, out_smem).
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    dtype = inputs[0].dtype
    epi_m, epi_n = tiles.epi_tile_m, tiles.epi_tile_n
    num_out_slots = 2
    in_transforms = _transforms(tiles.tile_k, dtype)
    out_transforms = _transforms(epi_n, dtype)

    def pipeline(body, context):
        return _pipeline(body, context, k_iters, specs, in_transforms, tiles)

    def kernel(tile_expert_gmem, num_used_gmem, *refs):
        in_refs, out_refs = refs[: len(inputs)], refs[len(inputs) :]
        ignore = lambda *_, **__: None  # noqa: E731 - allocations do not depend on the body

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(ignore, ignore).get_allocations(
                *views(in_refs, 0, pl.ds(0, BLOCK_ROWS), 0)
            ),
            out_smem=plgpu.SMEM((2, num_out_slots, epi_m, epi_n), dtype, transforms=out_transforms),
            collective_axes="wg",
        )
        def scope(allocs, out_smem):
            wg = lax.axis_index("wg")
            m_iters = num_used_gmem[0]

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="cluster_grid")
            def mn_loop(loop_info):
                (lin,) = loop_info.index
                mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1, tiles.grid_tile_width)
                ni = ni * tiles.cluster + lax.axis_index("cluster")
                m_slice = pl.ds(mi * BLOCK_ROWS, BLOCK_ROWS)

                def context(eval_pipeline):
                    def acc_scope(*acc_refs):
                        eval_pipeline(acc_refs)
                        values = [a[...] for a in acc_refs]
                        epilogue(values, wg, m_slice, ni, out_refs, out_smem.at[wg])

                    pl.run_scoped(acc_scope, *[plgpu.ACC(a, jnp.float32) for a in acc_shapes])

                def body(_, *smem_and_accs):
                    *smem, acc_refs = smem_and_accs
                    mma(smem, acc_refs, wg)
                    plgpu.wgmma_wait(0)
                    return acc_refs

                windows = views(in_refs, tile_expert_gmem[mi], m_slice, ni)
                pipeline(body, context)(*windows, allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel.__name__ = name  # how the kernel shows in profiles
    call = plgpu.kernel(
        kernel,
        out_type=out_type,
        **_grid(tiles.cluster),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    used = jnp.reshape(num_used_tiles, (1,)).astype(jnp.int32)
    return call(tile_expert_t.astype(jnp.int32), used, *inputs)


def _column_split_epilogue(tile_n: int, dtype):
    """Epilogue of a CTA whose two warpgroups each hold tile_n of its 2 x tile_n columns."""
    from jax.experimental import pallas as pl

    def epilogue(values, wg, m_slice, ni, outs, out_smem):
        cols = pl.ds((2 * ni + wg) * tile_n, tile_n)
        _store(values[0].astype(dtype), out_smem, outs[0].at[m_slice, cols])

    return epilogue


def _check_row_tiles(name, x_rk, k, n, cta_n, tiles):
    if x_rk.shape[0] % BLOCK_ROWS or x_rk.shape[1] != k:
        raise ValueError(f"{name}: x {x_rk.shape} does not fit K={k} in {BLOCK_ROWS}-row tiles.")
    if n % (cta_n * tiles.cluster) or k % tiles.tile_k:
        raise ValueError(
            f"{name}: N={n} must divide by {cta_n} x cluster {tiles.cluster} and K={k} by "
            f"{tiles.tile_k}."
        )


def tile_matmul(
    x_rk: jax.Array,
    w_gkn: jax.Array,
    tile_expert_t: jax.Array,
    num_used_tiles: jax.Array,
    *,
    transpose_w: bool = False,
    tiles: Tiles | None = None,
) -> jax.Array:
    """y[rows of tile t] = x[rows of tile t] @ w[tile_expert[t]] (or @ w[...]^T).

    x [R, K] with R a multiple of BLOCK_ROWS; w [G, K, N] ([G, N, K] with transpose_w);
    tile_expert [R / BLOCK_ROWS] int32; only the first `num_used_tiles` row tiles are computed.
    """
    from jax.experimental import pallas as pl

    tiles = tiles or (INPUT_GRAD if transpose_w else FORWARD)
    _require_16bit("tile_matmul", x_rk, w_gkn)
    n, k = w_gkn.shape[1:] if transpose_w else w_gkn.shape[:0:-1]
    tile_n, tile_k, cta_n = tiles.tile_n, tiles.tile_k, 2 * tiles.tile_n
    _check_row_tiles("tile_matmul", x_rk, k, n, cta_n, tiles)
    # w tile as loaded: (tile_k, cta_n) rows of w[e]; transposed: (cta_n, tile_k) of w[e]^T.
    w_spec = (
        ((cta_n, tile_k), lambda kk: (0, kk))
        if transpose_w
        else ((tile_k, cta_n), lambda kk: (kk, 0))
    )
    specs = [((BLOCK_ROWS, tile_k), lambda kk: (0, kk), True), (*w_spec, False)]

    def views(refs, expert, m_slice, ni):
        x_gmem, w_gmem = refs
        n_slice = pl.ds(ni * cta_n, cta_n)
        w_e = w_gmem.at[expert]
        return x_gmem.at[m_slice, :], (w_e.at[n_slice, :] if transpose_w else w_e.at[:, n_slice])

    def mma(smem, accs, wg):
        from jax.experimental.pallas import mosaic_gpu as plgpu

        x_smem, w_smem = smem
        wg_n = pl.ds(wg * tile_n, tile_n)
        if transpose_w:
            w_ref = plgpu.transpose_ref(w_smem.at[wg_n, :], (1, 0))
        else:
            w_ref = w_smem.at[:, wg_n]
        plgpu.wgmma(accs[0], x_smem, w_ref)

    return _row_tile_call(
        "tile_matmul_t" if transpose_w else "tile_matmul",
        [x_rk, w_gkn],
        jax.ShapeDtypeStruct((x_rk.shape[0], n), x_rk.dtype),
        tile_expert_t,
        num_used_tiles,
        n_iters=n // (cta_n * tiles.cluster),
        k_iters=k // tile_k,
        specs=specs,
        views=views,
        acc_shapes=[(BLOCK_ROWS, tile_n)],
        mma=mma,
        epilogue=_column_split_epilogue(tile_n, x_rk.dtype),
        tiles=tiles,
    )


def glu_matmul(
    x_rk: jax.Array,
    w0_gkh: jax.Array,
    w1_gkh: jax.Array,
    tile_expert_t: jax.Array,
    num_used_tiles: jax.Array,
    activation: str,
    *,
    tiles: Tiles | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A gated FFN's input side in one kernel: (gate, up, h = act(gate) * up), each [R, H].

    A CTA covers GLU_UNITS hidden units of a row tile; each consumer warpgroup accumulates
    x @ w0[e] and x @ w1[e] for half of its rows (two 64 x 128 accumulators: the wgmma shapes
    of tile_matmul) and stores both products (the backward pass needs them) and h, computed
    from the float32 accumulators: no separate element-wise pass over the two products.
    """
    from jax.experimental import pallas as pl

    tiles = tiles or FORWARD
    _require_16bit("glu_matmul", x_rk, w0_gkh)
    if w0_gkh.shape != w1_gkh.shape or w0_gkh.dtype != w1_gkh.dtype:
        raise ValueError(f"glu_matmul: w0 {w0_gkh.shape} and w1 {w1_gkh.shape} differ.")
    if activation not in EPILOGUE_ACTIVATIONS:
        raise ValueError(
            f"glu_matmul: activation={activation!r} is not one of {sorted(EPILOGUE_ACTIVATIONS)}."
        )
    act = EPILOGUE_ACTIVATIONS[activation]
    _, k, h = w0_gkh.shape
    tile_k, units = tiles.tile_k, GLU_UNITS
    _check_row_tiles("glu_matmul", x_rk, k, h, units, tiles)
    w_spec = ((tile_k, units), lambda kk: (kk, 0), False)
    specs = [((BLOCK_ROWS, tile_k), lambda kk: (0, kk), True), w_spec, w_spec]

    def views(refs, expert, m_slice, ni):
        x_gmem, w0_gmem, w1_gmem = refs
        cols = pl.ds(ni * units, units)
        return x_gmem.at[m_slice, :], w0_gmem.at[expert].at[:, cols], w1_gmem.at[expert].at[:, cols]

    def mma(smem, accs, wg):
        from jax.experimental.pallas import mosaic_gpu as plgpu

        x_smem, w0_smem, w1_smem = smem
        x_rows = x_smem.at[pl.ds(wg * WG_ROWS, WG_ROWS), :]  # this warpgroup's half of the rows
        plgpu.wgmma(accs[0], x_rows, w0_smem)
        plgpu.wgmma(accs[1], x_rows, w1_smem)

    def epilogue(values, wg, m_slice, ni, outs, out_smem):
        gate, up = values
        rows, cols = pl.ds(wg * WG_ROWS, WG_ROWS), pl.ds(ni * units, units)
        for value, out in zip((gate, up, act(gate) * up), outs, strict=True):
            _store(value.astype(x_rk.dtype), out_smem, out.at[m_slice].at[rows, cols])

    r = x_rk.shape[0]
    return _row_tile_call(
        "glu_matmul",
        [x_rk, w0_gkh, w1_gkh],
        (jax.ShapeDtypeStruct((r, h), x_rk.dtype),) * 3,
        tile_expert_t,
        num_used_tiles,
        n_iters=h // (units * tiles.cluster),
        k_iters=k // tile_k,
        specs=specs,
        views=views,
        acc_shapes=[(WG_ROWS, units), (WG_ROWS, units)],
        mma=mma,
        epilogue=epilogue,
        tiles=tiles,
    )


def glu_input_grad(
    d_gate_rh: jax.Array,
    d_up_rh: jax.Array,
    w0_gkh: jax.Array,
    w1_gkh: jax.Array,
    tile_expert_t: jax.Array,
    num_used_tiles: jax.Array,
    *,
    tiles: Tiles | None = None,
) -> jax.Array:
    """dx = d_gate @ w0[e]^T + d_up @ w1[e]^T [R, K]: a gated FFN's input gradient in one kernel.

    One pipeline step covers tiles.tile_k hidden units: both gradient blocks and both weight
    blocks (twice the SMEM per step of tile_matmul, so half the steps in flight).
    """
    from jax.experimental import pallas as pl

    tiles = tiles or GLU_INPUT_GRAD
    _require_16bit("glu_input_grad", d_gate_rh, w0_gkh)
    _, n, h = w0_gkh.shape
    tile_n, cta_n = tiles.tile_n, 2 * tiles.tile_n
    if d_up_rh.shape != d_gate_rh.shape:
        raise ValueError(
            f"glu_input_grad: d_gate {d_gate_rh.shape} and d_up {d_up_rh.shape} differ."
        )
    _check_row_tiles("glu_input_grad", d_gate_rh, h, n, cta_n, tiles)
    dy_spec = ((BLOCK_ROWS, tiles.tile_k), lambda kk: (0, kk), True)
    w_spec = ((cta_n, tiles.tile_k), lambda kk: (0, kk), False)

    def views(refs, expert, m_slice, ni):
        dg_gmem, du_gmem, w0_gmem, w1_gmem = refs
        rows = pl.ds(ni * cta_n, cta_n)
        return (
            dg_gmem.at[m_slice, :],
            du_gmem.at[m_slice, :],
            w0_gmem.at[expert].at[rows, :],
            w1_gmem.at[expert].at[rows, :],
        )

    def mma(smem, accs, wg):
        from jax.experimental.pallas import mosaic_gpu as plgpu

        dg_smem, du_smem, w0_smem, w1_smem = smem
        wg_n = pl.ds(wg * tile_n, tile_n)
        plgpu.wgmma(accs[0], dg_smem, plgpu.transpose_ref(w0_smem.at[wg_n, :], (1, 0)))
        plgpu.wgmma(accs[0], du_smem, plgpu.transpose_ref(w1_smem.at[wg_n, :], (1, 0)))

    return _row_tile_call(
        "glu_input_grad",
        [d_gate_rh, d_up_rh, w0_gkh, w1_gkh],
        jax.ShapeDtypeStruct((d_gate_rh.shape[0], n), d_gate_rh.dtype),
        tile_expert_t,
        num_used_tiles,
        n_iters=n // (cta_n * tiles.cluster),
        k_iters=h // tiles.tile_k,
        specs=[dy_spec, dy_spec, w_spec, w_spec],
        views=views,
        acc_shapes=[(BLOCK_ROWS, tile_n)],
        mma=mma,
        epilogue=_column_split_epilogue(tile_n, d_gate_rh.dtype),
        tiles=tiles,
    )


def _check_weight_grad_shapes(x_rk, dys, tiles: Tiles, cta_n: int) -> None:
    """expert_weight_grad's operands fit each other and its tiles, or a ValueError says why."""
    r, k = x_rk.shape
    n = dys[0].shape[1]
    for dy in dys:
        _require_16bit("expert_weight_grad", x_rk, dy)
    if any(dy.shape != (r, n) for dy in dys):
        raise ValueError(
            f"expert_weight_grad: dy {[d.shape for d in dys]} do not fit x {x_rk.shape}."
        )
    if k % BLOCK_ROWS or n % (cta_n * tiles.cluster) or BLOCK_ROWS % tiles.tile_k:
        raise ValueError(
            f"expert_weight_grad: x {x_rk.shape}, dy {dys[0].shape} do not fit tiles {tiles}."
        )


def expert_weight_grad(
    x_rk: jax.Array,
    dy_rn: jax.Array | tuple[jax.Array, jax.Array],
    expert_start_g: jax.Array,
    expert_blocks_g: jax.Array,
    *,
    tiles: Tiles | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """dw[e] = x[rows of e]^T @ dy[rows of e] -> [G, K, N], warp-specialised like tile_matmul.

    Expert e owns rows [expert_start[e], expert_start[e] + expert_blocks[e] * tiles.tile_k), a
    block-aligned range; experts without rows get zeros. Output tiles are
    BLOCK_ROWS x (2 * tiles.tile_n); the reduction length is dynamic (the expert's blocks).
    dy may be a pair (d_gate, d_up) of a gated FFN: both weight gradients come from one
    kernel sharing the x tiles (each warpgroup accumulates half of the rows of both).
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tiles = tiles or WEIGHT_GRAD
    dys = tuple(dy_rn) if isinstance(dy_rn, tuple | list) else (dy_rn,)
    pair = len(dys) == 2
    r, k = x_rk.shape
    n = dys[0].shape[1]
    g = expert_start_g.shape[0]
    bm, bk = BLOCK_ROWS, tiles.tile_k
    # A pair: each consumer warpgroup takes half of the dw rows and all GLU_UNITS columns of
    # both; otherwise all rows and half of the 2 x tile_n columns.
    cta_n = GLU_UNITS if pair else 2 * tiles.tile_n
    acc_shape = (WG_ROWS, cta_n) if pair else (bm, tiles.tile_n)
    _check_weight_grad_shapes(x_rk, dys, tiles, cta_n)
    dtype = x_rk.dtype
    in_transforms = _transforms(bk, dtype)
    out_transforms = _transforms(tiles.epi_tile_n, dtype)
    epi_m, epi_n = tiles.epi_tile_m, tiles.epi_tile_n
    grid_m, grid_n = k // bm, n // (cta_n * tiles.cluster)

    def pipeline(body, context, steps):
        specs = [((bk, bm), lambda kk: (kk, 0), True)]
        specs += [((bk, cta_n), lambda kk: (kk, 0), False)] * len(dys)
        return _pipeline(body, context, steps, specs, in_transforms, tiles)

    def kernel(start_gmem, blocks_gmem, x_gmem, *refs):
        dy_gmem, out_gmem = refs[: len(dys)], refs[len(dys) :]
        ignore = lambda *_, **__: None  # noqa: E731 - allocations do not depend on the body

        @functools.partial(
            pl.run_scoped,
            # a static grid at least as deep as the pipeline, so nothing is clamped
            allocs=pipeline(ignore, ignore, tiles.max_concurrent_steps).get_allocations(
                x_gmem, *dy_gmem
            ),
            out_smem=plgpu.SMEM((2, 2, epi_m, epi_n), dtype, transforms=out_transforms),
            collective_axes="wg",
        )
        def scope(allocs, out_smem):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((g, grid_m * grid_n), collective_axes="cluster_grid")
            def loop(loop_info):
                e = loop_info.index[0]
                mi, ni = plgpu.planar_snake(
                    loop_info.index[1], (grid_m, grid_n), 1, tiles.grid_tile_width
                )
                ni = ni * tiles.cluster + lax.axis_index("cluster")
                start = pl.multiple_of(start_gmem[e], bk)
                # A window as long as the buffer (it may run past the end): the pipeline only
                # reads the expert's blocks of it.
                rows = pl.ds(start, r)
                m_slice, n_slice = pl.ds(mi * bm, bm), pl.ds(ni * cta_n, cta_n)
                if pair:
                    wg_rows, wg_cols = pl.ds(wg * WG_ROWS, WG_ROWS), slice(None)
                else:
                    wg_rows, wg_cols = slice(None), pl.ds(wg * tiles.tile_n, tiles.tile_n)

                def context(eval_pipeline):
                    def acc_scope(*acc_refs):
                        eval_pipeline(acc_refs)
                        for acc_ref, dw_gmem in zip(acc_refs, out_gmem, strict=True):
                            out = dw_gmem.at[e, m_slice, n_slice].at[wg_rows, wg_cols]
                            _store(acc_ref[...].astype(dtype), out_smem.at[wg], out)

                    pl.run_scoped(acc_scope, *[plgpu.ACC(acc_shape, jnp.float32)] * len(dys))

                def mma(_, x_smem, *smem_and_accs):
                    *dy_smem, acc_refs = smem_and_accs
                    x_t = plgpu.transpose_ref(x_smem.at[:, wg_rows], (1, 0))
                    for acc_ref, dy in zip(acc_refs, dy_smem, strict=True):
                        plgpu.wgmma(acc_ref, x_t, dy.at[:, wg_cols])
                    plgpu.wgmma_wait(0)
                    return acc_refs

                windows = [dy.at[rows, n_slice] for dy in dy_gmem]
                pipeline(mma, context, blocks_gmem[e])(
                    x_gmem.at[rows, m_slice], *windows, allocations=allocs
                )

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel.__name__ = "expert_weight_grad_glu" if pair else "expert_weight_grad"
    call = plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct((g, k, n), dtype)] * len(dys),
        **_grid(tiles.cluster),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    dw = call(expert_start_g.astype(jnp.int32), expert_blocks_g.astype(jnp.int32), x_rk, *dys)
    return tuple(dw) if pair else dw[0]


@struct.dataclass
class BlockLayout:
    """Where token-expert pairs sit in the block-aligned buffer of `rows` rows.

    Expert e owns rows [expert_start[e], expert_start[e] + padded_sizes[e]): its pairs in
    token order, then zero rows up to a multiple of BLOCK_ROWS. Rows from
    `num_used_tiles * BLOCK_ROWS` on belong to no expert (`tile_expert` says E there).
    """

    pair_row: jax.Array  # [P] int32: buffer row of each (token, choice) pair, token-major
    row_pair: jax.Array  # [R] int32: the pair in each row, P for padding and unused rows
    tile_expert: jax.Array  # [R / BLOCK_ROWS] int32: expert of each row tile, E if unused
    num_used_tiles: jax.Array  # [] int32
    expert_start: jax.Array  # [E] int32, multiples of BLOCK_ROWS
    padded_sizes: jax.Array  # [E] int32, multiples of BLOCK_ROWS

    @property
    def rows(self) -> int:
        """R, the rows of the padded buffer."""
        return self.row_pair.shape[0]

    @property
    def weight_grad_blocks(self) -> jax.Array:
        """[E] each expert's rows in expert_weight_grad's pipeline steps (of WEIGHT_GRAD.tile_k)."""
        return self.padded_sizes // WEIGHT_GRAD.tile_k


def buffer_rows(num_pairs: int, num_experts: int) -> int:
    """Static buffer length: every pair plus the worst-case padding, in whole row tiles."""
    worst = num_pairs + num_experts * (BLOCK_ROWS - 1)
    return -(-worst // BLOCK_ROWS) * BLOCK_ROWS


def block_layout(
    expert_p: jax.Array, num_experts: int, valid_p: jax.Array | None = None
) -> BlockLayout:
    """The block-aligned layout of pairs whose experts are expert_p [P] (a stable sort).

    valid_p [P] bool: pairs that are False (not dispatched, or the padding of an exchange
    buffer) get no row (pair_row = R, a zero row for gather_rows), so no kernel computes them.
    """
    (p,) = expert_p.shape
    rows = buffer_rows(p, num_experts)
    key_p = expert_p if valid_p is None else jnp.where(valid_p, expert_p, num_experts)
    counts_e = jnp.bincount(key_p, length=num_experts).astype(jnp.int32)  # drops key E
    padded_e = -(-counts_e // BLOCK_ROWS) * BLOCK_ROWS
    start_e = jnp.cumsum(padded_e) - padded_e
    order_p = jnp.argsort(key_p, stable=True)  # skipped pairs (key E) sort last
    sorted_e = key_p[order_p]
    in_e = jnp.minimum(sorted_e, num_experts - 1)
    first_sorted_e = jnp.cumsum(counts_e) - counts_e  # where each expert starts when unpadded
    row_sorted = start_e[in_e] + jnp.arange(p, dtype=jnp.int32) - first_sorted_e[in_e]
    row_sorted = jnp.where(sorted_e < num_experts, row_sorted, rows)
    pair_row = jnp.zeros((p,), jnp.int32).at[order_p].set(row_sorted, unique_indices=True)
    row_pair = (
        jnp.full((rows,), p, jnp.int32)
        .at[pair_row]
        .set(jnp.arange(p, dtype=jnp.int32), mode="drop", unique_indices=valid_p is None)
    )
    tile_start = jnp.arange(rows // BLOCK_ROWS, dtype=jnp.int32) * BLOCK_ROWS
    tile_expert = jnp.searchsorted(jnp.cumsum(padded_e), tile_start, side="right")
    return BlockLayout(
        pair_row=pair_row,
        row_pair=row_pair,
        tile_expert=tile_expert.astype(jnp.int32),
        num_used_tiles=(jnp.sum(padded_e) // BLOCK_ROWS).astype(jnp.int32),
        expert_start=start_e.astype(jnp.int32),
        padded_sizes=padded_e.astype(jnp.int32),
    )


def _used_rows(y_rn: jax.Array, layout: BlockLayout) -> jax.Array:
    """Rows of unused tiles (left undefined by the kernels) set to zero; XLA fuses this select
    into whatever reads y next."""
    used = jnp.arange(y_rn.shape[0]) < layout.num_used_tiles * BLOCK_ROWS
    return jnp.where(used[:, None], y_rn, jnp.zeros((), y_rn.dtype))


@jax.custom_vjp
def block_matmul(x_rk: jax.Array, w_gkn: jax.Array, layout: BlockLayout) -> jax.Array:
    """y[rows of expert e] = x[rows of e] @ w[e]; rows of unused tiles are zero. [R, N]."""
    return _used_rows(tile_matmul(x_rk, w_gkn, layout.tile_expert, layout.num_used_tiles), layout)


def _block_matmul_fwd(x_rk, w_gkn, layout):
    return block_matmul(x_rk, w_gkn, layout), (x_rk, w_gkn, layout)


def _block_matmul_bwd(residuals, dy_rn):
    x_rk, w_gkn, layout = residuals
    dy_rn = dy_rn.astype(x_rk.dtype)
    dx = tile_matmul(dy_rn, w_gkn, layout.tile_expert, layout.num_used_tiles, transpose_w=True)
    dw = expert_weight_grad(x_rk, dy_rn, layout.expert_start, layout.weight_grad_blocks)
    return _used_rows(dx, layout), dw.astype(w_gkn.dtype), None


block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


def block_matmul_xla(x_rk: jax.Array, w_gkn: jax.Array, layout: BlockLayout) -> jax.Array:
    """The same function as block_matmul through jax.lax.ragged_dot (any backend; tests)."""
    return jax.lax.ragged_dot(x_rk, w_gkn, layout.padded_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def glu_block_matmul(
    x_rk: jax.Array, w0_gkh: jax.Array, w1_gkh: jax.Array, layout: BlockLayout, activation: str
) -> jax.Array:
    """h = act(x @ w0[e]) * (x @ w1[e]) per expert [R, H], the input side of a gated FFN.

    One kernel (glu_matmul) computes both products and h in its epilogue; the backward pass is
    one element-wise pass to (d_gate, d_up), glu_input_grad and expert_weight_grad. Rows
    of unused tiles are undefined (not zeroed: h goes straight into the next grouped matmul,
    which skips them).
    """
    return _glu_block_matmul_fwd(x_rk, w0_gkh, w1_gkh, layout, activation)[0]


def _glu_block_matmul_fwd(x_rk, w0_gkh, w1_gkh, layout, activation):
    gate_rh, up_rh, h_rh = glu_matmul(
        x_rk, w0_gkh, w1_gkh, layout.tile_expert, layout.num_used_tiles, activation
    )
    return h_rh, (x_rk, w0_gkh, w1_gkh, layout, gate_rh, up_rh)


def _glu_block_matmul_bwd(activation, residuals, dh_rh):
    from glam_jax.layers import activation_fn

    x_rk, w0_gkh, w1_gkh, layout, gate_rh, up_rh = residuals
    # One element-wise pass (XLA fuses it, two outputs): d gate and d up in x's dtype.
    act_rh, act_vjp = jax.vjp(activation_fn(activation), gate_rh.astype(jnp.float32))
    dh_rh = dh_rh.astype(jnp.float32)
    (d_gate,) = act_vjp(dh_rh * up_rh.astype(jnp.float32))
    d_gate, d_up = d_gate.astype(x_rk.dtype), (dh_rh * act_rh).astype(x_rk.dtype)
    used = (layout.tile_expert, layout.num_used_tiles)
    dx = glu_input_grad(d_gate, d_up, w0_gkh, w1_gkh, *used)
    d_gate_up = (d_gate, d_up)
    dw0, dw1 = expert_weight_grad(x_rk, d_gate_up, layout.expert_start, layout.weight_grad_blocks)
    return _used_rows(dx, layout), dw0.astype(w0_gkh.dtype), dw1.astype(w1_gkh.dtype), None


glu_block_matmul.defvjp(_glu_block_matmul_fwd, _glu_block_matmul_bwd)


def glu_block_matmul_xla(
    x_rk: jax.Array, w0_gkh: jax.Array, w1_gkh: jax.Array, layout: BlockLayout, activation: str
) -> jax.Array:
    """The same function as glu_block_matmul through jax.lax.ragged_dot (any backend)."""
    from glam_jax.layers import activation_fn

    gate = block_matmul_xla(x_rk, w0_gkh, layout)
    return activation_fn(activation)(gate) * block_matmul_xla(x_rk, w1_gkh, layout)


def unsupported_reason(w_gkn: jax.Array | None = None) -> str | None:
    """None where the kernels run (on expert weights w [E, K, N] if given), else why not."""
    from glam_jax.kernels import grouped_matmul

    # Same device and dtype needs as jax's kernels; widths in whole 2-warpgroup tiles.
    return grouped_matmul.unsupported_reason(w_gkn, width=2 * FORWARD.tile_n)
