"""Children that end with the process that started them (Linux ``PR_SET_PDEATHSIG``).

A training's ranks and an eval job run in processes of their own; when the command that started
them dies without cleanup (SIGKILL, the OOM killer, a closed terminal) they would go on writing
into the run dir, unseen, holding its lock (:mod:`common.locking`) against the user's rerun.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from typing import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def parent_death_signal(signum: int) -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``signum`` when this process dies.

    Choose the signal the child *stops cleanly* on (a training: its stop signal, so it checkpoints;
    a submitit job controller: SIGINT, its cancel), not SIGKILL, so that no work is lost.

    The kernel sends it when the *thread* that forked the child ends, not the process: tied from
    another thread, the child would be stopped with that thread. So only a child started from the
    main thread (which lives as long as the process) is tied; elsewhere, and off Linux, the
    returned function does nothing and the child lives on as before. A parent that died between
    the fork and the ``prctl`` sends nothing: the child checks and exits at once instead."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return lambda: None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: nothing is loaded after the fork
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        if os.getppid() != parent:  # reparented already: our parent is gone
            os._exit(128 + int(signum))

    return preexec
