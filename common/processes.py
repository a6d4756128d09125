"""A process's children and descendants, read from Linux /proc (empty where it is unavailable).

The trainer's launcher forwards stop signals to torchrun's workers by them, and a SLURM node's
command is killed with all of them: torchrun starts its workers in sessions of their own, so a
process group does not reach them.
"""

from __future__ import annotations

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
