"""Preemption: SIGTERM as a flag, and the step at which every process stops.

SIGTERM only sets a flag. The long loops (harvest's batches, training's steps) stop at a step every
process agrees on:
    one process      the next step boundary;
    several          JAX's preemption sync point (the coordination service propagates the notice
                     and picks max(step over processes) + 1; JAX's own SIGTERM handler sets the flag).
The loop then commits what it has (harvest: the part record of its last whole chunk; training: a
checkpoint) and exits with ``EXIT_PREEMPTED`` (75, EX_TEMPFAIL: "try again"); rerunning the same
command resumes exactly.
"""
from __future__ import annotations

import signal
import threading

import jax

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): preempted after committing its work; rerun to resume


class Preempted(SystemExit):
    """Raised once the preempted loop's work is on disk; exits the process with code 75."""

    def __init__(self, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.step = step


class PreemptionWatch:
    """Whether to stop at this step for preemption (see the module docstring)."""

    def __init__(self):
        self.multi = jax.process_count() > 1
        self.flag = False
        self._old = None
        # Several processes: JAX's coordination service owns SIGTERM. Python signal handlers can
        # only be set from the main thread; elsewhere (a library caller's thread) SIGTERM kills.
        if not self.multi and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):  # only sets a flag: the loop saves at the next step
        self.flag = True

    def reached(self, step: int) -> bool:
        """Call at every step with the number of steps done; True at the agreed save step."""
        if not self.multi:
            return self.flag
        from jax.experimental import multihost_utils
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # preemption service disabled (jax_enable_preemption_service=False)
            return False

    def close(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None
