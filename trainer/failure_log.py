"""A crashed rank's traceback, kept in the run dir (``RUN_DIR/errors/``).

Why: a training that crashes (a CUDA error, a bug met at step 40,000) prints its traceback to the
terminal or job log that ran it. A local run's terminal is often gone by the time someone asks
why, and the launcher's last line (what ``pretrain status`` shows) holds one line of it. So each
rank that ends on an unexpected error also writes the whole traceback here, under a name of its
own (time, then rank: no failure overwrites another, and names sort in time order). Refusals
(exit 2) and stops (exit 3) write none: their one-line reason is the whole story.

Readers: the launcher names the first failing rank's file in its last line, and ``pretrain run``
records the first file written since its training stage started as the stage's log.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from pathlib import Path

from common.durable import atomic_write_text
from common.rundir import RunDir

PREFIX = "train-"


def _stamp(when: float) -> str:
    """``20261128T053000.123Z``: UTC to the millisecond, so names sort in time order."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z"


def keep_traceback(run_dir: str | Path, rank: int, world_size: int, error: BaseException) -> str | None:
    """Write ``error``'s traceback (with its causes) to ``RUN_DIR/errors/`` and return the path;
    None when it cannot be written (a full disk, a read-only run dir): the error itself must
    still reach the launcher, so this never raises."""
    when = time.time()
    path = RunDir(run_dir).errors / f"{PREFIX}{_stamp(when)}-rank{rank}.txt"
    header = [
        f"time: {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(when))} UTC",
        f"host: {socket.gethostname()}  pid: {os.getpid()}  rank: {rank} of {world_size}"
        + (f"  slurm job: {os.environ['SLURM_JOB_ID']}" if os.environ.get("SLURM_JOB_ID") else ""),
        f"command: {' '.join([sys.executable, *sys.argv])}",
        "",
    ]
    body = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        atomic_write_text(path, "\n".join(header) + body, create_parents=True)
    except OSError as e:
        print(f"train: could not keep the traceback in {path}: {e}", file=sys.stderr, flush=True)
        return None
    return str(path)


def first_since(run_dir: str | Path, since: float) -> Path | None:
    """The earliest traceback any rank (of any node) wrote at or after ``since`` (a time.time()),
    or None: the first error in time is the cause; later ones are usually the lost connections
    that follow it."""
    errors = RunDir(run_dir).errors
    try:
        names = sorted(p.name for p in errors.iterdir() if p.name.startswith(PREFIX) and p.name.endswith(".txt"))
    except OSError:
        return None
    floor = _stamp(since)
    later = [n for n in names if n[len(PREFIX):len(PREFIX) + len(floor)] >= floor]
    return errors / later[0] if later else None
