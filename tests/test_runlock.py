"""One writer per run dir (trainer.runlock): real processes holding real flocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.runlock import REQUEUE_WAIT_S, WAIT_S, RunLock, RunLockHeld, default_wait_s

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from trainer.runlock import RunLock
RunLock(sys.argv[1], sys.argv[3], wait_s=0).acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold(run_dir: Path, seconds: float, env: dict | None = None, role: str = "train") -> subprocess.Popen:
    """Another process that takes the run dir's `role` lock and keeps it `seconds`."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(seconds), role], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    holder = hold(tmp_path, 30, env={"SLURM_JOB_ID": "4242"})
    try:
        with pytest.raises(RunLockHeld) as e:
            RunLock(tmp_path, "train", wait_s=0.5, log=lambda m: None).acquire()
        assert f"pid {holder.pid}" in str(e.value) and "SLURM job 4242" in str(e.value) and "(train)" in str(e.value)
        RunLock(tmp_path, "evals-watch", wait_s=0).acquire().release()  # other roles are independent
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_holder_is_free_at_once(tmp_path):
    holder = hold(tmp_path, 30)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    t0 = time.monotonic()
    lock = RunLock(tmp_path, "train", wait_s=0).acquire()  # no stale lock file to clean up
    assert lock.held and time.monotonic() - t0 < 1
    lock.release()


def test_a_waiter_gets_the_lock_when_the_holder_ends(tmp_path):
    """What a requeued SLURM job relies on: the previous incarnation is still exiting when it starts."""
    holder = hold(tmp_path, 1.5)
    messages: list[str] = []
    t0 = time.monotonic()
    lock = RunLock(tmp_path, "train", wait_s=20, log=messages.append).acquire()
    waited = time.monotonic() - t0
    assert lock.held and 0.5 < waited < 15 and "waiting up to 20 s" in messages[0]
    lock.release()
    holder.wait()


def test_a_requeued_job_waits_longer(monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert default_wait_s() == WAIT_S
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert default_wait_s() == REQUEUE_WAIT_S > WAIT_S


def test_restart_from_is_refused_while_a_training_or_watcher_writes_the_run_dir(tmp_path):
    """`pretrain run --restart-from train|eval` moves the run's outputs into archive/: a training or
    eval watcher still writing them (started by hand, or a job of another workflow) would go on
    writing beside the restarted stages, one run dir with two writers."""
    from pipelines.config import load_config
    from pipelines.workflow import Workflow

    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "evals").mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(f"run_dir: {run}\ntracking: {{uri: none}}\n")
    wf = Workflow(str(config), [], load_config(config), log=lambda m: None)
    for st in wf.stages.values():
        st.status = "done"
    wf.save()
    before = (run / "workflow.json").read_text()
    for role, restart in (("train", "train"), ("evals-watch", "eval")):
        holder = hold(run, 60, role=role)
        try:
            r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(config), "--restart-from", restart],
                               cwd=REPO, capture_output=True, text=True, timeout=120)
        finally:
            holder.kill()
            holder.wait()
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"--restart-from {restart} would move outputs that are still being written" in r.stderr
        assert f"({role}) by host" in r.stderr and f"pid {holder.pid}" in r.stderr, r.stderr
        assert not (run / "archive").exists() and (run / "workflow.json").read_text() == before
    # the writers gone, the same restart goes ahead
    wf = Workflow(str(config), [], load_config(config), log=lambda m: None)
    wf.check_config("eval")
    assert [p.name for p in (run / "archive").iterdir()] and not (run / "evals").exists()
    assert wf.stages["eval"].status == "pending" and wf.stages["train"].status == "done"
