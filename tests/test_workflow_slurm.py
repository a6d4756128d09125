"""`pretrain run --executor slurm` when a stage's job fails, on the throw-away SLURM cluster of
tests/test_slurm.py (its fixtures are imported; one module at a time on it): the eval watcher
started beside a training that fails for good ends instead of polling until its time limit, and a
rerun gets the whole chain going again (no job left waiting for a dependency that can never be met)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.test_slurm import (  # noqa: F401  (fixtures)
    FINAL, cluster, logs, losses, pretrain, sacct_state, scontrol_restarts, wait_final, wait_steps,
)
from tests.workflow_helpers import stage_status, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def nodes_resumed(cluster):
    """Both nodes take jobs: a training and its watcher run at once, and on one node of 2 CPUs a
    requeued training waits behind its own watcher. The cluster drains a node on "Kill task failed"
    (seen after a data job on the 2 shared cores of CI, outside what these tests check)."""
    subprocess.run(["scontrol", "update", "nodename=n[1-2]", "state=resume"], capture_output=True)


@contextlib.contextmanager
def lock_held(path: Path) -> Iterator[None]:
    """Another process holds the flock at ``path`` (a run dir or dataset lock) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    code = f"import fcntl, sys, time\nf = open({str(path)!r}, 'a+')\nfcntl.flock(f, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(900)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


def stage_jobs(run_dir: Path) -> dict[str, str]:
    stages = json.loads((run_dir / "workflow.json").read_text())["stages"]
    return {name: st["job_ids"][-1] for name, st in stages.items() if st["job_ids"]}


def wait_state(job: str, want: set[str], timeout: float) -> str:
    deadline = time.time() + timeout
    while (state := sacct_state(job)) not in want:
        assert time.time() < deadline, f"job {job} is {state} after {timeout:.0f} s, not {sorted(want)}"
        time.sleep(1)
    return state


def rerun_and_finish(cfg: Path, run_dir: Path, old: dict[str, str], rechained: str) -> None:
    """The same command again, once the cause is gone: the failed stage and what follows run, the
    job of ``rechained`` that waited for a failed one is replaced, and every stage ends done."""
    r = pretrain("run", str(cfg), "--executor", "slurm")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{rechained}: job {old[rechained]} was queued behind a job that failed or was replaced" in r.stdout, r.stdout
    new = stage_jobs(run_dir)
    assert new[rechained] != old[rechained] and sacct_state(old[rechained]) == "CANCELLED"
    assert wait_final(new["report"], timeout=400) == "COMPLETED", logs(run_dir)
    shown = json.loads(pretrain("status", str(run_dir), "--json").stdout)
    assert {name: st["status"] for name, st in shown["workflow"]["stages"].items()} == dict.fromkeys(stage_status(run_dir), "done")
    assert shown["training"]["done"] and len(list((run_dir / "evals").glob("step_*/hellaswag.json"))) == 2


def test_a_training_refused_on_slurm_ends_its_watcher_and_a_rerun_finishes(cluster, tmp_path, gpt2_ranks):
    """Training refused for good (exit 2: another process holds the run dir's training lock): the
    eval watcher started beside it ends within seconds, saying why, rather than polling for a
    checkpoint that cannot come until its time limit, then being requeued (it held a SLURM
    allocation for up to slurm.max_requeues × slurm.time). The report job waited for the watcher; a
    rerun after the cause is gone submits training and the watcher again and re-chains the report."""
    cfg, run_dir = write_config(tmp_path, "refused", gpt2_ranks)
    with lock_held(run_dir / ".locks" / "train.lock"):
        r = pretrain("run", str(cfg), "--executor", "slurm")
        assert r.returncode == 0, r.stdout + r.stderr
        jobs = stage_jobs(run_dir)
        assert wait_final(jobs["train"], timeout=240) == "FAILED", logs(run_dir)
        t0 = time.time()
        assert wait_state(jobs["eval"], FINAL, timeout=60) == "FAILED", logs(run_dir)
        ended_after = time.time() - t0
    assert f"training job {jobs['train']} FAILED before train.max_steps" in logs(run_dir), logs(run_dir)[-3000:]
    assert sacct_state(jobs["report"]) == "PENDING"  # afterok on a failed watcher: never satisfied
    status = json.loads(pretrain("status", str(run_dir), "--json").stdout)["workflow"]["stages"]
    assert status["train"]["status"] == "failed" and status["eval"]["status"] == "failed", status
    # refused, as the job's own exit line says (exit 2: fix, not retry), not SLURM's bare FAILED
    train = status["train"]
    assert (train["meaning"], train["exit_code"], train["why_job"]) == ("refused", 2, jobs["train"]), train
    assert train["log"] and "exited with code 2" in Path(train["log"]).read_text(), train
    text = pretrain("status", str(run_dir)).stdout
    assert f"refused; exit code 2: see job {jobs['train']} under slurm jobs" in text, text
    rerun_and_finish(cfg, run_dir, jobs, "report")
    print(f"watcher ended {ended_after:.0f} s after training failed")


def test_a_data_job_that_failed_does_not_leave_training_waiting_forever_after_a_rerun(cluster, tmp_path, gpt2_ranks):
    """The data job refused (another writer holds the dataset's lock): training, the watcher and the
    report wait on it (SLURM: DependencyNeverSatisfied). The rerun resubmitted the data job but left
    the training job waiting for the old one, which would never run: nothing got past the data stage."""
    cfg, run_dir = write_config(tmp_path, "datafail", gpt2_ranks)
    with lock_held(tmp_path / "data" / "datafail" / ".lock"):
        r = pretrain("run", str(cfg), "--executor", "slurm")
        assert r.returncode == 0, r.stdout + r.stderr
        jobs = stage_jobs(run_dir)
        assert wait_final(jobs["data"], timeout=240) == "FAILED", logs(run_dir)
    data = json.loads(pretrain("status", str(run_dir), "--json").stdout)["workflow"]["stages"]["data"]
    assert (data["status"], data["meaning"], data["exit_code"]) == ("failed", "refused", 2), data
    assert sacct_state(jobs["train"]) == "PENDING"
    rerun_and_finish(cfg, run_dir, jobs, "train")


def test_a_rerun_while_training_runs_and_a_preemption_keep_one_job_per_stage_and_one_eval_per_checkpoint(cluster, tmp_path, gpt2_ranks):
    """The driver returns at once; running it again while the jobs run adopts them (no second
    training job, nothing resubmitted). Training preempted mid-run (`scontrol requeue`) resumes in
    the same job; the watcher started beside it keeps going (a requeue is not "training ended") and
    evaluates every checkpoint of the resumed run exactly once."""
    cfg, run_dir = write_config(tmp_path, "adopted", gpt2_ranks)
    longer = ["train.max_steps=24"]
    r = pretrain("run", str(cfg), *longer, "--executor", "slurm")
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = stage_jobs(run_dir)
    wait_steps(run_dir, 8, timeout=240)
    subprocess.run(["scontrol", "requeue", jobs["train"]], check=True)
    r = pretrain("run", str(cfg), *longer, "--executor", "slurm")  # while training checkpoints, is requeued, resumes
    assert r.returncode == 0 and "submitted job" not in r.stdout, r.stdout + r.stderr
    assert f"train: job {jobs['train']} is " in r.stdout and f"eval: job {jobs['eval']} is " in r.stdout, r.stdout
    assert wait_final(jobs["report"], timeout=400) == "COMPLETED", logs(run_dir)
    assert stage_jobs(run_dir) == jobs and scontrol_restarts(jobs["train"]) == 1
    assert sorted(losses(run_dir)) == list(range(1, 25))  # each step once, across the requeue
    eval_jobs = sorted(f.name.split("_")[0] for f in (run_dir / "evals" / "jobs").glob("*_submitted.pkl"))
    names = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobName", "-j", ",".join(eval_jobs)], capture_output=True, text=True).stdout.split()
    evaluated = sorted(p.parent.name for p in (run_dir / "evals").glob("step_*/hellaswag.json"))
    from trainer.checkpoint import list_committed

    assert {c.name for c in list_committed(run_dir)} <= set(evaluated)
    assert len(names) == len(set(names)) and set(evaluated) <= {n.removeprefix("eval-") for n in names}, names  # one job each
    shown = json.loads(pretrain("status", str(run_dir), "--json").stdout)["workflow"]["stages"]
    assert {name: st["status"] for name, st in shown.items()} == dict.fromkeys(jobs, "done")


SIGNAL_AFTER_SBATCH = """
import os, signal, sys
import pipelines.stages as stages
from pipelines.cli import main

real = stages.submit_stage

def submit_then_signalled(*args, **kwargs):
    job = real(*args, **kwargs)  # queued by sbatch; the stop signal comes before the driver has recorded it
    os.kill(os.getpid(), signal.SIGTERM)
    return job

stages.submit_stage = submit_then_signalled
sys.exit(main(sys.argv[1:]))
"""


def test_a_stop_signal_right_after_sbatch_leaves_the_job_recorded_for_the_rerun(cluster, tmp_path, gpt2_ranks):
    """SIGTERM to `pretrain run --executor slurm` just after sbatch queued a stage's job: exit 3 ("run
    it again"), and workflow.json names that job, so the rerun adopts it instead of queueing a twin."""
    from slurm.submit import recorded_jobs

    cfg, run_dir = write_config(tmp_path, "signalled", gpt2_ranks)
    r = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_SBATCH, "run", str(cfg), "--executor", "slurm"],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    queued = [j["job_id"] for j in recorded_jobs(run_dir / "slurm")]
    try:
        assert r.returncode == 3 and "stopped by SIGTERM" in r.stderr, r.stdout + r.stderr
        assert queued and list(stage_jobs(run_dir).values()) == queued, (queued, r.stdout)
        r = pretrain("run", str(cfg), "--executor", "slurm")
        assert r.returncode == 0 and f"data: job {queued[0]} is" in r.stdout, r.stdout + r.stderr
        assert [j["job_id"] for j in recorded_jobs(run_dir / "slurm") if j["name"].startswith("pretrain-data-")] == queued[:1]
    finally:
        subprocess.run(["scancel", *(j["job_id"] for j in recorded_jobs(run_dir / "slurm"))], check=False)


def test_a_training_job_stopped_by_sigstop_is_not_taken_for_ended(cluster, tmp_path, gpt2_ranks):
    """A job SLURM shows as STOPPED (`scancel --signal=STOP`; likewise SIGNALING, STAGE_OUT, held
    after a requeue) still holds its processes and goes on when continued. A rerun took any state
    outside a short list for "ended", queued a second training beside it, and `--restart-from train`
    would have archived the checkpoints under it; both leave it alone now."""
    cfg, run_dir = write_config(tmp_path, "stopped", gpt2_ranks)
    longer = ["train.max_steps=400"]
    r = pretrain("run", str(cfg), *longer, "--executor", "slurm")
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = stage_jobs(run_dir)
    try:
        wait_steps(run_dir, 3, timeout=240)
        subprocess.run(["scancel", "--signal=STOP", jobs["train"]], check=True)
        wait_state(jobs["train"], {"STOPPED"}, timeout=30)
        r = pretrain("run", str(cfg), *longer, "--executor", "slurm")
        assert r.returncode == 0 and "submitted job" not in r.stdout, r.stdout + r.stderr
        assert f"train: job {jobs['train']} is STOPPED, leaving it" in r.stdout
        r = pretrain("run", str(cfg), *longer, "--executor", "slurm", "--restart-from", "train")
        assert r.returncode == 2 and f"train: job {jobs['train']} STOPPED" in r.stderr, r.stdout + r.stderr
        assert stage_jobs(run_dir) == jobs and not (run_dir / "archive").exists()
    finally:
        subprocess.run(["scancel", "--signal=CONT", jobs["train"]], check=False)
        subprocess.run(["scancel", *jobs.values()], check=False)
