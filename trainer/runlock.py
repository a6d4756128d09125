"""One writer per run dir: an advisory ``flock`` per role, released by the kernel when the holder dies.

Roles are independent locks (``train``, ``evals-watch``, ``workflow``, ``eval-<checkpoint>``):
the workflow holds ``workflow`` while the training it starts holds ``train``, but two trainings,
two watchers or two workflows on one run dir cannot run at once. The lock file records who holds
it (host, pid, SLURM job id, since when), so a refused second writer can say whom it met.

Why flock and not a pid file: a crashed or SIGKILLed holder leaves no stale lock (the kernel
drops it with the process), and there is nothing to clean up. On NFSv4 Linux emulates flock with
POSIX byte-range locks, so it works across nodes; Lustre needs the ``flock`` mount option.

A requeued SLURM job can start (on another node) while the processes of its previous incarnation
are still exiting; it waits up to ``REQUEUE_WAIT_S`` for them to vanish instead of failing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from common.rundir import RunDir

WAIT_S = 10.0  # a local rerun racing the exit of the previous attempt's processes
REQUEUE_WAIT_S = 300.0  # a requeued SLURM job: the previous incarnation may be in SLURM's KillWait


class RunLockHeld(RuntimeError):
    """Another live process holds this run dir's lock for the role (refuse: exit 2)."""


class RunLockStopped(RuntimeError):
    """The waiter was asked to stop (a stop signal) before the holder went away."""


def holder_text(info: dict[str, Any]) -> str:
    job = f", SLURM job {info['job_id']}" if info.get("job_id") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"])) if info.get("since") else "?"
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}{job}, since {since}"


def default_wait_s() -> float:
    """How long to wait for a holder to go away: long in a requeued SLURM job, short otherwise."""
    return REQUEUE_WAIT_S if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0 else WAIT_S


class RunLock:
    """``with RunLock(run_dir, "train"):`` — exclusive for the block; raises :class:`RunLockHeld`."""

    def __init__(self, run_dir: str | Path, role: str, wait_s: float | None = None, log: Callable[[str], None] = print) -> None:
        if not role or "/" in role or role.startswith("."):
            raise ValueError(f"bad lock role {role!r}")
        self.path = RunDir(run_dir).lock(role)
        self.role = role
        self.wait_s = default_wait_s() if wait_s is None else wait_s
        self.log = log
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, should_stop: Callable[[], bool] | None = None) -> RunLock:
        """Take the lock, waiting up to ``wait_s`` for a live holder. Raises RunLockHeld when it
        is still held then, RunLockStopped as soon as ``should_stop()`` is true while waiting (a
        stop signal must not sit out a wait of minutes, past SLURM's kill deadline)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + self.wait_s
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            info = self._read_holder(fd)
            if should_stop is not None and should_stop():
                os.close(fd)
                raise RunLockStopped(f"stopped while waiting for {self.role} of {self.path.parent.parent}, held by {holder_text(info)}")
            if time.monotonic() >= deadline:
                os.close(fd)
                raise RunLockHeld(
                    f"{self.path.parent.parent} is in use ({self.role}) by {holder_text(info)}; "
                    f"one writer per run dir: wait for it to end or use another run_dir (lock file {self.path})"
                )
            if not announced:
                self.log(f"lock: {self.role} of {self.path.parent.parent} held by {holder_text(info)}; waiting up to {self.wait_s:.0f} s")
                announced = True
            time.sleep(0.5)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": os.environ.get("SLURM_JOB_ID", ""),
                "role": self.role, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    @staticmethod
    def _read_holder(fd: int) -> dict[str, Any]:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        """Unlock (the file stays: deleting it would race with a waiter that opened it already)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
