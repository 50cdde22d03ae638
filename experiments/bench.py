"""Side-by-side GPU benchmarks in one process: MoE FFN vs dense FFN, attention kernels, full
train step MFU, compile time versus depth.

python experiments/bench.py --what=moe,attention,step,compile --json_out=docs/perf/h100.json

Timings: warm-up, then the median of --iters calls, each ended with block_until_ready.
Throughput is in *activated* FLOPs (a top-k token counts k expert FFNs; capacity padding and
the router are not counted) against --peak_tflops (989 = H100/H200 dense bf16).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time

from absl import flags

from experiments.bench_utils import (
    collective_counts,
    device_seconds,
    load_config,
    random_train_step,
    time_fn,
    trace_kernels,
)
from glam_jax import cli, gpu_defaults

_WHAT = flags.DEFINE_list("what", ["moe", "attention", "step", "compile"], "Benchmarks to run.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "MoE/FFN benchmark: tokens per call.")
_EMBED = flags.DEFINE_integer("embed", 2048, "MoE/FFN benchmark: model width M.")
_MLP = flags.DEFINE_integer("mlp", 8192, "MoE/FFN benchmark: expert hidden width H.")
_EXPERTS = flags.DEFINE_integer("experts", 64, "MoE/FFN benchmark: experts E.")
_TOPK = flags.DEFINE_integer("topk", 2, "MoE/FFN benchmark: experts per token k.")
_GROUP = flags.DEFINE_integer("group_size", 1024, "MoE/FFN benchmark: routing group size.")
_CF = flags.DEFINE_float("capacity_factor", 1.25, "MoE/FFN benchmark: capacity factor.")
_DISPATCHES = flags.DEFINE_list(
    "dispatches",
    ["einsum", "sort", "dropless"],
    "MoE/FFN benchmark: paths to time; 'dropless/NAME' sets moe.ragged_matmul=NAME, and "
    "'dropless/blocked-unfused' also moe.fused_glu=False.",
)
_STEP_CONFIGS = flags.DEFINE_list(
    "step_configs",
    ["configs/glam_gpu_bench.py:dense", "configs/glam_gpu_bench.py:moe"],
    "Full-step benchmark configs (file[:variant]).",
)
_DEPTHS = flags.DEFINE_list("depths", ["8", "64"], "Compile benchmark: layer counts.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed iterations (median reported).")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "bf16 peak per device for utilisation.")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32", "MoE/FFN bench: parameter dtype.")
_PROFILE = flags.DEFINE_integer(
    "profile_top", 0, "MoE bench: print the N slowest kernels per path."
)
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write all results to this JSON file.")


def bench_moe() -> list[dict]:
    """MoE FFN fwd+bwd per dispatch path vs the dense GLU FFN with the same activated FLOPs."""
    import jax
    import jax.numpy as jnp

    from configs.base import get_base_config
    from glam_jax.layers import GluFFN
    from glam_jax.model import frozen
    from glam_jax.moe import MoE

    t, m, h, e, k = _TOKENS.value, _EMBED.value, _MLP.value, _EXPERTS.value, _TOPK.value
    seq = min(2048, t)
    x = jax.random.normal(jax.random.PRNGKey(0), (t // seq, seq, m), jnp.bfloat16)
    cotangent = jax.random.normal(jax.random.PRNGKey(3), x.shape, jnp.float32)
    flops = 3 * 2 * t * k * 3 * m * h  # fwd+bwd, k experts of 3 matrices each
    rows = []

    def timed(module, label, extra):
        params = jax.jit(module.init)(jax.random.PRNGKey(1), x)

        def loss(p, x, ct):
            out = module.apply(p, x, rngs={"routing": jax.random.PRNGKey(2)})
            y = out[0] if isinstance(out, tuple) else out
            return jnp.sum(y.astype(jnp.float32) * ct)  # random ct: no algebraic shortcut

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        sec = time_fn(step, params, x, cotangent, iters=_ITERS.value)
        row = dict(bench="ffn", path=label, seconds=sec, tflops=flops / sec / 1e12, **extra)
        print(f"  {label:10s} {sec * 1e3:8.2f} ms  {row['tflops']:7.1f} TFLOP/s", flush=True)
        if _PROFILE.value:
            kernels = trace_kernels(lambda: step(params, x, cotangent), 3)[: _PROFILE.value]
            row["kernels"] = kernels
            for r in kernels:
                print(
                    f"      {r['ms_per_step']:7.2f} ms x{r['count_per_step']:4.0f} {r['name'][:90]}"
                )
        rows.append(row)
        return params

    shape = dict(tokens=t, embed=m, mlp=h, experts=e, k=k)
    pdtype = jnp.dtype(_PARAM_DTYPE.value)
    shape["param_dtype"] = _PARAM_DTYPE.value
    dense = GluFFN(mlp_dim=k * h, dtype=jnp.bfloat16, param_dtype=pdtype)
    timed(dense, "dense", shape)
    for label in _DISPATCHES.value:
        path, _, matmul = label.partition("/")
        matmul, _, option = matmul.partition("-")
        if option not in ("", "unfused"):
            raise ValueError(f"--dispatches entry {label!r}: the only suffix is '-unfused'.")
        config = get_base_config()
        config.moe.ragged_matmul = matmul or "auto"
        config.moe.fused_glu = option != "unfused"
        config.model.dtype = "bfloat16"
        config.model.param_dtype = _PARAM_DTYPE.value
        config.model.embed_dim, config.model.mlp_dim = m, h
        config.moe.update(
            num_experts=e,
            num_selected=k,
            dispatch=path,
            group_size=_GROUP.value,
            capacity_factor_train=_CF.value,
            router="gshard_top2" if k == 2 else "topk_softmax",
        )
        try:
            timed(
                MoE(frozen(config), train=True),
                label,
                dict(shape, group_size=_GROUP.value, capacity_factor=_CF.value),
            )
        except Exception as err:  # noqa: BLE001 - e.g. out of memory: record and go on
            msg = str(err).splitlines()[0][:200]
            print(f"  {label:10s} failed: {msg}", flush=True)
            rows.append(dict(bench="ffn", path=label, error=msg, **shape))
    dense_tf = rows[0]["tflops"]
    for row in rows[1:]:
        if "tflops" in row:
            row["ratio_to_dense"] = row["tflops"] / dense_tf
    return rows


def bench_gmm() -> list[dict]:
    """Each grouped-matmul kernel of the dropless MoE vs cuBLAS on the same useful FLOPs.

    tokens x topk rows over `experts` groups (multinomial sizes), [embed] -> [mlp]: forward
    x @ w[g], input gradient dy @ w[g]^T and weight gradient x_g^T dy_g, for jax's ragged
    Mosaic-GPU kernels (`mgpu`, unpadded groups), ours (`blocked`, groups padded to whole
    row tiles) and, where installed, tokamax's (`tokamax`, unpadded groups). Device time per
    call from a profiler trace; TFLOP/s count useful rows only.
    """
    import jax
    import jax.numpy as jnp

    from glam_jax.kernels import block_grouped_matmul as bg
    from glam_jax.kernels import grouped_matmul as gmm

    if bg.unsupported_reason() is not None:
        print(f"  grouped-matmul kernels not available: {bg.unsupported_reason()}")
        return []
    t, m, h, e, k = _TOKENS.value, _EMBED.value, _MLP.value, _EXPERTS.value, _TOPK.value
    p = t * k
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    expert_p = jax.random.randint(keys[0], (p,), 0, e)
    sizes = jnp.bincount(expert_p, length=e).astype(jnp.int32)
    lay = jax.jit(bg.block_layout, static_argnums=1)(expert_p, e)
    x = jax.random.normal(keys[1], (p, m), jnp.bfloat16)
    dy = jax.random.normal(keys[2], (p, h), jnp.bfloat16)
    w = jax.random.normal(keys[3], (e, m, h), jnp.bfloat16) * 0.02
    # the same rows in the padded layout (zero rows for padding)
    xb, dyb = (jnp.take(a, lay.row_pair, axis=0, mode="fill", fill_value=0) for a in (x, dy))
    tiles_used = lay.num_used_tiles
    cases = {
        ("forward", "cublas"): (lambda a, b: a @ b, (x, w[0])),
        ("forward", "mgpu"): (lambda a, b: gmm._ragged(a, b, sizes), (x, w)),
        ("forward", "blocked"): (
            lambda a, b: bg.tile_matmul(a, b, lay.tile_expert, tiles_used),
            (xb, w),
        ),
        ("input_grad", "cublas"): (lambda a, b: a @ b.T, (dy, w[0])),
        ("input_grad", "mgpu"): (
            lambda a, b: gmm._ragged(a, b, sizes, transpose_rhs=True),
            (dy, w),
        ),
        ("input_grad", "blocked"): (
            lambda a, b: bg.tile_matmul(a, b, lay.tile_expert, tiles_used, transpose_w=True),
            (dyb, w),
        ),
        ("weight_grad", "cublas"): (lambda a, b: a.T @ b, (x, dy)),
        ("weight_grad", "mgpu"): (lambda a, b: gmm._weight_grad(a, b, sizes), (x, dy)),
        ("weight_grad", "blocked"): (
            lambda a, b: bg.expert_weight_grad(a, b, lay.expert_start, lay.weight_grad_blocks),
            (xb, dyb),
        ),
    }
    cases.update(_tokamax_gmm_cases(x, w, dy, sizes))
    flops = 2 * p * m * h
    padded_rows = int(tiles_used) * bg.BLOCK_ROWS
    print(f"  {p} rows in {e} groups; blocked layout computes {padded_rows} rows", flush=True)
    rows = []
    for (op, impl), (fn, args) in cases.items():
        jitted = jax.jit(fn)
        try:
            sec = device_seconds(lambda jitted=jitted, args=args: jitted(*args), calls=10)
        except Exception as err:  # noqa: BLE001 - record OOM etc. and go on
            print(f"  {op:12s} {impl:8s} failed: {str(err).splitlines()[0][:150]}")
            continue
        tf = flops / sec / 1e12
        rows.append(
            dict(
                bench="gmm",
                op=op,
                impl=impl,
                seconds=sec,
                tflops=tf,
                rows=p,
                k=m,
                n=h,
                groups=e,
                padded_rows=padded_rows,
            )
        )
        print(f"  {op:12s} {impl:8s} {sec * 1e3:8.3f} ms  {tf:7.1f} TFLOP/s", flush=True)
    return rows


def _tokamax_gmm_cases(x, w, dy, sizes) -> dict:
    """Google's tokamax `ragged_dot_general` (Mosaic GPU kernels on sm90) on the same three
    products as our kernels, over unpadded groups: forward x @ w[g], input gradient dy @ w[g]^T
    (contracting w's last dimension, no transposed copy) and weight gradient x_g^T dy_g (the
    rows are ragged in the contracting dimension). Empty when tokamax is not installed."""
    try:
        import tokamax
    except ImportError as err:
        print(f"  tokamax not measured: {err}")
        return {}
    import jax

    def general(contract, ragged_lhs, group_rhs, implementation):
        numbers = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(contract, ([], [])),
            lhs_ragged_dimensions=ragged_lhs,
            rhs_group_dimensions=group_rhs,
        )
        return lambda a, b: tokamax.ragged_dot_general(
            a, b, sizes, numbers, implementation=implementation
        )

    print(f"  tokamax {tokamax.__version__}", flush=True)
    cases = {}
    # Mosaic GPU (sm90 wgmma) and Triton kernels, each named in its column.
    for impl, column in (("mosaic", "tokamax"), ("triton", "tokamax-triton")):
        cases[("forward", column)] = (general(([1], [1]), [0], [0], impl), (x, w))
        cases[("input_grad", column)] = (general(([1], [2]), [0], [0], impl), (dy, w))
        cases[("weight_grad", column)] = (general(([0], [0]), [0], [], impl), (x, dy))
    return cases


def bench_gmm_tune() -> list[dict]:
    """Searches tile sizes of the three grouped-matmul kernels at the MoE FFN shapes."""
    import itertools

    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

    t, m, h, e, k = _TOKENS.value, _EMBED.value, _MLP.value, _EXPERTS.value, _TOPK.value
    n = t * k
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    sizes = jax.random.multinomial(keys[0], n, jnp.full((e,), 1.0 / e), shape=(e,))
    sizes = sizes.astype(jnp.int32)
    x = jax.random.normal(keys[1], (n, m), jnp.bfloat16)
    w = jax.random.normal(keys[2], (e, m, h), jnp.bfloat16)
    dy = jax.random.normal(keys[3], (n, h), jnp.bfloat16)
    ops = {
        "forward x@w[g]": (ragged_dot_mgpu.ragged_dot, (x, w), dict(transpose_rhs=False)),
        "input grad dy@w[g]^T": (ragged_dot_mgpu.ragged_dot, (dy, w), dict(transpose_rhs=True)),
        "weight grad x_g^T dy_g": (transposed_ragged_dot_mgpu.transposed_ragged_dot, (x, dy), {}),
    }
    grid = list(itertools.product((128, 192), (128, 256), (4, 6), (1, 4, 8)))
    rows = []
    for name, (fn, args, extra) in ops.items():
        best = (float("inf"), None)
        for bm, bn, depth, gbn in grid:
            tiles = dict(
                block_m=bm, block_n=bn, block_k=64, max_concurrent_steps=depth, grid_block_n=gbn
            )

            def call(a, b, fn=fn, tiles=tiles, extra=extra):
                return fn(a, b, group_sizes=sizes, **tiles, **extra)

            try:
                sec = time_fn(jax.jit(call), *args, iters=5)
            except Exception:  # noqa: BLE001 - tiles that do not fit shared memory etc.
                continue
            if sec < best[0]:
                best = (sec, tiles)
        sec, tiles = best
        tf = 2 * n * m * h / sec / 1e12 if tiles else 0.0
        print(f"  {name:24s} best {tiles} {sec * 1e3:.2f} ms {tf:.0f} TFLOP/s", flush=True)
        rows.append(dict(bench="gmm_tune", op=name, tiles=tiles, seconds=sec, tflops=tf))
    return rows


def bench_attention() -> list[dict]:
    """Causal attention with the relative-position bias table: XLA vs cuDNN, fwd+bwd.

    Gradients are taken with respect to q, k, v and the [heads, buckets] table, as in the
    model. `cudnn_docmask` adds the document mask (rows of one document), which cuDNN folds
    into a per-row bias. Each path is timed twice: wall-clock per jitted call (time_fn) and
    device time, the kernels of one call summed from a profiler trace, which leaves out the
    host dispatch between calls that a train step does not have.
    """
    import jax
    import jax.numpy as jnp

    from glam_jax import attention as attn

    b, s, h, d = 8, 2048, 16, 128
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in keys[:3])
    table = jax.random.normal(keys[3], (h, 32), jnp.float32).astype(jnp.bfloat16)
    scale = 1.0 / math.sqrt(d)

    def bias(table):
        return attn.relative_bias(table, s, 128)

    paths = {
        "xla": lambda q, k, v, t: attn.xla_attention(
            q, k, v, bias(t), attn.attention_mask(None, s), scale
        ),
        "cudnn": lambda q, k, v, t: attn.cudnn_attention(q, k, v, bias(t), None, scale),
        "cudnn_docmask": lambda q, k, v, t: attn.cudnn_attention(
            q, k, v, bias(t), jnp.ones((b, s), jnp.int32), scale
        ),
    }
    rows, outs, grads = [], {}, {}
    for name, fn in paths.items():
        grad = jax.jit(jax.grad(lambda *a, f=fn: jnp.sum(f(*a).astype(jnp.float32)), (0, 1, 2, 3)))
        sec = time_fn(grad, q, k, v, table, iters=_ITERS.value)
        device_s = device_seconds(lambda g=grad: g(q, k, v, table))
        outs[name], grads[name] = jax.jit(fn)(q, k, v, table), grad(q, k, v, table)
        row = dict(
            bench="attention",
            impl=name,
            seconds=sec,
            device_seconds=device_s,
            b=b,
            s=s,
            heads=h,
            d=d,
        )
        if name != "xla":
            row["speedup_vs_xla"] = rows[0]["seconds"] / sec
            row["device_speedup_vs_xla"] = rows[0]["device_seconds"] / device_s
            row["max_abs_diff_vs_xla"] = float(
                jnp.max(jnp.abs(outs["xla"].astype(jnp.float32) - outs[name].astype(jnp.float32)))
            )
            ref, got = grads["xla"][3].astype(jnp.float32), grads[name][3].astype(jnp.float32)
            row["table_grad_rel_diff"] = float(jnp.max(jnp.abs(ref - got)) / jnp.max(jnp.abs(ref)))
        rows.append(row)
        extra = "".join(
            f"  {key} {row[key]:.3g}"
            for key in (
                "speedup_vs_xla",
                "device_speedup_vs_xla",
                "max_abs_diff_vs_xla",
                "table_grad_rel_diff",
            )
            if key in row
        )
        print(
            f"  attention {name:13s} fwd+bwd {sec * 1e3:8.2f} ms (device {device_s * 1e3:6.2f} ms)"
            f"{extra}",
            flush=True,
        )
    return rows


def bench_step() -> list[dict]:
    """Full train steps (random tokens) of each --step_configs entry: time, tokens/s, MFU."""
    import jax

    from glam_jax import flops

    rows = []
    for spec in _STEP_CONFIGS.value:
        config = load_config(spec)
        mesh, state, train_step, batch = random_train_step(config)
        b, s = config.train.batch_size, config.train.seq_len
        start = time.perf_counter()
        state, _ = train_step(state, batch)
        jax.block_until_ready(state)
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(_ITERS.value):
            start = time.perf_counter()
            state, metrics = train_step(state, batch)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - start)
        sec = statistics.median(times)
        compiled = train_step.lower(state, batch).compile()
        collectives = collective_counts(compiled.as_text())
        memory = compiled.memory_analysis()  # per device; the state is donated to the output
        peak_gib = (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / 2**30
        counts = flops.count(config)
        tokens_s = b * s / sec
        mfu = tokens_s * counts.flops_per_token / (_PEAK.value * 1e12 * mesh.size)
        row = dict(
            bench="train_step",
            config=spec,
            seconds=sec,
            tokens_per_s=tokens_s,
            mfu=mfu,
            first_step_s=compile_s,
            devices=mesh.size,
            batch=b,
            seq_len=s,
            flops_per_token=counts.flops_per_token,
            loss=float(metrics["loss"]),
            mesh=dict(mesh.shape),
            collectives=collectives,
            device_memory_gib=peak_gib,
        )
        print(
            f"  {spec:40s} {sec * 1e3:8.1f} ms  {tokens_s:9.0f} tok/s  MFU {mfu:.1%}  "
            f"{peak_gib:5.1f} GiB  {collectives}",
            flush=True,
        )
        rows.append(row)
        del state
    return rows


def bench_compile() -> list[dict]:
    """Train-step compile time and HLO size at each --depths (the GPU bench config)."""
    from experiments.compile_probe import probe
    from glam_jax import sharding

    config = load_config("configs/glam_gpu_bench.py")
    mesh = sharding.make_mesh(config.mesh.shape)
    rows = []
    for depth in _DEPTHS.value:
        row = dict(bench="compile", **probe(config, int(depth), mesh))
        print(f"  {depth:>3s} layers: compile {row['compile_s']:.1f} s, {row['hlo_ops']} ops")
        rows.append(row)
    return rows


def main(argv) -> None:
    del argv
    import jax

    results = {
        "date": time.strftime("%Y-%m-%d"),
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "command": " ".join(sys.argv),
        "results": [],
    }
    print(f"{results['device']} x{results['device_count']}, jax {results['jax']}")
    benches = dict(
        moe=bench_moe,
        gmm=bench_gmm,
        gmm_tune=bench_gmm_tune,
        attention=bench_attention,
        step=bench_step,
        compile=bench_compile,
    )
    for name in _WHAT.value:
        print(f"[{name}]", flush=True)
        results["results"].extend(benches[name]())
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    gpu_defaults.apply()
    cli.run(main)
