"""Stopping a training run cleanly: SIGTERM or Ctrl-C set a flag the loop checks between steps
(`StopFlag`), and DataLoader workers ignore both signals and are stopped when the loop ends.
"""
from __future__ import annotations

import functools
import signal
import time
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _ignore_stop_signals(worker_id: int, inner=None) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if inner is not None:
        inner(worker_id)


def worker_init_ignoring_stop_signals(inner=None):
    """A DataLoader `worker_init_fn` that makes the worker ignore SIGTERM and SIGINT, then calls `inner`.

    A signal sent to the whole process group (SLURM's SIGTERM, a terminal's Ctrl-C) reaches the workers
    too; dying of it, they would take the run down before the main process could save a checkpoint.
    """
    return functools.partial(_ignore_stop_signals, inner=inner)


@contextmanager
def workers_stopped(batches) -> Iterator[None]:
    """Stop the DataLoader's worker processes when the loop ends, however it ends. They ignore SIGTERM
    (`worker_init_ignoring_stop_signals`), and Python's exit handlers terminate and then join them
    without a timeout: a run that stopped on an error would print it and then never exit."""
    try:
        yield
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator only
        if shutdown is not None:
            shutdown()


class StopFlag:
    """SIGTERM or Ctrl-C (SIGINT) -> a flag the loop checks between steps. Another Ctrl-C, a second or more
    after the first, interrupts at once (KeyboardInterrupt)."""

    # `accelerate launch` forwards the terminal's Ctrl-C to processes that got it already: one press, two signals.
    REPEAT_S = 1.0

    def __init__(self):
        self.raised, self.name, self._since = False, None, 0.0
        self._previous = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, the run is simply not interruptible
                pass
        return self

    def _handle(self, signum, frame):
        now = time.monotonic()
        if not self.raised:
            self.raised, self.name, self._since = True, "Ctrl-C" if signum == signal.SIGINT else "SIGTERM", now
        elif signum == signal.SIGINT and now - self._since >= self.REPEAT_S:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            if previous is not None:
                signal.signal(sig, previous)
