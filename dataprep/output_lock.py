"""One writer per dataset: ``OUTPUT_DIR/.lock`` (an advisory flock, :mod:`common.locking`).

Why: two data stages on one ``data.output_dir`` (a second ``pretrain data``, or a workflow's data
job beside one started by hand) would both write its ``.work/`` and shards, and one with other
settings would discard the other's work (its fingerprint differs) while that one is still
writing. The lock is held from before Ray starts until the manifest is committed; a second writer
is refused (exit 2) naming the holder, after a short wait (longer in a requeued SLURM job, whose
previous incarnation may still be exiting).

A finished dataset that this user cannot write to (a team's read-only copy) needs no lock: the
stage only reads it, to see that it is complete.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

from common.locking import HolderLock, LockHeld
from dataprep.errors import DataError
from dataprep.shards import MANIFEST_NAME

LOCK_NAME = ".lock"
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def lock_output_dir(output_dir: Path) -> HolderLock | None:
    """The held lock of ``output_dir`` (created if missing); None for a finished dataset this user
    cannot write. Raises DataError (exit 2) when another writer holds it or the dir is unwritable."""
    lock = HolderLock(output_dir / LOCK_NAME, str(output_dir), "data",
                      "one writer per dataset: wait for it to end or set data.output_dir to another directory",
                      log=lambda m: print(f"pretrain data: {m}", file=sys.stderr, flush=True))
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        return lock.acquire()
    except LockHeld as e:
        raise DataError(str(e)) from e
    except OSError as e:
        if e.errno in _NOT_WRITABLE and (output_dir / MANIFEST_NAME).is_file():
            return None
        raise DataError(f"data.output_dir {output_dir}: cannot write there ({e.strerror})") from e
