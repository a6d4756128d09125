"""One writer per run dir: an advisory ``flock`` per role (:mod:`common.locking`).

Roles are independent locks (``train``, ``evals-watch``, ``workflow``, ``eval-<checkpoint>``):
the workflow holds ``workflow`` while the training it starts holds ``train``, but two trainings,
two watchers or two workflows on one run dir cannot run at once. Lock files live in
``RUN_DIR/.locks/<role>.lock`` and name their holder while it holds them; a requeued SLURM job
waits for the previous incarnation's holder to exit (see :mod:`common.locking`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from common.locking import REQUEUE_WAIT_S, WAIT_S, HolderLock, default_wait_s, holder_text
from common.locking import LockHeld as RunLockHeld
from common.locking import LockStopped as RunLockStopped
from common.rundir import RunDir

__all__ = ["REQUEUE_WAIT_S", "WAIT_S", "RunLock", "RunLockHeld", "RunLockStopped", "default_wait_s", "holder_text"]


class RunLock(HolderLock):
    """``with RunLock(run_dir, "train"):`` — exclusive for the block; raises :class:`RunLockHeld`."""

    def __init__(self, run_dir: str | Path, role: str, wait_s: float | None = None, log: Callable[[str], None] = print) -> None:
        if not role or "/" in role or role.startswith("."):
            raise ValueError(f"bad lock role {role!r}")
        path = RunDir(run_dir).lock(role)
        super().__init__(path, str(path.parent.parent), role,
                         "one writer per run dir: wait for it to end or use another run_dir", wait_s, log)
