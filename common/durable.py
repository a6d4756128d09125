"""Durable file writes and file hashing: the one place that knows how to make a write survive a crash.

A write that matters goes to a temporary name in the same directory, is flushed and fsynced, then
renamed over the target, and the directory is fsynced so the rename itself survives a power cut.
Readers therefore see the old file or the new one, never a torn one, and a failure (a full disk,
a signal) leaves no temporary file behind. Commit markers (checkpoints, shard manifests) are written
with these helpers *last*, which is what makes a directory "committed".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: str | Path) -> None:
    """Make the directory entries of ``path`` (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: str | Path) -> Path:
    """The temporary sibling a write to ``path`` goes through (hidden, per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


@contextlib.contextmanager
def atomic_output(path: str | Path, mode: str = "wb", create_parents: bool = False) -> Iterator[IO[Any]]:
    """``with atomic_output(path) as f: f.write(...)``: ``path`` appears only once the block ends
    without an exception, with its content fsynced; on an exception the temp file is removed."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_output writes whole files ('wb' or 'w'), not {mode!r}")
    path = Path(path)
    if create_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def publish(tmp: str | Path, path: str | Path) -> None:
    """Rename a finished temp file or directory (its contents already fsynced by the writer that
    streamed it) to ``path`` and make the rename durable. For writers that build their output over
    many calls (a chunk's token file, a download, a checkpoint directory) and cannot use
    :func:`atomic_output`'s single ``with`` block."""
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_write_bytes(path: str | Path, data: bytes, create_parents: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    with atomic_output(path, "wb", create_parents) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, create_parents: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), create_parents)


def atomic_write_json(path: str | Path, obj: Any, create_parents: bool = False) -> None:
    """JSON with sorted keys and a final newline (stable bytes: diffs and hashes stay meaningful)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"), create_parents)


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (shards and checkpoints are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
