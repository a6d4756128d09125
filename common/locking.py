"""An exclusive advisory ``flock`` on a file, naming its holder: one writer per directory.

Why flock and not a pid file: a crashed or SIGKILLed holder leaves no stale lock (the kernel
drops it with the process), and there is nothing to clean up. On NFSv4 Linux emulates flock with
POSIX byte-range locks, so it works across nodes; Lustre needs the ``flock`` mount option.

The lock file records who holds it (host, pid, SLURM job id, since when), so a refused second
writer can say whom it met; the holder empties it when it lets go, so a free lock names no one
(and the file's bytes do not differ from one run to the next). The file itself stays: deleting it
would race with a waiter that has opened it already.

A requeued SLURM job can start (on another node) while the processes of its previous incarnation
are still exiting; it waits up to ``REQUEUE_WAIT_S`` for them to vanish instead of failing.
Users: :mod:`trainer.runlock` (a run dir's roles) and the data stage (its output directory).

Whether a lock is held *now* is asked without taking it (:func:`read_holder`, :func:`holder_alive`:
`pretrain status`): even a shared ``flock`` probe, held for an instant, would make a writer that does
not wait (``wait_s=0``) refuse. A holder killed without cleanup (SIGKILL) leaves its record behind
with its lock freed, so the record alone does not say it runs; its process does.

The kernel frees a lock with its holder, but a holder can outlive the process the user started:
:func:`common.parent_death.parent_death_signal` ties such a child to its parent, so a lock is
never held by an orphan.
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

from common.processes import pid_running

WAIT_S = 10.0  # a local rerun racing the exit of the previous attempt's processes
REQUEUE_WAIT_S = 300.0  # a requeued SLURM job: the previous incarnation may be in SLURM's KillWait


class LockHeld(RuntimeError):
    """Another live process holds the lock (refuse: exit 2); ``holder`` is its record (host, pid, job_id, since)."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


class LockStopped(RuntimeError):
    """The waiter was asked to stop (a stop signal) before the holder went away."""


def holder_text(info: dict[str, Any]) -> str:
    job = f", SLURM job {info['job_id']}" if info.get("job_id") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"])) if info.get("since") else "?"
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}{job}, since {since}"


def default_wait_s() -> float:
    """How long to wait for a holder to go away: long in a requeued SLURM job, short otherwise."""
    return REQUEUE_WAIT_S if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0 else WAIT_S


class HolderLock:
    """``with HolderLock(path, subject, role, advice):`` — exclusive for the block.

    ``subject`` is what the lock protects (a directory), ``role`` which writer it admits, and
    ``advice`` what a refused writer should do; the three make the :class:`LockHeld` message."""

    def __init__(self, path: Path, subject: str, role: str, advice: str, wait_s: float | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.path, self.subject, self.role, self.advice = path, subject, role, advice
        self.wait_s = default_wait_s() if wait_s is None else wait_s
        self.log = log
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, should_stop: Callable[[], bool] | None = None) -> HolderLock:
        """Take the lock, waiting up to ``wait_s`` for a live holder. Raises LockHeld when it
        is still held then, LockStopped as soon as ``should_stop()`` is true while waiting (a
        stop signal must not sit out a wait of minutes, past SLURM's kill deadline)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + self.wait_s
        announced = False
        while not _try_flock(fd):
            info = _read_holder(fd)
            if should_stop is not None and should_stop():
                os.close(fd)
                raise LockStopped(f"stopped while waiting for {self.role} of {self.subject}, held by {holder_text(info)}")
            if time.monotonic() >= deadline:
                os.close(fd)
                raise LockHeld(f"{self.subject} is in use ({self.role}) by {holder_text(info)}; {self.advice} (lock file {self.path})", info)
            if not announced:
                self.log(f"lock: {self.role} of {self.subject} held by {holder_text(info)}; waiting up to {self.wait_s:.0f} s")
                announced = True
            time.sleep(0.5)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": os.environ.get("SLURM_JOB_ID", ""),
                "role": self.role, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the holder record, then unlock."""
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass  # the lock goes with the fd anyway
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> HolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_flock(fd: int) -> bool:
    """True when the exclusive lock was taken; False when another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        return False


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def read_holder(path: Path) -> dict[str, Any]:
    """The holder record in the lock file at ``path``, read without locking anything (so it cannot
    disturb the holder, or a writer about to take it): {} when it names no one (never held, let go,
    or no lock file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        info = _read_holder(fd)
    finally:
        os.close(fd)
    return info if isinstance(info, dict) else {}


def holder_alive(path: Path, info: dict[str, Any]) -> bool | None:
    """Whether the holder that ``info`` (:func:`read_holder` of ``path``) names still holds the lock:
    False when it names no one, or its process on this host is gone (killed without cleanup: the
    kernel freed the lock, the record stayed); None when it is on another host (a shared filesystem:
    its pid means nothing here). A pid reused since by another process does not count: the holder
    has the lock file open, which is checked where this user may look (``/proc/PID/fd``)."""
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if info.get("host") != socket.gethostname():
        return None
    has_open = _has_open(pid, path)
    return pid_running(pid) if has_open is None else has_open


def _has_open(pid: int, path: Path) -> bool | None:
    """Whether process ``pid`` has ``path`` open; None when this cannot be seen (no ``/proc``, or
    another user's process)."""
    if not Path("/proc/self/fd").is_dir():
        return None
    try:
        target = path.stat()
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:  # no such process (or lock file)
        return False
    except OSError:  # PermissionError: another user's process
        return None
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            return True
    return False
