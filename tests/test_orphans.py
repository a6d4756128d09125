"""A `pretrain run` that dies without cleanup (SIGKILL: the OOM killer, `kill -9`; a closed terminal
kills it the same way) leaves no process of its run behind: torchrun and its ranks stop with the
stop signal (so they checkpoint: the work is kept), the eval stage's jobs are cancelled before they
write anything, and the same command run again resumes at once, with no survivor holding the run
dir's lock, and ends with the uninterrupted run's losses and eval results.

Only the driver is killed (not its process group, as tests/test_chaos.py and a terminal do): what
it started must notice by itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.trainer_helpers import alive, descendants, kill_tree, metric_steps, pretrain_cmd, start
from tests.workflow_helpers import final_metrics, write_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
GONE_S = 20.0  # torchrun's ranks finish a step and commit a checkpoint; an eval job unwinds in about a second


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def kill_driver_when(proc: subprocess.Popen, ready, what: str) -> list[int]:
    """SIGKILL `pretrain run` (the driver alone) once ``ready()``; returns the pids it had started."""
    deadline = time.time() + 180
    while not ready():
        assert proc.poll() is None, f"`pretrain run` exited ({proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    started = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    return started


def wait_gone(pids: list[int], what: str) -> float:
    t0 = time.time()
    while alive(pids):
        left = {pid: cmdline(pid)[:100] for pid in alive(pids)}
        assert time.time() - t0 < GONE_S, f"{what}: still running {GONE_S:.0f} s after `pretrain run` was killed: {left}"
        time.sleep(0.1)
    return time.time() - t0


def eval_results(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("checkpoints/step_*/evals/*.json"))


def test_a_sigkilled_run_leaves_no_process_behind_and_the_rerun_finishes_as_uninterrupted(workflow_reference, workflow_work, gpt2_ranks):
    cfg, run_dir = write_config(workflow_work, "orphans", gpt2_ranks, data_name="reference")
    log = workflow_work / "orphans.log"
    scratch = Path(tempfile.mkdtemp(prefix="orphans-tmp-"))  # the temp dir of every run below (short: Ray's sockets)
    env = {"TMPDIR": str(scratch)}
    procs = []
    try:
        # 1. Killed while training: torchrun and both ranks stop by the stop signal, checkpointing where they were.
        procs.append(proc := start(pretrain_cmd("run", str(cfg)), log, env))
        started = kill_driver_when(proc, lambda: metric_steps(run_dir) >= 2, "training step 2")
        assert len(started) >= 3, [cmdline(p) for p in started]  # torchrun and its two ranks
        took = wait_gone(started, "training")
        text = log.read_text(errors="replace")
        assert "stopped by signal after step" in text and "checkpoint committed, exit 3" in text, text[-3000:]
        print(f"training gone {took:.1f} s after the kill")
        # the killed launcher's private files (resolved config, exit outcomes) are left: no `finally` ran
        left = list(scratch.glob("pretrain-launch-*/config.yaml"))
        assert len(left) == 1, list(scratch.iterdir())

        # 2. Killed while an eval job runs: the job is cancelled and writes nothing more into the run dir.
        procs.append(proc := start(pretrain_cmd("run", str(cfg)), log, env))
        eval_job = lambda: any("submitit.core._submit" in cmdline(p) for p in descendants(proc.pid))  # noqa: E731
        started = kill_driver_when(proc, eval_job, "an eval job")
        results = eval_results(run_dir)
        took = wait_gone(started, "the eval job")
        time.sleep(1.0)  # a survivor's result would land now
        assert eval_results(run_dir) == results
        print(f"eval job gone {took:.1f} s after the kill")
    finally:
        for p in procs:
            kill_tree(p)

    # 3. The same command again: no lock to wait for, and the uninterrupted run's results.
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the next launch removed what the killed ones left, and its own (torchrun's log dir, once a
    # torchelastic_* per run, is in there): nothing of a run piles up in the temp dir (caches do:
    # Ray's, tiktoken's, inductor's)
    left = [p.name for p in scratch.iterdir() if p.name.startswith(("pretrain-", "torchelastic_"))]
    assert not left, sorted(p.name for p in scratch.iterdir())
    shutil.rmtree(scratch, ignore_errors=True)
    assert "held by" not in r.stdout + r.stderr  # nothing of the killed runs held the run dir
    got, want = final_metrics(run_dir), final_metrics(workflow_reference)
    assert got["losses"] == want["losses"]
    # the stop added a checkpoint at the step it stopped at (evaluated too); the reference's are identical
    assert {k: v for k, v in got["evals"].items() if k in want["evals"]} == want["evals"]
