"""A private temporary directory for one process's lifetime, swept up after that process is killed.

The trainer's launcher hands its torchrun workers the resolved config and collects their exit
outcomes through files that must not live in the run dir (they are node-local and private to one
launch). A ``finally`` removes them, but SIGKILL (the OOM killer, a SLURM node whose step is
killed) skips every ``finally``, and such files used to pile up in ``/tmp`` for good. So the
directory is named after the process that owns it (``<prefix><pid>-XXXX``): whoever opens the
next one removes those whose owner is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _owner_alive(pid: int) -> bool:
    """True if a process ``pid`` exists (even one of another user: a reused PID keeps the directory,
    which costs a few kilobytes; removing a live launch's files would break its run)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans(prefix: str, parent: Path | None = None) -> list[Path]:
    """Remove this user's ``<prefix><pid>-*`` directories in ``parent`` (the temp dir) whose process is
    gone; returns what was removed. Errors are ignored: a sweep must never stop a launch."""
    parent = Path(parent or tempfile.gettempdir())
    pattern = re.compile(re.escape(prefix) + r"(\d+)-")
    removed = []
    try:
        candidates = list(parent.glob(f"{prefix}*"))
    except OSError:
        return removed
    for path in candidates:
        m = pattern.match(path.name)
        try:
            if not m or not path.is_dir() or path.is_symlink() or path.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        if not _owner_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def owned_scratch_dir(prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """A new mode-0700 directory ``<prefix><this pid>-XXXX`` in ``parent`` (the temp dir), removed on
    exit; the directories of earlier owners that were killed are removed first (:func:`sweep_orphans`)."""
    sweep_orphans(prefix, parent)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
