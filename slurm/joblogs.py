"""Reading how a job ended from its logs: every task's, not only the first node's.

A job of several nodes writes one log pair per task (submitit's ``<job>_<task>_log.err/.out``).
The task that failed first writes the job's exit line ("... exited with code N", see
:mod:`slurm.node_command`) and ends the others' step: node 0 is then killed or fails as a
consequence (its peer is gone), so its own log says nothing, or 1. A refusal (2: fix the config
or the data) on any node is what the job ended of, and what a waiting client must report."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_TASK_LOG = re.compile(r"(?P<prefix>.+)_(?P<task>\d+)_log\.(?:err|out)")
REFUSED = 2


@dataclass(frozen=True)
class ExitLine:
    code: int
    line: str  # the whole log line, to show why
    path: Path  # the log that holds it


def task_logs(first_log: str | Path) -> list[tuple[Path, Path]]:
    """(stderr, stdout) of every task of the job whose task-0 log is ``first_log``, task 0 first.
    A log that is not submitit's per-task one (an sbatch job's ``%x-%j.out``) is the job's only one."""
    first = Path(first_log)
    m = _TASK_LOG.fullmatch(first.name)
    if m is None:
        return [(first, first)]
    tasks = {m.group("task")}
    try:
        tasks |= {t.group("task") for p in first.parent.glob(f"{m.group('prefix')}_*_log.*")
                  if (t := _TASK_LOG.fullmatch(p.name)) and t.group("prefix") == m.group("prefix")}
    except OSError:
        pass
    base = first.parent / m.group("prefix")
    return [(Path(f"{base}_{t}_log.err"), Path(f"{base}_{t}_log.out")) for t in sorted(tasks, key=int)]


def _last_in(paths: tuple[Path, Path], pattern: re.Pattern[str]) -> ExitLine | None:
    """The last line matching ``pattern`` (one group: the code) in one task's logs, stderr first."""
    for path in dict.fromkeys(paths):  # an sbatch job's stderr is its stdout: read once
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        found = [m for line in text.splitlines() if (m := pattern.search(line))]
        if found:
            return ExitLine(int(found[-1].group(1)), found[-1].string.strip(), path)
    return None


def final_exit(first_log: str | Path, pattern: str = r"exited with code (-?\d+)") -> ExitLine | None:
    """How the job ended, from its tasks' last exit lines: a refusal (2) on any node, else the first
    node's line, else the first other node's; None if no task wrote one."""
    compiled = re.compile(pattern)
    lines = [found for logs in task_logs(first_log) if (found := _last_in(logs, compiled)) is not None]
    refused = [e for e in lines if e.code == REFUSED]
    return (refused or lines or [None])[0]
