"""What a user meets after an interrupted or contested run, on the real commands:

* `pretrain run` whose training is refused because another live training holds the run dir says
  who holds it and how to end it (exit 2: a rerun cannot make that process go away), not "fix the
  config or data";
* an eval job cancelled because the watcher that started it was SIGKILLed is not counted as a
  failed attempt: a driver kill must not use up ``eval.max_retries`` (here 0: one kill would);
* a training whose terminal goes away (the pty closed: SIGHUP to its session, then every write to
  it fails with EIO) still checkpoints on the stop that follows and exits 3.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_orphans import GONE_S, alive, cmdline, kill_driver_when
from tests.trainer_helpers import REPO, descendants, kill_tree, make_shard_dir, metric_steps, micro_config, pretrain_cmd, start
from tests.workflow_helpers import write_config

pytestmark = pytest.mark.slow


def copy_run(reference: Path, run_dir: Path, keep_evals: bool) -> None:
    """A copy of the finished reference run without its final checkpoint (and without eval results
    unless ``keep_evals``): what a run looks like part way."""
    shutil.copytree(reference, run_dir, ignore=shutil.ignore_patterns(".locks"))
    shutil.rmtree(run_dir / "checkpoints" / "step_00000012")
    if not keep_evals:
        for evals in [run_dir / "evals", *run_dir.glob("checkpoints/step_*/evals")]:
            shutil.rmtree(evals)


def env_outside_slurm() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def test_a_training_refused_for_a_held_run_dir_names_the_holder_and_how_to_end_it(workflow_reference, workflow_work, gpt2_ranks,
                                                                                 monkeypatch):
    from trainer.runlock import RunLock

    cfg, run_dir = write_config(workflow_work, "held", gpt2_ranks, data_name="reference")
    copy_run(workflow_reference, run_dir, keep_evals=True)  # data done; training must run to step 12
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the holder is a training of SLURM job 4242 (this process)
    with RunLock(run_dir, "train", wait_s=0):
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(cfg)], cwd=REPO, capture_output=True, text=True,
                           timeout=300, env=env_outside_slurm())
    print(f"refused after {time.time() - t0:.1f} s")
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]  # refused: never requeued, a requeue would only meet the holder again
    assert f"stage 'train' refused: another training is writing {run_dir}" in r.stderr, out[-3000:]
    assert f"host {os.uname().nodename}, pid {os.getpid()}, SLURM job 4242" in r.stderr
    assert "wait for that training to end, or stop it (scancel 4242" in r.stderr
    assert "fix the config or data" not in out


def test_an_eval_job_cancelled_by_its_watchers_death_is_not_a_failed_attempt(workflow_reference, workflow_work, gpt2_ranks):
    cfg, run_dir = write_config(workflow_work, "evalkill", gpt2_ranks, data_name="reference")
    copy_run(workflow_reference, run_dir, keep_evals=False)  # one checkpoint to evaluate: step 6
    watch = pretrain_cmd("evals", "watch", str(run_dir), "eval.max_retries=0", "--once", "--config", str(cfg))
    log = workflow_work / "evalkill.log"
    proc = start(watch, log)
    try:
        job = lambda: any("submitit.core._submit" in cmdline(p) for p in descendants(proc.pid))  # noqa: E731
        started = kill_driver_when(proc, job, "the eval job")
        t0 = time.time()
        while alive(started):
            assert time.time() - t0 < GONE_S, "the eval job outlived its watcher"
            time.sleep(0.1)
    finally:
        kill_tree(proc)
    r = subprocess.run(watch, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, log.read_text(errors="replace")[-2000:] + out[-3000:]
    assert "was cancelled when the watcher that started it died; not counted" in out, out[-3000:]
    assert "eval failed" not in out and "giving up" not in out
    entry = json.loads((run_dir / "evals" / "watch.json").read_text())["checkpoints"]["step_00000006"]
    assert (entry["status"], entry["attempts"], entry["errors"]) == ("done", 1, [])
    assert (run_dir / "checkpoints" / "step_00000006" / "evals" / "hellaswag.json").is_file()


def test_training_whose_terminal_is_closed_checkpoints_and_exits_3(tmp_path):
    """`pretrain train` on a pty (its controlling terminal), the pty closed: the hangup ends
    `pretrain train`, torchrun gets SIGTERM and passes it on; the ranks' writes to the gone terminal
    fail (EIO) but must not kill them before they checkpoint. rank 0's outcome file says 3."""
    from trainer.checkpoint import list_committed, read_meta

    run_dir, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(micro_config(run_dir, make_shard_dir(tmp_path / "data"), train={"max_steps": 10_000, "ckpt_every": 10_000}))
    master, slave = pty.openpty()

    def controlling_tty() -> None:
        import fcntl
        import termios

        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(pretrain_cmd("train", str(cfg)), cwd=REPO, stdin=slave, stdout=slave, stderr=slave,
                            preexec_fn=controlling_tty, env={**os.environ, "TMPDIR": str(tmp)})  # noqa: PLW1509
    os.close(slave)
    try:
        deadline = time.time() + 120
        while metric_steps(run_dir) < 3:  # read what it prints, as a terminal does (a full pty would block it)
            assert proc.poll() is None and time.time() < deadline, f"no step 3 (exit {proc.poll()})"
            if select.select([master], [], [], 0.1)[0]:
                os.read(master, 65536)
        started = descendants(proc.pid)
        os.close(master)  # the terminal goes away
        t0 = time.time()
        assert proc.wait(timeout=30) == -signal.SIGHUP
        while alive(started):
            assert time.time() - t0 < 60, f"still running: {[cmdline(p)[:80] for p in alive(started)]}"
            time.sleep(0.1)
        print(f"ranks gone {time.time() - t0:.1f} s after the terminal closed")
    finally:
        kill_tree(proc)
    outcome = [json.loads(p.read_text()) for p in tmp.glob("pretrain-launch-*/exit.json")]  # the launcher died of the hangup
    assert [o["code"] for o in outcome] == [3], outcome
    committed = list_committed(run_dir)
    assert committed and int(read_meta(committed[-1])["step"]) == metric_steps(run_dir) >= 3
