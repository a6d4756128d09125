"""The signals that mean "stop now, you will be run again" everywhere in this project: SIGTERM
(preemption, ``scancel``, ``kill``, SLURM's end of a time limit) and SIGUSR2 (SLURM's warning
before the time limit, ``--signal=USR2@N``). Whatever receives one exits 3, "requeue me"; what
dies of one was stopped, not failed (``slurm.node_command``)."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


def ignore_stop_signals() -> None:
    """The process's outcome is decided: from here to its end, a stop signal has nothing left to
    stop. Its default action would turn "done" (0) or "requeue me" (3) into "killed", which a SLURM
    job reports as a failure, and SLURM's signals can come at any moment, the last one included."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
