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


def test_a_crashed_ranks_traceback_is_kept_in_the_run_dir_and_named(tmp_path, monkeypatch):
    """A rank that crashes keeps its whole traceback under RUN_DIR/errors/ (the terminal that ran it
    may be gone); the launcher's line names the file of the first error, and the first file
    written since a stage started is what `pretrain run` records as that stage's log."""
    from trainer.failure_log import first_since, keep_traceback

    run_dir, exit_file = tmp_path / "run", str(tmp_path / "exit.json")
    old = keep_traceback(run_dir, 1, 2, RuntimeError("an earlier run's crash"))
    time.sleep(0.01)
    started = time.time()
    time.sleep(0.01)
    try:
        raise ValueError("bad batch") from KeyError("shard 3")
    except ValueError as e:
        cause = keep_traceback(run_dir, 1, 2, e)
    time.sleep(0.01)
    later = keep_traceback(run_dir, 0, 2, RuntimeError("Connection closed by peer"))
    assert len({old, cause, later}) == 3  # nothing overwrites an earlier failure
    text = open(cause).read()
    assert "rank: 1 of 2" in text and "KeyError: 'shard 3'" in text and "ValueError: bad batch" in text, text
    assert "The above exception was the direct cause" in text and "test_rank_outcomes.py" in text, text
    assert str(first_since(run_dir, started)) == cause
    assert first_since(run_dir, time.time() + 1) is None and first_since(tmp_path / "no-run", 0) is None

    monkeypatch.setenv(EXIT_FILE_ENV, exit_file)
    _write_exit_status(DistEnv(1, 1, 2, torch.device("cpu"), "gloo"), EXIT_FAILURE, "ValueError: bad batch", cause)
    time.sleep(0.01)
    _write_exit_status(DistEnv(0, 0, 2, torch.device("cpu"), "gloo"), EXIT_FAILURE, "RuntimeError: Connection closed", later)
    assert _first_failure(*_rank_outcomes(exit_file, 2)) == f"first error: rank 1: ValueError: bad batch (traceback: {cause})"


def test_an_unwritable_run_dir_costs_the_traceback_not_the_outcome(tmp_path):
    from trainer.failure_log import keep_traceback

    blocker = tmp_path / "run"
    blocker.write_text("a file where the run dir should be")
    assert keep_traceback(blocker, 0, 1, RuntimeError("boom")) is None  # says so on stderr, raises nothing


def test_a_launch_dir_swept_away_while_a_rank_ends_costs_the_note_not_the_ranks_exit(tmp_path, monkeypatch, capsys):
    """The launcher was SIGKILLed and the next launch removed its directory (common.scratch) while
    this rank was still checkpointing: writing the outcome fails, and the rank still ends as it chose."""
    _end(monkeypatch, str(tmp_path / "swept" / "exit.json"), 0, EXIT_REQUEUE, "stopped by signal; checkpoint committed")
    assert "exit status 3 not written for the launcher" in capsys.readouterr().err
