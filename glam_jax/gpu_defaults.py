"""XLA/CUDA settings for GPU runs, applied in one place before JAX starts its backends.

Call `apply()` at the top of a GPU entry point (train.py and bench.py do). It only adds flags
that are not already set, and does nothing on hosts without a CUDA plugin, since a CPU-only
XLA refuses GPU flags.
"""

from __future__ import annotations

import importlib.util
import os

# Flag -> value; docs/moe_reference.md section 6 lists these as the useful ones on Hopper GPUs.
XLA_GPU_FLAGS = {
    "--xla_gpu_enable_latency_hiding_scheduler": "true",  # overlap collectives with compute
    "--xla_gpu_enable_triton_gemm": "false",  # cuBLAS GEMMs are faster for these shapes
    "--xla_gpu_enable_command_buffer": "",  # no CUDA graphs: they hurt scan loops
    # Dynamic-slice fusion writes a GEMM straight into the scan's stacked residual buffer, but
    # when the product also feeds the next op it *duplicates* the GEMM: every saved projection
    # ran twice in the forward loop (dense step 157 -> 136 ms with it off, docs/performance.md).
    "--xla_gpu_enable_dynamic_slice_fusion": "false",
}
ENV_DEFAULTS = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # keep collective and compute streams ordered
    "NCCL_NVLS_ENABLE": "0",  # NVLink multicast stays off (shared hosts)
    # jax pre-allocates 75% of GPU memory by default; the MoE bench step at batch 16 needs
    # 65 GiB, which then fails on an 80 GB H100.
    "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92",
}


def has_cuda_plugin() -> bool:
    """True where a CUDA PJRT plugin for jax is installed (checked without importing jax)."""
    for name in ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_plugins"):
        try:
            if importlib.util.find_spec(name) is not None and name != "jax_plugins":
                return True
            if name == "jax_plugins" and importlib.util.find_spec("jax_plugins.xla_cuda12"):
                return True
        except ModuleNotFoundError:
            continue
    return False


def apply(force: bool = False) -> dict[str, str]:
    """Adds the GPU flags to XLA_FLAGS and env defaults; returns what was set."""
    if not (force or has_cuda_plugin()):
        return {}
    current = os.environ.get("XLA_FLAGS", "")
    added = {}
    for flag, value in XLA_GPU_FLAGS.items():
        if flag not in current:
            current += f" {flag}={value}"
            added[flag] = value
    os.environ["XLA_FLAGS"] = current.strip()
    for key, value in ENV_DEFAULTS.items():
        if key not in os.environ:
            os.environ[key] = value
            added[key] = value
    return added
