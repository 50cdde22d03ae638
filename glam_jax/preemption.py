"""Preemption notices: SIGTERM asks the training loop to save at the next step boundary and stop.

A TPU VM, a Kubernetes pod or a Slurm job being preempted gets SIGTERM some seconds before it is
killed. With one process we catch it ourselves and set a flag the loop reads after each step (no
device sync). With several processes (`jax.distributed`), jax's preemption service catches it on
whichever host receives it and agrees with every host on one step to stop at; orbax's
`reached_preemption` asks it, so every process saves the same step.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax._src import distributed  # the preemption service's state: no public accessor yet


class PreemptionWatch:
    """`reached(step, manager)` is True once the run should save and stop; `install()` before
    the loop, `uninstall()` after it."""

    def __init__(self) -> None:
        self.signalled = False
        self._previous = None
        # jax's service installs its own SIGTERM handler; ours would replace it.
        self._multi_process = jax.process_count() > 1 and (
            getattr(distributed.global_state, "preemption_sync_manager", None) is not None
        )

    def install(self) -> None:
        """Catches SIGTERM from here on (one process; jax's service handles several)."""
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def uninstall(self) -> None:
        """Gives SIGTERM back to the handler it had before `install()`."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self.signalled = True

    def reached(self, step: int, manager) -> bool:
        """Whether to save `step` and stop (`manager`: the orbax CheckpointManager)."""
        if self._multi_process:
            return bool(manager.reached_preemption(step))
        return self.signalled
