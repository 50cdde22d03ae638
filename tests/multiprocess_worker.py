"""One process of the multi-process CPU test (tests/test_multiprocess.py): trains the tiny config.

    python tests/multiprocess_worker.py WORKDIR CACHE_DIR STEPS [PROCESS_ID NUM_PROCESSES PORT]

With the last three arguments it first joins a jax.distributed run whose coordinator listens on
127.0.0.1:PORT (process 0 starts it), and pins gloo, the CPU cross-process collectives, to
127.0.0.1 too; without them it is a plain single-process run. The device count comes from
XLA_FLAGS (--xla_force_host_platform_device_count), set by the caller with JAX_PLATFORMS=cpu.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MESH = (2, 4, 1)  # data x expert x model: 8 devices, the data axis across the two processes
NUM_STREAMS = 2  # fixed, so one process reads exactly the rows two read together


def worker_config(steps: int, cache_dir: str):
    """The tests' tiny float32 model on the (2, 4, 1) mesh: a metric row every step, one eval
    (2 batches) and one checkpoint at the end."""
    from tests.helpers import tiny_config

    config = tiny_config()
    config.model.vocab_size = 320
    config.mesh.shape = MESH
    config.data.cache_dir = str(cache_dir)
    config.data.num_streams = NUM_STREAMS
    t = config.train
    t.steps = steps
    t.log_every = 1
    t.eval_every = 0
    t.eval_batches = 2
    t.checkpoint_every = 0
    t.progress_bar = False
    t.learning_rate = 0.05
    t.warmup_steps = 5
    return config


def _gloo_on_loopback() -> None:
    """Makes the CPU backend's gloo collectives listen on 127.0.0.1 rather than on the address
    the host name resolves to (jax's default). Private jax API: skipped if it moved."""
    try:
        from jax._src import distributed, xla_bridge
        from jax._src.lib import _jax
    except ImportError:
        return

    def make_client():
        collectives = _jax.make_gloo_tcp_collectives(
            distributed_client=distributed.global_state.client, hostname="127.0.0.1"
        )
        return xla_bridge.make_cpu_client(collectives=collectives)

    xla_bridge.register_backend_factory("cpu", make_client, priority=0, fail_quietly=False)


def main(argv: list[str]) -> None:
    workdir, cache_dir, steps = argv[0], argv[1], int(argv[2])
    import jax

    if len(argv) > 3:
        process_id, num_processes, port = (int(a) for a in argv[3:6])
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            coordinator_bind_address=f"127.0.0.1:{port}",
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=120,
        )
        _gloo_on_loopback()
    from glam_jax import train

    config = worker_config(steps, cache_dir)
    train.train_and_evaluate(config, workdir)
    print(
        f"worker {jax.process_index()}/{jax.process_count()} done: "
        f"{jax.local_device_count()} of {jax.device_count()} devices",
        flush=True,
    )
    if len(argv) > 3:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
