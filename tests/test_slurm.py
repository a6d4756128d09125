"""Launching on a real, throw-away SLURM cluster started by the tests (slurmctld, two slurmd
"nodes" in their own UTS namespaces, munge, slurmdbd + MariaDB on 127.0.0.1). No mocks: jobs run
`pretrain train` with torchrun (gloo, CPU), get preempted, requeued and resumed for real."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail
from tests.trainer_helpers import make_shard_dir, metric_steps, micro_config
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "slurm"
MAX_STEPS, CKPT_EVERY = 24, 3
TRAIN = {"batch_tokens": 128,  # 2 ranks x 2 x 32, no grad accumulation
         "val_every": 10, "val_batches": 2, "keep_last": 3}
SLURM = {"nodes": 1, "gpus_per_node": 0, "cpus_per_task": 2, "time": "10:00", "signal_delay_s": 15, "max_requeues": 3}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def stop_stale_test_daemons() -> None:
    """SLURM daemons left by an earlier test run that was killed before its teardown (their config
    lives in a pytest temp dir): they hold the ports, so a new cluster could not start."""
    import signal
    import tempfile

    tmp_root = Path(tempfile.gettempdir()).resolve()
    stale = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if comm not in ("slurmctld", "slurmd", "slurmdbd", "slurmstepd"):
            continue
        conf = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"SLURM_CONF=")), "")
        if conf.startswith(str(tmp_root / "pytest-of-")):
            stale.append(int(proc.name))
    for pid in stale:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if stale:
        time.sleep(1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-node SLURM cluster with accounting, for this module; every daemon is stopped at the end."""
    if os.geteuid() != 0:
        skip_or_fail("a throw-away SLURM cluster needs root (munge, slurmd)")
    install = subprocess.run(["bash", str(SCRIPTS / "install.sh")], capture_output=True, text=True)
    if install.returncode != 0:
        skip_or_fail(f"cannot install SLURM: {install.stderr.strip()[-500:]}")
    stop_stale_test_daemons()
    base = tmp_path_factory.mktemp("slurm-cluster")
    env = {**os.environ, "BASE": str(base)}
    start = subprocess.run(["bash", str(SCRIPTS / "start.sh"), "--nodes", "2", "--dbd"], capture_output=True, text=True, env=env, timeout=240)
    if start.returncode != 0:
        subprocess.run(["bash", str(SCRIPTS / "stop.sh")], env=env, capture_output=True)
        skip_or_fail(f"cannot start the SLURM cluster: {start.stdout[-800:]} {start.stderr[-800:]}")
    os.environ["SLURM_CONF"] = str(base / "etc" / "slurm.conf")
    yield base
    subprocess.run(["bash", str(SCRIPTS / "stop.sh")], env=env, capture_output=True, timeout=120)
    os.environ.pop("SLURM_CONF", None)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("slurm-runs")
    make_shard_dir(d / "data", seed=3)
    return d


def slurm_config(run_dir: Path | str, data_dir: Path, max_steps: int = MAX_STEPS, ckpt_every: int = CKPT_EVERY,
                 train: dict | None = None) -> str:
    return micro_config(run_dir, data_dir, train={**TRAIN, "max_steps": max_steps, "ckpt_every": ckpt_every, **(train or {})},
                        extra={"slurm": SLURM})


def write_config(work: Path, name: str, max_steps: int = MAX_STEPS, ckpt_every: int = CKPT_EVERY,
                 train: dict | None = None) -> tuple[Path, Path]:
    run_dir = work / name
    cfg = work / f"{name}.yaml"
    cfg.write_text(slurm_config(run_dir, work / "data", max_steps, ckpt_every, train))
    return cfg, run_dir


def pretrain(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    recs = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), f"each step once, in order: {steps}"
    return {r["step"]: r["loss"] for r in recs}


@pytest.fixture(scope="module")
def local_losses(work) -> dict[int, float]:
    """The same training run locally, uninterrupted: what every SLURM run must reproduce bit for bit."""
    cfg, run_dir = write_config(work, "local")
    r = pretrain("train", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    return losses(run_dir)


def job_id_of(stdout: str) -> str:
    for line in stdout.splitlines():
        if line.startswith("submitted job "):
            return line.split()[2]
    raise AssertionError(f"no job id in: {stdout}")


def sacct_state(job_id: str) -> str:
    from slurm.jobs import job_state

    return job_state(job_id).state


def wait_final(job_id: str, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = sacct_state(job_id)
        if state in FINAL:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} not finished after {timeout}s (state {sacct_state(job_id)})")


def wait_steps(run_dir: Path, step: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while metric_steps(run_dir) < step:
        assert time.time() < deadline, f"step {step} not reached in {timeout}s"
        time.sleep(0.2)


def logs(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").rglob("*")) if p.is_file() and p.suffix in (".out", ".err"))


def scontrol_restarts(job_id: str) -> int:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return int(out.split("Restarts=")[1].split()[0])


def test_submit_one_node_two_ranks_matches_local_run(cluster, work, local_losses):
    cfg, run_dir = write_config(work, "one-node")
    r = pretrain("submit", str(cfg))
    assert r.returncode == 0, r.stderr
    job = job_id_of(r.stdout)
    assert str(run_dir) in r.stdout and "stdout:" in r.stdout
    assert wait_final(job) == "COMPLETED", logs(run_dir)
    assert losses(run_dir) == local_losses
    listing = pretrain("jobs", str(run_dir))
    assert listing.returncode == 0 and job in listing.stdout and "COMPLETED" in listing.stdout


def test_two_nodes_rendezvous_and_train(cluster, work, local_losses):
    cfg, run_dir = write_config(work, "two-nodes")
    r = pretrain("submit", str(cfg), "slurm.nodes=2", "train.nproc_per_node=1")
    assert r.returncode == 0, r.stderr
    job = job_id_of(r.stdout)
    assert wait_final(job) == "COMPLETED", logs(run_dir)
    out = logs(run_dir)
    assert "node 0/2" in out and "node 1/2" in out
    # 2 ranks on 2 nodes see the same data and reduce the same gradients as 2 ranks on one node.
    assert losses(run_dir) == local_losses


@pytest.mark.parametrize("how", ["submitit-preempt", "scontrol-requeue"])
def test_preempted_job_requeues_and_resumes_exactly(cluster, work, local_losses, how):
    cfg, run_dir = write_config(work, f"preempt-{how}")
    r = pretrain("submit", str(cfg))
    assert r.returncode == 0, r.stderr
    job = job_id_of(r.stdout)
    wait_steps(run_dir, 7)
    if how == "submitit-preempt":
        # what submitit's job._interrupt() does: SIGTERM, then the requeue signal (USR2)
        subprocess.run(["scancel", job, "--signal", "SIGTERM"], check=True)
        subprocess.run(["scancel", job, "--signal", "USR2"], check=True)
    else:
        subprocess.run(["scontrol", "requeue", job], check=True)
    assert wait_final(job, timeout=400) == "COMPLETED", logs(run_dir)
    assert scontrol_restarts(job) >= 1
    assert "restart 1" in logs(run_dir)
    assert losses(run_dir) == local_losses


# The time-limit test's run: one rank (the job's wall time, not its world size, is under test)
ONE_RANK = {"nproc_per_node": 1, "batch_tokens": 64}


def seconds_per_step(work: Path) -> float:
    """A step of the ONE_RANK run here and now, measured on a 60-step local run (its last 40)."""
    cfg, run_dir = write_config(work, "timeout-calibration", 60, ckpt_every=50, train=ONE_RANK)
    r = pretrain("train", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    times = [rec["time"] for rec in read_metrics(run_dir / "metrics.jsonl")]
    return (times[-1] - times[-41]) / 40


def wait_requeued(job_id: str, timeout: float = 300) -> bool:
    """True once the job was requeued (SLURM counts its restarts); False if it ended without one."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if scontrol_restarts(job_id) >= 1:
            return True
        if sacct_state(job_id) in FINAL:
            return scontrol_restarts(job_id) >= 1
        time.sleep(1)
    raise AssertionError(f"job {job_id} neither requeued nor ended after {timeout}s (state {sacct_state(job_id)})")


def test_time_limit_signal_requeues_until_done(cluster, work, monkeypatch):
    """slurm.time=1 min with signal_delay_s=15: USR2 arrives before the minute is up (slurmctld
    checks time limits every 30 s and sends it once fewer than 15 + 30 s are left: 15-45 s after a
    start), the job checkpoints, is requeued, and finishes on a later run with the losses of an
    uninterrupted one. The run needs more training than fits before the signal, so its step count
    comes from a step measured here and now: 60 s worth of steps. Once the time limit has requeued
    the job, its limit is raised to 10 minutes, so that it finishes in its second run instead of
    being stopped every 15-45 s (each stop and start costs ~15 s more). One rank on one thread (the
    SLURM job inherits OMP_NUM_THREADS): the wall time, not the world size, is under test, and the
    local reference then gives the same losses. Should the job still finish inside its first run
    (no requeue: the test would prove nothing), it runs again with four times the steps. The stop
    writes its own checkpoint, so periodic ones are rare (every 50 steps): they would only slow both runs."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    planned = max(200, round(60 / seconds_per_step(work)))
    for steps in (planned, 4 * planned):
        cfg, run_dir = write_config(work, f"timeout-{steps}", steps, ckpt_every=50, train=ONE_RANK)
        r = pretrain("submit", str(cfg), "slurm.time=1", "slurm.max_requeues=40")
        assert r.returncode == 0, r.stderr
        job = job_id_of(r.stdout)
        if wait_requeued(job):
            r = subprocess.run(["scontrol", "update", f"jobid={job}", "timelimit=10"], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            break
    else:
        raise AssertionError(f"{steps} steps finished inside one minute: raise `steps` so the time limit is reached")
    assert wait_final(job, timeout=900) == "COMPLETED", logs(run_dir)
    assert "this job is timed-out" in logs(run_dir)
    cfg_local, run_local = write_config(work, f"timeout-local-{steps}", steps, ckpt_every=50, train=ONE_RANK)
    r = pretrain("train", str(cfg_local), timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert losses(run_dir) == losses(run_local)


def test_sbatch_script_runs_and_requeues(cluster, work, local_losses, tmp_path):
    cfg, run_dir = write_config(work, "sbatch")
    script = tmp_path / "train.sbatch"
    r = pretrain("sbatch", str(cfg), "-o", str(script))
    assert r.returncode == 0, r.stderr
    sub = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, cwd=REPO)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    wait_steps(run_dir, 7)
    # As at a time limit with --signal=B:USR2@N: only the batch shell gets the signal.
    subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=True)
    assert wait_final(job, timeout=400) == "COMPLETED", logs(run_dir)
    out = logs(run_dir)
    assert "USR2 received" in out and "requeueing job" in out and "restart 1" in out
    assert losses(run_dir) == local_losses
    listing = pretrain("jobs", str(run_dir))
    assert job in listing.stdout


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["slurm.partition=gpu-h100"], "unknown partition 'gpu-h100' (this cluster has: debug)"),
        (["slurm.nodes=3"], "slurm.nodes=3 does not fit partition 'debug', which has 2 node(s)"),
        (["slurm.gpus_per_node=8", "train.device=cuda"], "slurm.gpus_per_node=8 does not fit partition 'debug', whose nodes have 0 GPU(s)"),
        (["slurm.cpus_per_task=64"], "slurm.cpus_per_task=64 does not fit"),
        (["slurm.mem_gb=4096"], "mem_gb=4096 does not fit partition 'debug'"),
    ],
)
def test_requests_that_cannot_run_fail_before_submitting(cluster, work, overrides, message):
    cfg, run_dir = write_config(work, "bad")
    r = pretrain("submit", str(cfg), *overrides)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (run_dir / "slurm" / "jobs.jsonl").exists()


def test_bad_run_dir_and_missing_data_are_clear_errors(work, tmp_path):
    r = pretrain("jobs", str(tmp_path / "no-such-run"))
    assert r.returncode == 2 and "no such run directory" in r.stderr
    cfg, _ = write_config(work, "nodata")
    r = pretrain("submit", str(cfg), f"data.output_dir={tmp_path / 'missing'}", "--executor", "local")
    assert r.returncode == 2 and "no manifest.json" in r.stderr


def test_local_executor_runs_the_same_code_path(work, local_losses):
    cfg, run_dir = write_config(work, "local-executor")
    r = pretrain("submit", str(cfg), "--executor", "local", "--wait", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:] + logs(run_dir)
    assert losses(run_dir) == local_losses


def test_sbatch_script_quotes_every_value(work):
    cfg, _ = write_config(work, "quoting")
    r = pretrain("sbatch", str(cfg), "train.sample_prompt=it's $(touch /tmp/pwned) `id`", "slurm.partition=a-b")
    assert r.returncode == 0, r.stderr
    assert "'train.sample_prompt=it'\"'\"'s $(touch /tmp/pwned) `id`'" in r.stdout
    assert "#SBATCH --partition=a-b" in r.stdout
    check = subprocess.run(["bash", "-n"], input=r.stdout, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    # A partition name SLURM could not have is refused, not quoted (see tests/test_slurm_injection.py).
    r = pretrain("sbatch", str(cfg), "slurm.partition=a b")
    assert r.returncode == 2 and "slurm.partition must be a SLURM name" in r.stderr, r.stderr


def test_real_sbatch_reads_quoted_values_exactly(cluster, work):
    """sbatch parses #SBATCH lines itself (its own quotes and escapes, '#' starts a comment): a run
    dir and an sbatch option value holding spaces, both quotes, $(), backticks, ';' and '#' reach
    SLURM verbatim, through `pretrain sbatch` and through submitit's script (`pretrain submit`).
    The jobs are submitted held and cancelled at once."""
    import yaml

    odd = "it's \"odd\" $(touch INJECTED) `id`; # end"
    run_dir = work / f"odd {odd}"
    cfg = work / "odd.yaml"
    data = yaml.safe_load(slurm_config("x", work / "data"))
    data["run_dir"] = str(run_dir)
    data["slurm"]["extra"] = ["--hold", f"--comment={odd}"]
    cfg.write_text(yaml.safe_dump(data))

    def check_job(job: str, stdout_prefix: str) -> None:
        try:
            comment = subprocess.run(["squeue", "-h", "-j", job, "-o", "%k"], capture_output=True, text=True, check=True).stdout
            assert comment.rstrip("\n") == odd
            info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
            assert f"StdOut={stdout_prefix}" in info, info
            assert "JobState=PENDING" in info and "Reason=JobHeldUser" in info, info
        finally:
            subprocess.run(["scancel", job], check=False)

    script = work / "odd.sbatch"
    r = pretrain("sbatch", str(cfg), "-o", str(script))
    assert r.returncode == 0, r.stderr
    sub = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, cwd=REPO)
    assert sub.returncode == 0, sub.stderr
    check_job(sub.stdout.strip().split(";")[0], f"{run_dir}/slurm/logs/")

    r = pretrain("submit", str(cfg))
    assert r.returncode == 0, r.stderr
    job = job_id_of(r.stdout)
    check_job(job, f"{run_dir}/slurm/logs/{job}/{job}_0_log.out")
    assert not list(work.rglob("INJECTED")) and not list(REPO.glob("INJECTED"))


def test_refused_job_fails_once_and_is_never_requeued(cluster, work):
    """Exit 2 ("refused: fix the config") must not loop under requeue: on both routes the job
    ends FAILED after one run, with no restart. The jobs are queued held, the config is then
    broken (an unknown key: `pretrain train` refuses it at load), and they are released."""
    import yaml

    cfg, run_dir = write_config(work, "refused")
    data = yaml.safe_load(cfg.read_text())
    data["slurm"]["extra"] = ["--hold"]
    cfg.write_text(yaml.safe_dump(data))
    script = work / "refused.sbatch"
    assert pretrain("sbatch", str(cfg), "-o", str(script)).returncode == 0
    sub = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, cwd=REPO)
    assert sub.returncode == 0, sub.stderr
    r = pretrain("submit", str(cfg))
    assert r.returncode == 0, r.stderr
    jobs = [sub.stdout.strip().split(";")[0], job_id_of(r.stdout)]
    cfg.write_text(cfg.read_text() + "no_such_key: 1\n")
    subprocess.run(["scontrol", "release", *jobs], check=True)
    for job in jobs:
        assert wait_final(job, timeout=120) == "FAILED", logs(run_dir)
        assert scontrol_restarts(job) == 0
    out = logs(run_dir)
    assert "[sbatch] training step exited with 2" in out and "[sbatch] not requeued" in out, out
    assert "exited with code 2 (refused" in out and "requeued job" not in out, out


def test_a_command_killed_by_the_stop_signal_is_requeued_on_both_routes(cluster, work):
    """A stop signal that finds the command without a handler (it is starting or exiting) kills
    it: that is a stop, not a failure, and both routes requeue the job (submitit's NodeCommand
    sees -12; the sbatch script sees srun's 140). The command here has no handler at all: its
    first run is killed by the USR2, its second (SLURM_RESTART_COUNT=1) completes. Without the
    rule both jobs ended FAILED."""
    from slurm.config import SlurmConfig
    from slurm.sbatch import render_sbatch
    from slurm.submit import submit_command

    folder = work / "killed-by-signal"
    folder.mkdir()

    def argv(route: str) -> list[str]:
        first_run = f"touch {folder}/ready-{route}; exec sleep 300"
        return ["bash", "-c", f'if [ "${{SLURM_RESTART_COUNT:-0}}" -eq 0 ]; then {first_run}; fi; echo "{route}: second run done"']

    cfg = SlurmConfig(nodes=1, gpus_per_node=0, cpus_per_task=1, time="10:00", signal_delay_s=15, max_requeues=3)
    jobs = {"submitit": str(submit_command(argv("submitit"), cfg, folder / "submitit", "slurm", "killed-submitit", 3).job_id)}
    script = folder / "killed.sbatch"
    script.write_text(render_sbatch(argv("sbatch"), cfg, folder, "killed-sbatch", 3))
    sub = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, cwd=folder)
    assert sub.returncode == 0, sub.stderr
    jobs["sbatch"] = sub.stdout.strip().split(";")[0]
    deadline = time.time() + 120
    while not all((folder / f"ready-{route}").exists() for route in jobs):
        assert time.time() < deadline, f"the jobs did not start: {[sacct_state(j) for j in jobs.values()]}"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", jobs["submitit"]], check=True)  # the step's processes
    subprocess.run(["scancel", "--batch", "--signal=USR2", jobs["sbatch"]], check=True)  # the batch shell, as B:USR2
    out = lambda: "\n".join(p.read_text(errors="replace") for p in folder.rglob("*.out")) + "\n".join(
        p.read_text(errors="replace") for p in folder.rglob("*.err"))  # fmt: skip
    for route, job in jobs.items():
        assert wait_final(job, timeout=240) == "COMPLETED", f"{route}: {out()[-4000:]}"
        assert scontrol_restarts(job) == 1, route
    text = out()
    assert "submitit: second run done" in text and "sbatch: second run done" in text, text[-4000:]
    assert "[sbatch] training step exited with 140" in text, text[-4000:]


def test_workflow_on_slurm_runs_as_chained_jobs(cluster, tmp_path_factory, gpt2_ranks):
    """`pretrain run --executor slurm`: data → train → eval watcher (its eval jobs on SLURM too) →
    report, as jobs chained with --dependency; the command returns at once."""
    import json

    from tests.workflow_helpers import final_metrics, stage_status
    from tests.workflow_helpers import write_config as write_workflow_config

    work = tmp_path_factory.mktemp("slurm-workflow")
    cfg, run_dir = write_workflow_config(work, "chained", gpt2_ranks)
    t0 = time.time()
    r = pretrain("run", str(cfg), "--executor", "slurm")
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.time() - t0 < 60, "submitting must not wait for the jobs"
    wf = json.loads((run_dir / "workflow.json").read_text())
    jobs = {name: st["job_ids"][-1] for name, st in wf["stages"].items()}
    assert set(jobs) == {"data", "train", "eval", "report"}
    assert f"afterok:{jobs['data']}" in r.stdout and f"after:{jobs['train']}" in r.stdout and f"afterok:{jobs['eval']}" in r.stdout
    # While they are queued, a restart is refused (it would archive what they are about to write), naming them.
    r = pretrain("run", str(cfg), "--executor", "slurm", "--restart-from", "train")
    assert r.returncode == 2 and f"scancel {jobs['train']} {jobs['eval']} {jobs['report']}" in r.stderr, r.stdout + r.stderr
    assert json.loads((run_dir / "workflow.json").read_text())["stages"]["train"]["job_ids"] == wf["stages"]["train"]["job_ids"]
    assert wait_final(jobs["report"], timeout=900) == "COMPLETED", logs(run_dir)
    for name in ("data", "train", "eval"):
        assert sacct_state(jobs[name]) == "COMPLETED"
    status = pretrain("status", str(run_dir))
    assert status.returncode == 0 and "slurm executor" in status.stdout, status.stderr
    shown = json.loads(pretrain("status", str(run_dir), "--json").stdout)["workflow"]["stages"]
    assert {name: st["status"] for name, st in shown.items()} == {"data": "done", "train": "done", "eval": "done", "report": "done"}
    m = final_metrics(run_dir)
    assert sorted(m["losses"]) == list(range(1, 13)) and len(m["evals"]) == 2
    # Running it again finds everything done and submits nothing; it (not `status`) records that.
    r = pretrain("run", str(cfg), "--executor", "slurm")
    assert r.returncode == 0 and "submitted job" not in r.stdout and r.stdout.count("skipping") == 4, r.stdout
    assert stage_status(run_dir) == {"data": "done", "train": "done", "eval": "done", "report": "done"}


def test_workflow_refuses_unfit_request_before_submitting_anything(cluster, tmp_path_factory, gpt2_ranks):
    from tests.workflow_helpers import write_config as write_workflow_config

    work = tmp_path_factory.mktemp("slurm-workflow-bad")
    cfg, run_dir = write_workflow_config(work, "bad", gpt2_ranks)
    for override, message in (("slurm.partition=nope", "unknown partition 'nope'"), ("eval.slurm.mem_gb=4096", "eval.slurm.mem_gb=4096 does not fit"),
                              ("eval.slurm.gpus=1", "eval.slurm.gpus=1 does not fit")):  # the keys set, not slurm.*
        r = pretrain("run", str(cfg), "--executor", "slurm", override)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert not (run_dir / "slurm" / "jobs.jsonl").exists()


def test_submit_with_evals_starts_the_watcher_job(cluster, work, local_losses):
    cfg, run_dir = write_config(work, "with-evals")
    hs = work / "hellaswag.jsonl"
    from tests.evals_helpers import hellaswag_rows, write_jsonl

    write_jsonl(hs, hellaswag_rows(8, seed=1))
    evals = [f"eval.hellaswag_path={hs}", "eval.data_source=local", "eval.device=cpu", "eval.slurm.gpus=0", "eval.slurm.cpus=1",
             "eval.slurm.time=10:00", "eval.poll_s=1"]
    r = pretrain("submit", str(cfg), *evals, "--with-evals")
    assert r.returncode == 0, r.stderr
    train_job = job_id_of(r.stdout)
    watcher = r.stdout.split("submitted eval watcher job ")[1].split()[0]
    assert wait_final(train_job) == "COMPLETED" and wait_final(watcher) == "COMPLETED", logs(run_dir)
    assert losses(run_dir) == local_losses
    evaluated = sorted(p.parent.name for p in (run_dir / "evals").glob("step_*/hellaswag.json"))
    from trainer.checkpoint import list_committed

    # every checkpoint that stays is evaluated; one evaluated before retention removed it keeps its results
    committed = [c.name for c in list_committed(run_dir)]
    assert committed and set(committed) <= set(evaluated), (committed, evaluated)


@pytest.mark.parametrize("route", ["submit", "sbatch"])
def test_a_job_cancelled_by_its_user_stays_cancelled(cluster, work, tmp_path, route):
    """`scancel JOB` sends SIGTERM, as a preemption does: the training checkpoints and exits 3. The
    job requeued itself and trained on to the end (SLURM lets `scontrol requeue` revive a cancelled
    job); the user asked for it to end: it stays CANCELLED, its checkpoint kept for a later submit."""
    cfg, run_dir = write_config(work, f"cancelled-{route}", max_steps=400, ckpt_every=50)
    if route == "submit":
        r = pretrain("submit", str(cfg))
        assert r.returncode == 0, r.stderr
        job = job_id_of(r.stdout)
    else:
        script = tmp_path / "train.sbatch"
        assert pretrain("sbatch", str(cfg), "-o", str(script)).returncode == 0
        sub = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, cwd=REPO)
        assert sub.returncode == 0, sub.stderr
        job = sub.stdout.strip().split(";")[0]
    wait_steps(run_dir, 7)
    subprocess.run(["scancel", job], check=True)
    assert wait_final(job, timeout=120) == "CANCELLED", logs(run_dir)
    time.sleep(8)  # a requeue would show by now
    assert sacct_state(job) == "CANCELLED" and scontrol_restarts(job) == 0, logs(run_dir)
    assert "restart 1" not in logs(run_dir) and "cancelled (scancel)" in logs(run_dir)
    assert metric_steps(run_dir) < 400
