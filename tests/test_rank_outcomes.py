"""How a failed training's launcher names the rank that failed: what each rank writes as it ends
(``trainer.train._write_exit_status``) read back by the launcher (``trainer.launch``). The whole
path, with a rank killed by SIGKILL, is tests/test_status_local_failures.py's."""

from __future__ import annotations

import time

import torch

from trainer import EXIT_FAILURE, EXIT_FILE_ENV, EXIT_REQUEUE
from trainer.dist import DistEnv
from trainer.launch import _first_failure, _rank_outcomes
from trainer.train import _write_exit_status


def _end(monkeypatch, exit_file: str, rank: int, code: int, reason: str) -> None:
    monkeypatch.setenv(EXIT_FILE_ENV, exit_file)
    _write_exit_status(DistEnv(rank, rank, 3, torch.device("cpu"), "gloo"), code, reason)


def test_the_first_error_in_time_is_named_not_the_lost_connections_that_follow(tmp_path, monkeypatch):
    exit_file = str(tmp_path / "exit.json")
    _end(monkeypatch, exit_file, 2, EXIT_FAILURE, "ValueError: bad batch\nTraceback lines")  # the cause, first
    time.sleep(0.01)
    _end(monkeypatch, exit_file, 0, EXIT_FAILURE, "RuntimeError: Connection closed by peer")  # rank 0 writes later
    outcomes, silent = _rank_outcomes(exit_file, 3)
    assert silent == [1] and sorted(o["rank"] for o in outcomes) == [0, 2]
    assert _first_failure(outcomes, silent) == (
        "local rank 1 ended without a word (killed by a signal, e.g. the OOM killer: see `dmesg`; or never started); "
        "first error: rank 2: ValueError: bad batch")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exit.json"]  # the ranks' files are read once and removed


def test_ranks_that_stopped_or_finished_are_no_error(tmp_path, monkeypatch):
    exit_file = str(tmp_path / "exit.json")
    _end(monkeypatch, exit_file, 0, EXIT_REQUEUE, "stopped by signal; checkpoint committed")
    _end(monkeypatch, exit_file, 1, 0, "finished")
    assert _first_failure(*_rank_outcomes(exit_file, 2)) == ""
