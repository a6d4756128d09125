"""The signals that mean "stop now, you will be run again" everywhere in this project: SIGTERM
(preemption, ``scancel``, ``kill``, SLURM's end of a time limit) and SIGUSR2 (SLURM's warning
before the time limit, ``--signal=USR2@N``). Whatever receives one exits 3, "requeue me"; what
dies of one was stopped, not failed (``slurm.node_command``).

A process hears them over its whole life, in three phases, and this module owns the first and last:

1. Held (:func:`hold_stop_signals`), from the first line of an entry point (``pretrain``,
   ``python -m trainer.train``) until the real handler exists: the imports before it (torch, the
   CLI's stages: 0.3 s to 3 s, more on a loaded node) are exactly when SLURM's signal for a job
   that just started, or was requeued, tends to come. The default action would kill the process
   (-15, which SLURM and our launcher read as "killed"); ignoring the signal would lose it and let
   the run go on. So it is only recorded here.
2. Handled: the command's own handler (``pipelines.stopping.stop_signals``,
   ``trainer.signals.StopFlag``) takes over and first calls :func:`replay_held_stop_signals`, so
   a signal that came while the process started acts as if it came just now: exit 3, promptly.
3. Ignored (:func:`ignore_stop_signals`), once the outcome is decided.

Only the interpreter's own start-up (~20-50 ms before an entry module's first line runs) is left
to the default action: no Python code runs then.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

_held: list[int] = []  # stop signals received while held, first first (process-wide, as signals are)


def _hold(signum: int, frame: object) -> None:
    _held.append(signum)  # nothing else: this may run in the middle of any import


def hold_stop_signals() -> None:
    """Record stop signals instead of dying of them, until a real handler takes them over (phase 1
    in the module doc). Cheap (no import beyond ``signal``): call it before any heavy import."""
    for s in STOP_SIGNALS:
        signal.signal(s, _hold)


def replay_held_stop_signals() -> None:
    """Deliver the first stop signal received while held to the handler installed now (call it
    right after installing it): it runs here, in this thread, as if the signal came now."""
    if _held:
        first = _held[0]
        _held.clear()
        signal.raise_signal(first)


def release_stop_signals() -> None:
    """For a process that will install no handler of its own (a quick command such as ``pretrain
    status``): stop signals get their default action back, and one held meanwhile takes effect now,
    as it would have without the hold. A no-op where they are not held."""
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is _hold:
            signal.signal(s, signal.SIG_DFL)
    replay_held_stop_signals()


def ignore_stop_signals() -> None:
    """The process's outcome is decided: from here to its end, a stop signal has nothing left to
    stop. Its default action would turn "done" (0) or "requeue me" (3) into "killed", which a SLURM
    job reports as a failure, and SLURM's signals can come at any moment, the last one included."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    _held.clear()  # one held meanwhile came too late to stop anything
