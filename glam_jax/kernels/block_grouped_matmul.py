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
Row tiles past `num_used_tiles` (the unused tail of the static buffer) are skipped and their
output rows left undefined. `block_matmul(x, w, layout)` is the differentiable op built from
them, with those rows zeroed; `block_layout` places token-expert pairs in the buffer, and
`block_matmul_xla` is the same function through `jax.lax.ragged_dot` (any backend).
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
    """The pipeline both kernels run: a TMA producer warpgroup feeding two wgmma consumers.

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


def _store(acc_ref, out_smem, out_ref):
    """Accumulator -> out_ref in (epi_m, epi_n) pieces through two SMEM slots (TMA stores)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    acc = acc_ref[...].astype(out_smem.dtype)
    epi_m, epi_n = out_smem.shape[-2:]
    tile_m, tile_n = acc.shape
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for i in range(tile_m // epi_m):
        for j in range(tile_n // epi_n):
            rows = slice(i * epi_m, (i + 1) * epi_m)
            cols = slice(j * epi_n, (j + 1) * epi_n)
            slot = (i * (tile_n // epi_n) + j) % out_smem.shape[0]
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            out_smem[slot] = acc[rows, cols]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[slot], out_ref.at[rows, cols])


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
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tiles = tiles or (INPUT_GRAD if transpose_w else FORWARD)
    r, k = x_rk.shape
    if transpose_w:
        _, n, k2 = w_gkn.shape
    else:
        _, k2, n = w_gkn.shape
    _require_16bit("tile_matmul", x_rk, w_gkn)
    if k != k2 or r % BLOCK_ROWS:
        raise ValueError(f"tile_matmul: x {x_rk.shape} and w {w_gkn.shape} do not fit.")
    tile_m, tile_n, tile_k = BLOCK_ROWS, tiles.tile_n, tiles.tile_k
    cta_n = 2 * tile_n
    if n % cta_n or k % tile_k:
        raise ValueError(f"tile_matmul: N={n} must divide by {cta_n} and K={k} by {tile_k}.")
    if n % (cta_n * tiles.cluster):
        raise ValueError(f"tile_matmul: N={n} must divide by {cta_n} x cluster {tiles.cluster}.")
    dtype = x_rk.dtype
    n_iters, k_iters = n // (cta_n * tiles.cluster), k // tile_k
    epi_m, epi_n = tiles.epi_tile_m, tiles.epi_tile_n
    num_out_slots = min(2, (tile_m * tile_n) // (epi_m * epi_n))
    in_transforms = _transforms(tile_k, dtype)
    out_transforms = _transforms(epi_n, dtype)
    # w tile as loaded: (tile_k, cta_n) rows of w[e]; transposed: (cta_n, tile_k) of w[e]^T.
    w_block = (cta_n, tile_k) if transpose_w else (tile_k, cta_n)
    w_index = (lambda kk: (0, kk)) if transpose_w else (lambda kk: (kk, 0))

    def pipeline(body, context):
        x_spec = ((tile_m, tile_k), lambda kk: (0, kk), True)
        return _pipeline(
            body, context, k_iters, [x_spec, (w_block, w_index, False)], in_transforms, tiles
        )

    def kernel(tile_expert_gmem, num_used_gmem, x_gmem, w_gmem, out_gmem):
        ignore = lambda *_, **__: None  # noqa: E731 - allocations do not depend on the body

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem.at[0]),
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
                expert = tile_expert_gmem[mi]
                m_slice = pl.ds(mi * tile_m, tile_m)
                n_slice = pl.ds(ni * cta_n, cta_n)
                wg_n = pl.ds(wg * tile_n, tile_n)

                def context(eval_pipeline):
                    @functools.partial(
                        pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), jnp.float32)
                    )
                    def acc_scope(acc_ref):
                        eval_pipeline(acc_ref)
                        _store(acc_ref, out_smem.at[wg], out_gmem.at[m_slice, n_slice].at[:, wg_n])

                def mma(_, x_smem, w_smem, acc_ref):
                    if transpose_w:
                        w_ref = plgpu.transpose_ref(w_smem.at[wg_n, :], (1, 0))
                    else:
                        w_ref = w_smem.at[:, wg_n]
                    plgpu.wgmma(acc_ref, x_smem, w_ref)
                    plgpu.wgmma_wait(0)
                    return acc_ref

                w_e = w_gmem.at[expert]
                w_cols = w_e.at[n_slice, :] if transpose_w else w_e.at[:, n_slice]
                pipeline(mma, context)(x_gmem.at[m_slice, :], w_cols, allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((r, n), dtype),
        **_grid(tiles.cluster),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    used = jnp.reshape(num_used_tiles, (1,)).astype(jnp.int32)
    return call(tile_expert_t.astype(jnp.int32), used, x_rk, w_gkn)


def expert_weight_grad(
    x_rk: jax.Array,
    dy_rn: jax.Array,
    expert_start_g: jax.Array,
    expert_blocks_g: jax.Array,
    *,
    tiles: Tiles | None = None,
) -> jax.Array:
    """dw[e] = x[rows of e]^T @ dy[rows of e] -> [G, K, N], warp-specialised like tile_matmul.

    Expert e owns rows [expert_start[e], expert_start[e] + expert_blocks[e] * tiles.tile_k), a
    block-aligned range; experts without rows get zeros. Output tiles are
    BLOCK_ROWS x (2 * tiles.tile_n); the reduction length is dynamic (the expert's blocks).
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tiles = tiles or WEIGHT_GRAD
    r, k = x_rk.shape
    r2, n = dy_rn.shape
    g = expert_start_g.shape[0]
    bm, bn, bk = BLOCK_ROWS, tiles.tile_n, tiles.tile_k
    cta_n = 2 * bn
    _require_16bit("expert_weight_grad", x_rk, dy_rn)
    if r != r2 or k % bm or n % (cta_n * tiles.cluster) or BLOCK_ROWS % bk:
        raise ValueError(
            f"expert_weight_grad: x {x_rk.shape}, dy {dy_rn.shape} do not fit tiles {tiles}."
        )
    dtype = x_rk.dtype
    in_transforms = _transforms(bk, dtype)
    out_transforms = _transforms(tiles.epi_tile_n, dtype)
    epi_m, epi_n = tiles.epi_tile_m, tiles.epi_tile_n
    num_out_slots = min(2, (bm * bn) // (epi_m * epi_n))
    grid_m, grid_n = k // bm, n // (cta_n * tiles.cluster)

    def pipeline(body, context, steps):
        specs = [((bk, bm), lambda kk: (kk, 0), True), ((bk, cta_n), lambda kk: (kk, 0), False)]
        return _pipeline(body, context, steps, specs, in_transforms, tiles)

    def kernel(start_gmem, blocks_gmem, x_gmem, dy_gmem, out_gmem):
        ignore = lambda *_, **__: None  # noqa: E731 - allocations do not depend on the body

        @functools.partial(
            pl.run_scoped,
            # a static grid at least as deep as the pipeline, so nothing is clamped
            allocs=pipeline(ignore, ignore, tiles.max_concurrent_steps).get_allocations(
                x_gmem, dy_gmem
            ),
            out_smem=plgpu.SMEM((2, num_out_slots, epi_m, epi_n), dtype, transforms=out_transforms),
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
                wg_n = pl.ds(wg * bn, bn)
                m_slice, n_slice = pl.ds(mi * bm, bm), pl.ds(ni * cta_n, cta_n)

                def context(eval_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((bm, bn), jnp.float32))
                    def acc_scope(acc_ref):
                        eval_pipeline(acc_ref)
                        _store(
                            acc_ref, out_smem.at[wg], out_gmem.at[e, m_slice, n_slice].at[:, wg_n]
                        )

                def mma(_, x_smem, dy_smem, acc_ref):
                    plgpu.wgmma(acc_ref, plgpu.transpose_ref(x_smem, (1, 0)), dy_smem.at[:, wg_n])
                    plgpu.wgmma_wait(0)
                    return acc_ref

                pipeline(mma, context, blocks_gmem[e])(
                    x_gmem.at[rows, m_slice], dy_gmem.at[rows, n_slice], allocations=allocs
                )

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((g, k, n), dtype),
        **_grid(tiles.cluster),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return call(expert_start_g.astype(jnp.int32), expert_blocks_g.astype(jnp.int32), x_rk, dy_rn)


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
        return self.row_pair.shape[0]


def buffer_rows(num_pairs: int, num_experts: int) -> int:
    """Static buffer length: every pair plus the worst-case padding, in whole row tiles."""
    worst = num_pairs + num_experts * (BLOCK_ROWS - 1)
    return -(-worst // BLOCK_ROWS) * BLOCK_ROWS


def block_layout(expert_p: jax.Array, num_experts: int) -> BlockLayout:
    """The block-aligned layout of pairs whose experts are expert_p [P] (a stable sort)."""
    (p,) = expert_p.shape
    rows = buffer_rows(p, num_experts)
    counts_e = jnp.bincount(expert_p, length=num_experts).astype(jnp.int32)
    padded_e = -(-counts_e // BLOCK_ROWS) * BLOCK_ROWS
    start_e = jnp.cumsum(padded_e) - padded_e
    order_p = jnp.argsort(expert_p, stable=True)
    sorted_e = expert_p[order_p]
    first_sorted_e = jnp.cumsum(counts_e) - counts_e  # where each expert starts when unpadded
    row_sorted = start_e[sorted_e] + jnp.arange(p, dtype=jnp.int32) - first_sorted_e[sorted_e]
    pair_row = jnp.zeros((p,), jnp.int32).at[order_p].set(row_sorted, unique_indices=True)
    row_pair = (
        jnp.full((rows,), p, jnp.int32)
        .at[pair_row]
        .set(jnp.arange(p, dtype=jnp.int32), unique_indices=True)
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
    blocks_e = layout.padded_sizes // WEIGHT_GRAD.tile_k
    dw = expert_weight_grad(x_rk, dy_rn, layout.expert_start, blocks_e)
    return _used_rows(dx, layout), dw.astype(w_gkn.dtype), None


block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


def block_matmul_xla(x_rk: jax.Array, w_gkn: jax.Array, layout: BlockLayout) -> jax.Array:
    """The same function as block_matmul through jax.lax.ragged_dot (any backend; tests)."""
    return jax.lax.ragged_dot(x_rk, w_gkn, layout.padded_sizes)


def unsupported_reason(w_gkn: jax.Array | None = None) -> str | None:
    """None where the kernels run (on expert weights w [E, K, N] if given), else why not."""
    from glam_jax.kernels import grouped_matmul

    # Same device and dtype needs as jax's kernels; widths in whole 2-warpgroup tiles.
    return grouped_matmul.unsupported_reason(w_gkn, width=2 * FORWARD.tile_n)
