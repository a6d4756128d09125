"""A private temporary directory for one process's lifetime, swept up after that process is killed.

The trainer's launcher hands its torchrun workers the resolved config and collects their exit
outcomes through files that must not live in the run dir (they are node-local and private to one
launch; torchrun's own files go there too), and an eval job writes lm-eval's task files for its
offline data. A ``finally`` removes them, but SIGKILL (the OOM killer, a SLURM node whose step is
killed) skips every ``finally``, and such files used to pile up in ``/tmp`` for good. So the
directory is named after the process that owns it (``<prefix><host>-<pid>-XXXX``): whoever opens
the next one on that host removes those whose owner is gone. (The host is in the name because
some clusters point ``TMPDIR`` at a filesystem that every node shares, where a PID says nothing
about another node's processes.)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from common.processes import pid_running


def owner_prefix(prefix: str) -> str:
    """``<prefix><host>-``: the host name with anything but letters, digits, '.' and '-' dropped."""
    return f"{prefix}{re.sub(r'[^A-Za-z0-9.-]', '', socket.gethostname()) or 'host'}-"


def sweep_orphans(prefix: str, parent: Path | None = None) -> list[Path]:
    """Remove this user's ``<prefix><this host>-<pid>-*`` directories in ``parent`` (the temp dir) whose
    process is gone; returns what was removed. Errors are ignored: a sweep must never stop a launch."""
    parent = Path(parent or tempfile.gettempdir())
    # the whole name, mkdtemp's 8-character suffix included: host "node" must not read "node-12-345-…" as PID 12
    pattern = re.compile(re.escape(owner_prefix(prefix)) + r"(\d+)-[a-z0-9_]{8}")
    removed = []
    try:
        candidates = list(parent.glob(f"{prefix}*"))
    except OSError:
        return removed
    for path in candidates:
        m = pattern.fullmatch(path.name)
        try:
            if not m or not path.is_dir() or path.is_symlink() or path.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        # a reused PID keeps the directory (a few kilobytes); removing a live launch's files would break its run
        if not pid_running(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def owned_scratch_dir(prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """A new mode-0700 directory ``<prefix><host>-<this pid>-XXXX`` in ``parent`` (the temp dir), removed on
    exit; the directories of earlier owners that were killed are removed first (:func:`sweep_orphans`)."""
    sweep_orphans(prefix, parent)
    path = Path(tempfile.mkdtemp(prefix=f"{owner_prefix(prefix)}{os.getpid()}-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
