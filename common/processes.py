"""A process's children and descendants, and whether a process still runs, read from Linux /proc
(children: empty where it is unavailable).

The trainer's launcher forwards stop signals to torchrun's workers by them, and a SLURM node's
command is killed with all of them: torchrun starts its workers in sessions of their own, so a
process group does not reach them.
"""

from __future__ import annotations

import os
from pathlib import Path


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc; empty where unavailable)."""
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            out.extend(int(x) for x in text)
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, children first."""
    found: list[int] = []
    todo = child_pids(pid)
    while todo:
        found.append(child := todo.pop(0))
        todo.extend(child_pids(child))
    return found


def pid_running(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (a zombie has ended: its files are closed)."""
    if Path("/proc/self/stat").is_file():
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False
        except (OSError, IndexError):
            pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
