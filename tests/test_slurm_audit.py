"""Launching on SLURM, the cases tests/test_slurm.py leaves out: a rank that dies on one node of
two, a node that fails before training starts (every route, one where its command cannot start at
all), a failed node whose kill of the step does not take, max_requeues spent, a 2-node sbatch
script requeued, a busy rendezvous port, a refusal on the second node and what `pretrain status` says
of it, a job and an eval job whose task is killed before its result file (seen when it ends), the
cluster's teardown. Same throw-away cluster (its fixtures are imported), one module at a time on it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_slurm import (  # noqa: F401  (fixtures)
    REPO, SCRIPTS, cluster, job_id_of, local_losses, logs, losses, pretrain, scontrol_restarts, wait_final, wait_steps, work,
    write_config,
)
from tests.test_slurm_ports_and_status import port_held_by_an_outgoing_connection

pytestmark = pytest.mark.slow


def job_processes(job: str) -> dict[int, dict[str, str]]:
    """Processes of a SLURM job (every "node" of the test cluster shares this pid namespace): pid -> env."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        env = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in env.items()}
        if env.get("SLURM_JOB_ID") == job:
            found[int(proc.name)] = env
    return found


def worker_pid(job: str, rank: int, timeout: float = 60) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid, env in job_processes(job).items():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if env.get("RANK") == str(rank) and b"trainer.train" in cmd:
                return pid
        time.sleep(0.5)
    raise AssertionError(f"no rank {rank} worker of job {job}")


def submit(*args: str) -> str:
    r = pretrain("submit", *args)
    assert r.returncode == 0, r.stderr
    return job_id_of(r.stdout)


def wait_for(what: str, cond, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"{what}: not after {timeout:.0f} s"
        time.sleep(0.5)


def accounting(job: str, fields: str) -> str:
    """The job's line in `sacct` (fields separated by "|"), once its end time is recorded: accounting is
    written after the job ends."""
    line = ""
    for _ in range(60):
        line = subprocess.run(["sacct", "-j", job, "-X", "-n", "-P", "-o", fields], capture_output=True, text=True).stdout.strip()
        if re.search(r"\|\d{4}-\d\d-\d\dT[\d:]+$", line):
            break
        time.sleep(0.5)
    return line


def sbatch(script: Path) -> str:
    sub = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, cwd=REPO)
    assert sub.returncode == 0, sub.stderr
    return sub.stdout.strip().split(";")[0]


def broken_on_second_node(argv: list[str], how: str, folder: Path) -> list[str]:
    """`argv` on node 0; on node 1 it fails: `launcher` before anything starts (a broken node:
    its Python, its /tmp), `worker` in the training worker right after torchrun's rendezvous,
    `unstartable` before the command starts at all: its program is on node 0's PATH only (a
    sitecustomize the test puts on the job's PYTHONPATH), as on a node that missed a
    `module load`."""
    folder.mkdir(parents=True, exist_ok=True)
    if how == "unstartable":
        (folder / "bin").mkdir(exist_ok=True)
        (folder / "bin" / "start-training").write_text('#!/bin/bash\nexec "$@"\n')
        (folder / "bin" / "start-training").chmod(0o755)
        (folder / "sitecustomize.py").write_text(
            "import os\nif os.environ.get('SLURM_NODEID') == '0':\n"
            f"    os.environ['PATH'] = {str(folder / 'bin')!r} + ':' + os.environ['PATH']\n")
        return ["start-training", *argv]
    (folder / "sitecustomize.py").write_text("import os\nif os.environ.get('RANK'):\n    print('worker dies', flush=True)\n    os._exit(1)\n")
    broken = {"launcher": "echo node 1 is broken; exit 1", "worker": f"export PYTHONPATH={folder}"}[how]
    return ["bash", "-c", f'if [ "$SLURM_NODEID" = 1 ]; then {broken}; fi; exec "$@"', "bash", *argv]


def slurm_view(job: str) -> str:
    """What SLURM says of a job and its steps, and what of it still runs: for a failure message."""
    show = [subprocess.run(cmd, capture_output=True, text=True).stdout
            for cmd in (["scontrol", "show", "job", job], ["scontrol", "show", "step", job])]
    running = {}
    for pid in job_processes(job):
        try:  # it may end while we look: a failure message must not raise a failure of its own
            running[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200].decode(errors="replace")
        except OSError:
            pass
    return "\n".join([*show, f"processes: {running}"])


def test_a_rank_killed_on_one_node_of_two_fails_the_job_promptly(cluster, work):
    """A worker on the second node dies (kill -9, as the OOM killer would): the job must end FAILED
    soon (not at its time limit), is not requeued, and leaves no process behind on either node."""
    cfg, run_dir = write_config(work, "crash-two-nodes", max_steps=400, ckpt_every=50)
    job = submit(str(cfg), "slurm.nodes=2", "train.nproc_per_node=1")
    wait_steps(run_dir, 5)
    os.kill(worker_pid(job, 1), signal.SIGKILL)
    t0 = time.time()
    assert wait_final(job, timeout=180) == "FAILED", logs(run_dir)
    assert time.time() - t0 < 60, "the job must fail soon after its rank, not at its time limit"
    assert scontrol_restarts(job) == 0
    time.sleep(2)
    assert not job_processes(job), f"left behind: {job_processes(job)}"
    assert "exited with code 1 (failed; not requeued" in logs(run_dir)
    listing = pretrain("jobs", str(run_dir))
    assert f"{job}  FAILED       restarts 0" in listing.stdout, listing.stdout


def assert_failed_promptly(job: str, run_dir: Path, label: str) -> None:
    """The job ends FAILED within 90 s (before the fix it stayed RUNNING until its time limit), was
    not requeued, and left no process on any node."""
    t0 = time.time()
    try:
        state = wait_final(job, timeout=90)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{slurm_view(job)}\n{logs(run_dir)}") from None
    finally:
        subprocess.run(["scancel", job])
    assert state == "FAILED", logs(run_dir)
    print(f"{label}: FAILED {time.time() - t0:.0f} s after submitting")
    assert scontrol_restarts(job) == 0
    time.sleep(2)
    assert not job_processes(job), f"left behind: {job_processes(job)}"


@pytest.mark.parametrize("how", ["launcher", "worker", "unstartable"])
def test_a_node_that_fails_at_start_ends_the_job_instead_of_leaving_the_others_waiting(cluster, work, how, monkeypatch):
    """Node 1 of 2 fails before training starts (`launcher`: the node's command fails at once;
    `worker`: its worker dies right after torchrun's rendezvous; `unstartable`: its command cannot
    be started at all, not on that node's PATH). Node 0 went on waiting for it (torchrun's 10-minute
    join timeout, the process group's 30 minutes), the job RUNNING and holding both nodes up to its
    time limit. Now the failed node ends the job's step: FAILED within seconds, not requeued,
    nothing left running, and its exit line names the cause."""
    from pipelines.config import load_config
    from pipelines.launching import submit_job, train_argv

    cfg_path, run_dir = write_config(work, f"start-crash-{how}")
    overrides = ["slurm.nodes=2", "train.nproc_per_node=1"]
    cfg = load_config(str(cfg_path), overrides)
    argv = broken_on_second_node(train_argv(str(cfg_path), overrides, cfg), how, work / f"site-{how}")
    if how == "unstartable":
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(work / f"site-{how}"), os.environ.get("PYTHONPATH")])))
    run_dir.mkdir(parents=True, exist_ok=True)
    job = str(submit_job(argv, cfg.slurm, 0, run_dir, f"crash-{how}").job_id)
    assert_failed_promptly(job, run_dir, how)
    exit_line = {"unstartable": "cannot run start-training: FileNotFoundError: [Errno 2] No such file or directory: "
                                "'start-training' (failed; not requeued"}.get(how, "bash exited with code 1 (failed; not requeued")
    assert exit_line in logs(run_dir), logs(run_dir)
    listing = pretrain("jobs", str(run_dir))
    assert f"{job}  FAILED" in listing.stdout, listing.stdout


def test_max_requeues_spent_ends_the_job_failed_with_its_checkpoint(cluster, work):
    """slurm.max_requeues=1 and two stop signals (a bare SIGTERM, as on clusters without USR2): the
    first requeues, the second checkpoints and ends the job FAILED saying why, its checkpoint
    kept; `pretrain jobs` shows it with its one restart."""
    from trainer.checkpoint import latest_committed, read_meta

    cfg, run_dir = write_config(work, "max-requeues", max_steps=400, ckpt_every=100)
    job = submit(str(cfg), "slurm.max_requeues=1")
    wait_steps(run_dir, 5)
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    wait_for("restart 1", lambda: "restart 1" in logs(run_dir), timeout=120)
    stopped_at = int(read_meta(latest_committed(run_dir))["step"])
    wait_steps(run_dir, stopped_at + 5)
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    assert wait_final(job, timeout=120) == "FAILED", logs(run_dir)
    assert scontrol_restarts(job) == 1
    out = logs(run_dir)
    assert "1 restarts reached slurm.max_requeues" in out and "restart 2" not in out, out[-3000:]
    step = int(read_meta(latest_committed(run_dir))["step"])
    assert stopped_at + 5 <= step < 400
    assert f"{job}  FAILED       restarts 1" in pretrain("jobs", str(run_dir)).stdout


def test_two_node_sbatch_script_requeued_by_scontrol_resumes_exactly(cluster, work, local_losses, tmp_path):
    """`pretrain sbatch` with 2 nodes, run with plain sbatch, then `scontrol requeue` (SIGTERM to
    the batch shell and both nodes): the job comes back once and matches a local run; `pretrain
    jobs` finds it by its log and shows its restart and that one log (appended to by each run)."""
    cfg, run_dir = write_config(work, "sbatch-two-nodes")
    script = tmp_path / "train.sbatch"
    assert pretrain("sbatch", str(cfg), "slurm.nodes=2", "train.nproc_per_node=1", "-o", str(script)).returncode == 0
    job = sbatch(script)
    wait_steps(run_dir, 7)
    subprocess.run(["scontrol", "requeue", job], check=True)
    assert wait_final(job, timeout=300) == "COMPLETED", logs(run_dir)
    assert scontrol_restarts(job) == 1
    assert losses(run_dir) == local_losses
    log = run_dir / "slurm" / "logs" / f"pretrain-sbatch-two-nodes-{job}.out"
    assert "restart 0" in log.read_text() and "restart 1" in log.read_text()
    listing = pretrain("jobs", str(run_dir)).stdout
    assert f"{job}  COMPLETED    restarts 1" in listing and f"stdout {log}" in listing, listing


def test_two_node_sbatch_script_whose_second_node_fails_at_start_ends_failed(cluster, work):
    """The sbatch route of the case above: node 1's worker dies right after the rendezvous, node 0
    waited for it (the process group's 30 minutes) with the job RUNNING. srun reports the task's
    exit on its stderr; the batch shell kills the step: FAILED within seconds, not requeued."""
    from pipelines.config import load_config
    from pipelines.launching import train_argv
    from slurm.sbatch import render_sbatch

    cfg_path, run_dir = write_config(work, "sbatch-crash")
    overrides = ["slurm.nodes=2", "train.nproc_per_node=1"]
    cfg = load_config(str(cfg_path), overrides)
    argv = broken_on_second_node(train_argv(str(cfg_path), overrides, cfg), "worker", work / "site-sbatch")
    (run_dir / "slurm" / "logs").mkdir(parents=True)
    script = work / "crash.sbatch"
    script.write_text(render_sbatch(argv, cfg.slurm, run_dir / "slurm" / "logs", "sbatch-crash", 3))
    job = sbatch(script)
    assert_failed_promptly(job, run_dir, "sbatch")
    out = logs(run_dir)
    assert "task 1: Exited with exit code 1: the other nodes get 10 s to end" in out and "requeueing" not in out, out[-3000:]


def test_a_busy_rendezvous_port_fails_the_job_at_once_naming_it(cluster, work):  
    """Before, torchrun retried the taken port for 2 minutes and failed with stack traces only."""
    cfg, run_dir = write_config(work, "busy-port")
    with port_held_by_an_outgoing_connection() as port:
        t0 = time.time()
        r = pretrain("submit", str(cfg), "slurm.nodes=2", "train.nproc_per_node=1", f"slurm.rdzv_ports={port}-{port}", "--wait")
        took = time.time() - t0
    logs = "".join(p.read_text(errors="replace") for p in (run_dir / "slurm").rglob("*_log.err"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"rendezvous port {port} on n1 is in use" in logs, logs[-3000:]
    assert took < 60, f"{took:.0f} s; the job in accounting (state, start, end): {accounting(job_id_of(r.stdout), 'State,Start,End')}"


def test_a_busy_rendezvous_port_fails_the_sbatch_job_at_once_naming_it(cluster, work):
    """`pretrain sbatch`, 2 nodes, the job's port taken on its first node. Before, the script started
    torchrun anyway: 2 minutes of connection timeouts and stack traces that never named the port."""
    from slurm.jobs import job_state
    from slurm.joblogs import final_exit

    cfg, run_dir = write_config(work, "sbatch-busy-port")
    script = work / "busy-port.sbatch"
    with port_held_by_an_outgoing_connection() as port:  # an ephemeral port: the script warns of that too
        r = pretrain("sbatch", str(cfg), "slurm.nodes=2", "train.nproc_per_node=1", f"slurm.rdzv_ports={port}-{port}", "-o", str(script))
        assert r.returncode == 0, r.stderr
        t0 = time.time()
        sub = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, cwd=REPO)
        assert sub.returncode == 0, sub.stderr
        job = sub.stdout.strip().split(";")[0]
        state = wait_final(job, timeout=60)
        took = time.time() - t0
    log = run_dir / "slurm" / "logs" / f"pretrain-sbatch-busy-port-{job}.out"
    out = log.read_text(errors="replace")
    assert state == "FAILED" and job_state(job).exit_code == "1:0", out[-3000:]
    assert f"rendezvous port {port} on n1 is in use" in out and f"slurm.rdzv_ports (now {port}-{port})" in out, out[-3000:]
    assert f"warning: rendezvous port {port} lies in this node's ephemeral port range" in out, out[-3000:]
    exit_line = final_exit(log)  # what `pretrain status` shows for the job
    assert exit_line is not None and exit_line.code == 1 and f"rendezvous port {port}" in exit_line.line, out[-3000:]
    assert "torch.distributed" not in out and took < 45, f"{took:.0f} s"


def test_a_refusal_on_the_second_node_is_reported_as_2_and_status_says_why(cluster, work, monkeypatch):  
    from pipelines.config import load_config
    from pipelines.launching import submit_job, train_argv, wait_for_training
    from pipelines.status import status_data, status_text
    from slurm import jobs
    from slurm.submit import record_job

    cfg_path, run_dir = write_config(work, "refused-on-node-1")
    overrides = ["slurm.nodes=2", "train.nproc_per_node=1"]
    cfg = load_config(str(cfg_path), overrides)
    refuse = 'if [ "$SLURM_NODEID" = 1 ]; then echo "node 1: bad data" >&2; exit 2; fi; exec "$@"'
    run_dir.mkdir(parents=True, exist_ok=True)
    job = submit_job(["bash", "-c", refuse, "bash", *train_argv(str(cfg_path), overrides, cfg)], cfg.slurm, 0, run_dir, "refused")
    code, outcome = wait_for_training(job, cfg, poll_s=0.5)  # what `pretrain submit --wait` reports
    assert code == 2, outcome
    text = status_text(run_dir)
    assert "bash exited with code 2 (refused" in text and f"{job.job_id}_1_log.err" in text and "reason NonZeroExitCode" in text, text

    # a controller (and slurmdbd) that does not answer: status ends within a bounded time, saying so
    for other in ("999998", "999999"):
        record_job(run_dir / "slurm", {"job_id": other, "name": "other", "cluster": "slurm"})
    monkeypatch.setattr(jobs, "QUERY_TIMEOUT_S", 2.0)
    monkeypatch.setattr(jobs, "_silent_until", {})
    daemons = [int((cluster / "run" / f"{d}.pid").read_text()) for d in ("slurmctld", "slurmdbd")]
    for pid in daemons:
        os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.time()
        states = [j["state"] for j in status_data(run_dir)["slurm_jobs"]]
        took = time.time() - t0
    finally:
        for pid in daemons:
            os.kill(pid, signal.SIGCONT)
    assert states == ["UNREACHABLE (SLURM did not answer)"] * 3, states
    assert took < 10, f"status took {took:.0f} s with SLURM not answering"


def test_a_task_killed_before_its_result_file_is_reported_when_the_job_ends_not_a_backoff_later(cluster, work):
    """A task killed before it writes submitit's result file (the OOM killer; every node of a multi-node
    job after one failed) left `--wait` to submitit's shared sacct watcher, which asks 2, 4, 8, 16, 32,
    64 ... s after the newest submission: this job, ended some 45 s after it was submitted, was reported
    19 s after its end (and CI once saw the busy-port job above, which takes 15 s, reported at 128 s)."""
    from datetime import datetime

    from pipelines.config import load_config
    from pipelines.launching import submit_job, wait_for_training

    cfg_path, run_dir = write_config(work, "task-killed")
    cfg = load_config(str(cfg_path), [])
    run_dir.mkdir(parents=True, exist_ok=True)
    oom = "sleep 35; kill -KILL $PPID"  # the task's Python (slurm.node_command), as the OOM killer would
    job = submit_job(["bash", "-c", oom], cfg.slurm, 0, run_dir, "task-killed")
    code, outcome = wait_for_training(job, cfg, poll_s=0.5)  # what `pretrain submit --wait` reports
    returned = time.time()
    assert code == 1 and "no exit line in its log" in outcome, outcome
    state, _, ended = accounting(str(job.job_id), "State,End").partition("|")
    assert state == "FAILED", end
    late = returned - datetime.fromisoformat(ended).timestamp()  # sacct gives local time, to the second
    assert late < 6, f"reported {late:.0f} s after the job ended"


def test_an_eval_job_killed_before_its_result_file_is_retried_when_it_ends(cluster, work, local_losses, monkeypatch):
    """The eval watcher saw an eval job's end through the same `job.done()`: a job killed before it
    wrote its result file (here after 35 s, as the OOM killer would) was counted failed, and retried,
    only at submitit's next sacct tick. Its error now names SLURM's state of the job."""
    import shutil
    from datetime import datetime

    from evals.watch import Watcher
    from pipelines.config import load_config
    from tests.evals_helpers import hellaswag_rows, write_jsonl
    from trainer.checkpoint import list_committed

    run_dir = work / "eval-killed"
    shutil.copytree(work / "local", run_dir)  # local_losses trained it
    *older, newest = list_committed(run_dir)
    for ckpt in older:  # one checkpoint: one job to kill, one retry
        shutil.rmtree(ckpt)
    hs = work / "eval-killed-hellaswag.jsonl"
    write_jsonl(hs, hellaswag_rows(4, seed=2))
    cfg_path, _ = write_config(work, "eval-killed")
    cfg = load_config(str(cfg_path), [f"eval.hellaswag_path={hs}", "eval.data_source=local", "eval.device=cpu", "eval.slurm.gpus=0",
                                      "eval.slurm.cpus=1", "eval.slurm.time=10:00", "eval.max_retries=1"])
    killer = work / "eval-killer"
    killer.mkdir()
    (killer / "sitecustomize.py").write_text(  # the first Python of the first eval job: 35 s, then SIGKILL
        "import os, signal, time\n"
        f"if os.environ.get('SLURM_JOB_ID') and not os.path.exists({str(killer / 'done')!r}):\n"
        f"    open({str(killer / 'done')!r}, 'w').write(os.environ['SLURM_JOB_ID'])\n"
        "    time.sleep(35)\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    # SLURM jobs take the submitter's environment
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(killer), os.environ.get("PYTHONPATH", "")) if p))
    said: list[tuple[float, str]] = []
    code = Watcher(run_dir, cfg.eval, executor="slurm", log=lambda line: said.append((time.time(), line))).run(once=True)
    text = "\n".join(line for _, line in said)
    assert code == 0 and f"watch: {newest.name} evaluated" in text, text
    killed = (killer / "done").read_text()
    failed = [(t, line) for t, line in said if "eval failed (attempt 1/2)" in line]
    assert len(failed) == 1 and f"job {killed} ended (FAILED)" in failed[0][1], text
    state, _, ended = accounting(killed, "State,End").partition("|")
    assert state == "FAILED", state
    late = failed[0][0] - datetime.fromisoformat(ended).timestamp()
    assert late < 6, f"the watcher saw the killed job {late:.0f} s after it ended"


def test_a_failed_node_whose_kill_did_not_take_asks_again_then_gives_up_saying_why(cluster, monkeypatch, capsys):
    """The kill of the step ends the failed node's own task too; a task still alive after it knows
    the kill did not take (here scancel refuses: SLURM knows no such step). It asks again, up to
    KILL_TRIES times, each time naming scancel's answer in the job log, then gives up: bounded."""
    from slurm import node_command

    monkeypatch.setattr(node_command, "KILL_TAKES_S", 0.2)
    monkeypatch.setenv("SLURM_JOB_ID", "987654")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    node_command.end_other_nodes("bash exited with code 1 (failed; not requeued)", grace_s=0)
    out = capsys.readouterr().out
    assert out.count("of step 987654.0 did not end this task") == node_command.KILL_TRIES, out
    assert "(scancel exited with 1: scancel: error: Kill job error on job step id 987654.0: Invalid job id specified)" in out, out
    assert "gave up killing step 987654.0" in out, out


def test_a_node_whose_kill_was_lost_ends_its_command_when_another_node_says_it_failed(cluster, work, monkeypatch):
    """The failed node's kill of the step once reached only its own node (the other slurmd logged
    the message cut off) and the job stayed RUNNING. Every node also watches submitit's job folder
    for the failed node's marker: node 0 of a 2-node job, running a command with children of its
    own, still running once the kill should have taken (PEERS_GRACE_S + KILL_TAKES_S after the
    marker), kills them all and fails, naming the other node's exit line."""
    import threading

    from slurm import node_command

    folder = work / "peer-marker"
    folder.mkdir()
    env = {"SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": str(folder), "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_RESTART_COUNT": "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    marker = folder / "4242_run0_failed_node"
    threading.Timer(2.0, lambda: marker.write_text("node 1: bash exited with code 1 (failed; not requeued)\n")).start()
    command = node_command.NodeCommand(["bash", "-c", "sleep 120 & sleep 120 & wait"], 3, 1)
    t0 = time.time()
    with pytest.raises(node_command.NodeFailed, match=r"another node of the job failed for good, node 1: bash exited with code 1"):
        command()
    waited = time.time() - t0 - 2.0
    assert node_command.PEERS_GRACE_S + node_command.KILL_TAKES_S <= waited < node_command.PEERS_GRACE_S + node_command.KILL_TAKES_S + 5, waited
    time.sleep(0.5)
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes() == b"sleep\x00120\x00":
                left.append(cmdline.parent.name)
        except OSError:
            pass  # ended while we looked
    assert not left, f"the command's children outlived it: {left}"


def test_stopping_the_test_cluster_leaves_no_step_behind(cluster):  
    """A step still ending (here: 8 s on SIGTERM, as a checkpointing training) when the controller stopped
    kept its slurmstepd, which ~60 s later drained n1 of the next test cluster ("Kill task failed").
    Runs last: it stops the module's cluster."""
    conf = str(cluster / "etc" / "slurm.conf")
    script = cluster / "slow.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'trap \"sleep 8; exit 3\" TERM; while :; do sleep 0.2; done'\n")
    job = subprocess.run(["sbatch", "--parsable", "-w", "n1", "-o", str(cluster / "slow-%j.out"), str(script)],
                         capture_output=True, text=True, check=True).stdout.strip()
    deadline = time.time() + 30
    while "RUNNING" not in subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout:
        assert time.time() < deadline, "the job did not start"
        time.sleep(0.5)
    time.sleep(1)
    subprocess.run(["bash", str(SCRIPTS / "stop.sh")], env={**os.environ, "BASE": str(cluster)}, capture_output=True, timeout=120)
    left = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _is_stepd_of(p, conf)]
    assert not left, f"slurmstepd of the stopped cluster still running: {left}"


def _is_stepd_of(proc: Path, conf: str) -> bool:
    try:
        return (proc / "comm").read_text().strip() == "slurmstepd" and f"SLURM_CONF={conf}".encode() in (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return False
