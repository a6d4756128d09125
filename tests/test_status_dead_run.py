"""`pretrain status` of a local run whose `pretrain run` was killed without cleanup (SIGKILL, the OOM
killer, a reboot) does not say it runs: its stage, left ``running`` in workflow.json for ever, is shown
``interrupted``, with no ETA "while it runs", when it was last seen and how to resume.

Before, such a run was shown ``running`` with an ETA hours after it died. Whether it runs is read
from the run dir's workflow lock (held by a live `pretrain run` for all its stages), without taking it.

Real run: torchrun with gloo; the data stage is recorded done over a shard directory written directly
(tests/test_status_local_failures.py's ``local_run``), so no Ray starts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from tests.evals_helpers import hellaswag_rows, write_jsonl
from tests.test_status_local_failures import local_run, shown
from tests.trainer_helpers import alive, descendants, kill_tree, metric_steps, pretrain_cmd, start

pytestmark = pytest.mark.slow


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_status_of_a_killed_local_run_says_it_is_not_running_and_how_to_resume(tmp_path, capsys):
    hellaswag = tmp_path / "hellaswag.jsonl"
    write_jsonl(hellaswag, hellaswag_rows(3, seed=1))
    cfg, run_dir = local_run(tmp_path, "killed", hellaswag)
    proc = start(pretrain_cmd("run", str(cfg), "train.max_steps=5000", "train.ckpt_every=2"), tmp_path / "run.log")
    try:
        def committed() -> bool:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            return any(run_dir.glob("checkpoints/step_*/COMMITTED.json"))

        _wait(committed, 120, "a committed checkpoint")
        # 1. while it runs: running, with its ETA
        text, st = shown(run_dir, "train", capsys)
        assert (st["status"], st["running"], st["driver"]["pid"]) == ("running", True, proc.pid), st
        assert "not running" not in text, text
        from pipelines.status import status_data

        _wait(lambda: metric_steps(run_dir) >= 3, 120, "3 steps (an ETA needs two)")
        training = status_data(run_dir)["training"]  # rank 0 holds the train lock: it runs, with an ETA
        assert training["running"] is True and training["eta_s"] == training["time_left_s"] > 0, training
        # 2. its driver killed without cleanup (its children stop with it): not running, how to resume
        children = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        _wait(lambda: not alive(children), 30, "the run's children to stop")
    finally:
        kill_tree(proc)
    assert json.loads((run_dir / "workflow.json").read_text())["stages"]["train"]["status"] == "running"  # what it left
    from pipelines.cli import main

    assert main(["status", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert main(["status", "--json", str(run_dir)]) == 0
    data = json.loads(capsys.readouterr().out)
    st, step = data["workflow"]["stages"]["train"], data["last_checkpoint"]["step"]
    assert (st["status"], st["meaning"], st["running"], st["recorded_status"]) == ("interrupted", "stopped", False, "running"), st
    assert st["driver"]["pid"] == proc.pid and st["last_seen"] >= data["training"]["last_step_time"], st
    assert data["training"]["eta_s"] is None and data["training"]["running"] is False and "while it runs" not in text, text
    assert "  train   interrupted " in text and f"(host {socket.gethostname()}, pid {proc.pid}) is gone" in text, text
    assert f"run the same command again to resume from the last checkpoint (step {step})" in text, text


def test_a_lock_record_is_checked_against_its_process_not_trusted(tmp_path):
    """A pid reused by another process is no holder; a holder on another host cannot be checked."""
    from common.locking import HolderLock, holder_alive, read_holder

    path = tmp_path / "workflow.lock"
    with HolderLock(path, "d", "workflow", "wait"):
        info = read_holder(path)
        assert info["pid"] == os.getpid() and holder_alive(path, info) is True
    assert read_holder(path) == {} and holder_alive(path, {}) is False  # let go: names no one
    here = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}  # alive, but not holding the file
    assert holder_alive(path, here) is False
    assert holder_alive(path, {**here, "host": "another-node"}) is None
