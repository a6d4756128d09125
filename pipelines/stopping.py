"""Stop signals in the foreground commands that run a stage in this process (`pretrain run`'s local
stages, `pretrain data`): SIGTERM/SIGUSR2 (preemption, SLURM's time-limit warning, ``kill``) and
Ctrl-C interrupt the work where it is; everything finished so far is on disk, so the command
exits 3 ("requeue me") for a stop signal and 130 for Ctrl-C, and the same command resumes.

Training is the exception: its launcher installs its own handlers (it forwards the signal to the
workers, which checkpoint and exit 3) and swallows the KeyboardInterrupt of a Ctrl-C.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

from common.stop_signals import STOP_SIGNALS

__all__ = ["StopRequested", "is_stop_signal", "signals_deferred", "stop_signals"]


class StopRequested(KeyboardInterrupt):
    """SIGTERM/SIGUSR2 arrived while a stage ran: interrupt it where it is.

    A KeyboardInterrupt so that every stage's own interrupt handling runs (Ray shutdown, eval job
    cancellation) and no ``except Exception`` swallows it; the caller turns it into exit 3 ("requeue
    me") at the stage boundary."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def is_stop_signal(signum: int | None) -> bool:
    """Whether the recorded interruption was a stop signal (exit 3) rather than Ctrl-C (130)."""
    return signum in STOP_SIGNALS


@contextlib.contextmanager
def stop_signals(record: Callable[[int], None]) -> Iterator[None]:
    """While the block runs: the first SIGTERM/SIGUSR2 raises :class:`StopRequested` in the main
    thread and a first SIGINT a KeyboardInterrupt; ``record(signum)`` is called first for each.

    The record is what tells a stop from a Ctrl-C afterwards: a library in between may turn the
    exception into another interruption (Ray re-raises a plain KeyboardInterrupt).

    Only the first signal raises. The stop is then under way, and what unwinds it (cancelling eval
    jobs, saving their state, stopping Ray) must run to its end: SLURM and ``kill -- -PGID`` often
    deliver a signal twice, and a second exception raised inside that cleanup left jobs counted as
    failed and turned exit 3 into 130. Later signals are only recorded."""
    raised = False

    def first_raises(signum: int, exc: KeyboardInterrupt) -> None:
        nonlocal raised
        record(signum)
        if not raised:
            raised = True
            raise exc

    def stop(signum: int, frame: Any) -> None:
        first_raises(signum, StopRequested(signum))

    def interrupt(signum: int, frame: Any) -> None:
        first_raises(signum, KeyboardInterrupt())

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        # The block is over: a signal from here on is only recorded. One raised while the handlers
        # are put back would cut that short and leave ours installed, and at interpreter exit Python
        # resets a function handler to the default action: the next SIGTERM then killed a process
        # whose outcome was decided (exit 3 became -15).
        raised = True
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Stop signals and Ctrl-C that arrive in the block take effect when it ends (raised again, to
    whatever handles them outside). For a step that must not be cut in two: `pretrain run
    --executor slurm` between sbatch queueing a job and ``workflow.json`` naming it, where an
    interruption left a job nobody knew of and the rerun queued a second one beside it."""
    got: list[int] = []
    held = (*STOP_SIGNALS, signal.SIGINT)
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in got:  # now they interrupt, as they would have
            signal.raise_signal(s)
