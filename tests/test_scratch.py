"""A launch's private temp directory: removed when the launch ends, and swept by the next one when the
launch was killed without cleanup (tests/test_orphans.py shows it on a SIGKILLed `pretrain run`)."""

from __future__ import annotations

import os

from common.scratch import owned_scratch_dir, owner_prefix, sweep_orphans
from tests.trainer_helpers import dead_pid

HOST = owner_prefix("").rstrip("-")  # this host's name as the directories carry it


def test_the_next_owner_removes_only_the_directories_of_processes_that_are_gone(tmp_path):
    gone = tmp_path / f"pretrain-launch-{HOST}-{dead_pid()}-abc_1234"
    live = tmp_path / f"pretrain-launch-{HOST}-{os.getppid()}-def_1234"  # the test runner's parent: alive
    other_prefix = tmp_path / f"other-{HOST}-{dead_pid()}-ghi_1234"
    # a TMPDIR shared by the nodes: another host's PIDs are not ours to judge, even host "<ours>-12"'s
    other_hosts = [tmp_path / f"pretrain-launch-{HOST}x-{dead_pid()}-jkl_1234",
                   tmp_path / f"pretrain-launch-{HOST}-12-{dead_pid()}-mno_1234"]
    kept = [live, other_prefix, *other_hosts]
    for d in (gone, *kept):
        d.mkdir()
        (d / "config.yaml").write_text("x")
    not_a_dir = tmp_path / f"pretrain-launch-{HOST}-{dead_pid()}-file_123"
    not_a_dir.write_text("x")
    kept.append(not_a_dir)

    with owned_scratch_dir("pretrain-launch-", tmp_path) as mine:
        assert mine.name.startswith(f"pretrain-launch-{HOST}-{os.getpid()}-") and oct(mine.stat().st_mode)[-3:] == "700"
        (mine / "exit.json").write_text("{}")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in kept] + [mine.name])
    assert not mine.exists()  # removed on the way out
    assert sweep_orphans("pretrain-launch-", tmp_path) == []  # nothing else is gone
    assert all(p.exists() for p in kept)
