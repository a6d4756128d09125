"""A launch's private temp directory: removed when the launch ends, and swept by the next one when the
launch was killed without cleanup (tests/test_orphans.py shows it on a SIGKILLed `pretrain run`)."""

from __future__ import annotations

import os
import subprocess
import sys

from common.scratch import owned_scratch_dir, sweep_orphans


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_next_owner_removes_only_the_directories_of_processes_that_are_gone(tmp_path):
    gone = tmp_path / f"pretrain-launch-{dead_pid()}-abc"
    live = tmp_path / f"pretrain-launch-{os.getppid()}-def"  # the test runner's parent: alive
    other = tmp_path / f"other-{dead_pid()}-ghi"
    for d in (gone, live, other):
        d.mkdir()
        (d / "config.yaml").write_text("x")
    not_a_dir = tmp_path / f"pretrain-launch-{dead_pid()}-file"
    not_a_dir.write_text("x")

    with owned_scratch_dir("pretrain-launch-", tmp_path) as mine:
        assert mine.name.startswith(f"pretrain-launch-{os.getpid()}-") and oct(mine.stat().st_mode)[-3:] == "700"
        (mine / "exit.json").write_text("{}")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, not_a_dir.name, mine.name])
    assert not mine.exists()  # removed on the way out
    assert sweep_orphans("pretrain-launch-", tmp_path) == []  # nothing else is gone
    assert live.exists() and other.exists() and not_a_dir.exists()
