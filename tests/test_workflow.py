"""`pretrain run` end to end on CPU with real Ray, torchrun, the eval watcher and MLflow (sqlite):
completes, resumes after Ctrl-C to the same final metrics (kills in every stage: tests/test_chaos.py),
refuses config changes that would invalidate finished stages, and `status`/`report` work at any point."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.trainer_helpers import kill_tree, metric_steps
from tests.workflow_helpers import final_metrics, stage_status, write_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def pretrain(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def work(workflow_work) -> Path:
    return workflow_work


@pytest.fixture(scope="module")
def reference(workflow_reference) -> Path:
    return workflow_reference


def test_workflow_completes_with_all_outputs(reference):
    assert stage_status(reference) == {"data": "done", "train": "done", "eval": "done", "report": "done"}
    m = final_metrics(reference)
    assert sorted(m["losses"]) == list(range(1, 13))
    assert sorted(m["evals"]) == ["step_00000006/hellaswag", "step_00000012/hellaswag"]
    assert all(0 <= v["acc_norm"] <= 1 for v in m["evals"].values())
    assert (reference / "report.png").stat().st_size > 10_000
    header = (reference / "report.csv").read_text().splitlines()[0]
    assert header == ("step,tokens,train_loss,val_loss,eval/hellaswag/acc,eval/hellaswag/acc_norm,"
                      "eval/hellaswag/acc_norm_stderr,eval/hellaswag/acc_stderr")  # stderr: the report's error bars


def test_run_output_has_timed_step_lines_with_eta_and_each_eval_score(reference, work):
    """What a user following `pretrain run` sees: when each step ended, how long is left, every score as it lands."""
    out = (work / "reference.out").read_text()
    lines = [line for line in out.splitlines() if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d step \d+/12 \| loss ", line)]
    assert len(lines) == 12, out[-3000:]
    assert "| eta " not in lines[0]  # the first steps (compile, warm-up) are no estimate
    assert all(re.search(r"\| eta \d+s$", line) for line in lines[5:]), lines  # CPU: no peak-memory field
    assert lines[-1].endswith("| eta 0s")
    for step in (6, 12):
        m = re.search(rf"watch: step_{step:08d} evaluated \(job \S+\): hellaswag: acc (\S+) ± (\S+), acc_norm (\S+) ± (\S+) \(n=12\)", out)
        assert m, out[-3000:]
        saved = final_metrics(reference)["evals"][f"step_{step:08d}/hellaswag"]
        assert float(m.group(3)) == pytest.approx(saved["acc_norm"], abs=5e-5)


def test_run_dir_holds_the_resolved_config_that_loads_back_the_same(reference, work, gpt2_ranks):
    from pipelines.config import dump_yaml, load_config

    cfg, _ = write_config(work, "reference", gpt2_ranks)
    stored = (reference / "config.yaml").read_text()
    assert stored == dump_yaml(load_config(cfg))
    assert dump_yaml(load_config(reference / "config.yaml")) == stored
    assert not (reference / "config.prev.yaml").exists()  # one start with one config


def test_rerun_of_finished_workflow_verifies_and_skips(reference, work, gpt2_ranks):
    cfg, _ = write_config(work, "reference", gpt2_ranks)
    t0 = time.time()
    r = pretrain("run", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    for stage in ("data", "train", "eval", "report"):
        assert f"workflow: {stage}: done (outputs verified), skipping" in r.stdout
    assert time.time() - t0 < 60


def test_status_of_finished_run(reference):
    r = pretrain("status", str(reference))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for stage in ("data", "train", "eval", "report"):
        assert f"  {stage:<7} done" in out
    assert "training  step 12/12 (100.0%), loss" in out and "tokens/s" in out and "done (train.max_steps reached)" in out
    assert "step_00000006 (step 6)  hellaswag: acc" in out and "step_00000012 (step 12)  hellaswag: acc" in out
    assert "checkpoints (2 committed, last committed step 12 " in out
    assert re.search(r"evals     latest at step 12: hellaswag: acc \d\.\d{4} ± \d\.\d{4}, acc_norm \d\.\d{4} ± \d\.\d{4} \(n=12\)", out), out
    assert "mlflow    run " in out and "mlflow ui --backend-store-uri sqlite:///" in out

    r = pretrain("status", str(reference), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    t = data["training"]
    assert (t["step"], t["max_steps"], t["percent"], t["done"], t["eta_s"]) == (12, 12, 100.0, True, None)
    assert t["tokens"] == 12 * 256 and t["loss"] == final_metrics(reference)["losses"][12]
    assert data["last_checkpoint"]["step"] == 12 and 0 <= data["last_checkpoint"]["age_s"] < 3600
    assert [c["step"] for c in data["checkpoints"]] == [6, 12]
    latest = data["latest_evals"]
    saved = final_metrics(reference)["evals"]["step_00000012/hellaswag"]
    assert latest["step"] == 12 and latest["tasks"]["hellaswag"]["metrics"] == saved
    assert set(latest["tasks"]["hellaswag"]["stderr"]) == {"acc", "acc_norm"} and latest["tasks"]["hellaswag"]["n"] == 12
    assert data["checkpoints"][0]["evals"]["hellaswag"]["metrics"] == final_metrics(reference)["evals"]["step_00000006/hellaswag"]
    assert {s: v["status"] for s, v in data["workflow"]["stages"].items()} == stage_status(reference)
    assert data["mlflow"]["uri"] == f"sqlite:///{reference.parent / 'mlflow.db'}" and data["mlflow"]["run_id"]


def test_eval_metrics_reach_the_training_mlflow_run(reference):
    from mlflow.tracking import MlflowClient

    rec = json.loads((reference / "mlflow_run.json").read_text())
    assert rec["sqlite"] == "../mlflow.db"  # the store relative to the run dir: a copied runs/ stays self-contained
    client = MlflowClient(tracking_uri=rec["uri"])
    history = client.get_metric_history(rec["run_id"], "eval/hellaswag/acc_norm")
    assert sorted(h.step for h in history) == [6, 12]
    stderr = client.get_metric_history(rec["run_id"], "eval/hellaswag/acc_norm_stderr")
    assert sorted(h.step for h in stderr) == [6, 12]
    tokens = client.get_metric_history(rec["run_id"], "tokens")
    assert sorted((h.step, h.value) for h in tokens) == [(s, 256.0 * s) for s in range(1, 13)]
    assert "report" in {a.path for a in client.list_artifacts(rec["run_id"])}


def _wait(pred, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while not pred():
        assert proc.poll() is None, f"run exited ({proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_config_change_is_refused_unless_restarting(reference, work, gpt2_ranks, tmp_path):
    cfg, run_dir = write_config(work, "reference", gpt2_ranks)
    before = (run_dir / "workflow.json").read_text()
    r = pretrain("run", str(cfg), "train.lr=0.01")
    assert r.returncode == 2
    assert "the config changed since stage 'train' ran (train.lr)" in r.stderr and "--restart-from train" in r.stderr
    assert (run_dir / "workflow.json").read_text() == before
    # A run-time knob (cadence, device, ranks) never invalidates a finished stage.
    r = pretrain("run", str(cfg), "train.ckpt_every=3", "eval.batch_size=4")
    assert r.returncode == 0 and "workflow: train: done (outputs verified), skipping" in r.stdout, r.stderr[-2000:]
    # Restarting from the report redoes only the report.
    r = pretrain("run", str(cfg), "--restart-from", "report")
    assert r.returncode == 0 and "workflow: eval: done (outputs verified), skipping" in r.stdout
    assert stage_status(run_dir)["report"] == "done"


def test_restart_from_train_archives_the_old_run(reference, work, gpt2_ranks):
    cfg, run_dir = write_config(work, "restart", gpt2_ranks, data_name="reference")
    shutil.copytree(reference, run_dir, ignore=shutil.ignore_patterns(".locks"))  # a finished run, moved here
    old = final_metrics(run_dir)
    r = pretrain("run", str(cfg), "train.lr=0.01", "--restart-from", "train")
    assert r.returncode == 0, r.stderr[-2000:]
    archives = list((run_dir / "archive").iterdir())
    assert len(archives) == 1 and (archives[0] / "checkpoints").is_dir() and (archives[0] / "metrics.jsonl").is_file()
    new = final_metrics(run_dir)
    assert sorted(new["losses"]) == list(range(1, 13)) and new["losses"] != old["losses"]

    # Restarting the evals under other settings redoes them; the old results are archived.
    r = pretrain("run", str(cfg), "train.lr=0.01", "eval.hellaswag_style=harness")
    assert r.returncode == 2 and "--restart-from eval" in r.stderr
    r = pretrain("run", str(cfg), "train.lr=0.01", "eval.hellaswag_style=harness", "--restart-from", "eval")
    assert r.returncode == 0 and "previous eval results moved to" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    styles = {json.loads((c / "evals" / "hellaswag.json").read_text())["settings"]["hellaswag_style"] for c in checkpoints}
    assert styles == {"harness"}
    (archive,) = [a for a in (run_dir / "archive").iterdir() if (a / "checkpoint_evals").is_dir()]
    assert sorted(p.parent.name for p in (archive / "checkpoint_evals").glob("*/hellaswag.json")) == [c.name for c in checkpoints]


def test_a_stop_signal_mid_report_exits_3_and_leaves_no_temporary_file(reference, tmp_path):
    """`pretrain report` as a job of its own: SIGTERM between writing report.csv and report.png
    (and a second one while it unwinds) is exit 3, with no half-written file left in the run dir."""
    from tests.signal_helpers import run_signalled

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir, ignore=shutil.ignore_patterns(".locks"))
    r = run_signalled("pipelines.report:plot_series", "before", "report", str(run_dir), "tracking.uri=none", twice=True)
    assert r.returncode == 3 and "pretrain report: stopped by SIGTERM" in r.stderr, r.stdout + r.stderr
    assert sorted(p.name for p in run_dir.iterdir() if ".tmp" in p.name) == []


def test_bad_configs_fail_before_anything_runs(work, gpt2_ranks, tmp_path):
    cfg, run_dir = write_config(work, "bad", gpt2_ranks)
    r = pretrain("run", str(cfg), "train.max_stepz=3")
    assert r.returncode == 2 and "unknown key 'train.max_stepz'" in r.stderr
    r = pretrain("run", str(cfg), "--restart-from", "nothing")
    assert r.returncode == 2
    assert not run_dir.exists()


def test_ctrl_c_during_training_then_rerun_resumes(reference, work, gpt2_ranks):
    """Ctrl-C as a terminal sends it: SIGINT to the whole foreground process group. (SIGKILL and
    SIGTERM at random points of every stage, then a rerun, are tests/test_chaos.py's.)"""
    cfg, run_dir = write_config(work, "ctrl-c", gpt2_ranks, data_name="reference")
    log = open(work / "ctrl-c.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(cfg)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait(lambda: metric_steps(run_dir) >= 3, 180, "training step 3", proc)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        kill_tree(proc)
    assert stage_status(run_dir)["train"] == "interrupted"
    assert "run the same command again to resume" in (work / "ctrl-c.log").read_text()
    # status and report work on a half-finished run
    r = pretrain("status", str(run_dir))
    assert r.returncode == 0 and "  train   interrupted" in r.stdout and "training  step " in r.stdout, r.stdout + r.stderr
    assert re.search(r"training  step \d+/12 \(\d+\.\d%\)", r.stdout), r.stdout
    # stopped: no ETA "while it runs", but how long the rest would take
    assert re.search(r"not running now: \S+ of training left", r.stdout) and "ETA" not in r.stdout, r.stdout
    t = json.loads(pretrain("status", str(run_dir), "--json").stdout)["training"]
    assert 3 <= t["step"] < 12 and t["max_steps"] == 12 and not t["done"] and t["time_left_s"] > 0, t
    assert t["running"] is False and t["eta_s"] is None, t
    r = pretrain("report", str(run_dir))
    assert r.returncode == 0 and (run_dir / "report.png").exists(), r.stderr
    r = pretrain("run", str(cfg))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got, want = final_metrics(run_dir), final_metrics(reference)
    assert got["losses"] == want["losses"]
    # the stop added a checkpoint at the step it stopped at (evaluated too); the rest are identical
    assert {k: v for k, v in got["evals"].items() if k in want["evals"]} == want["evals"]


def test_second_workflow_on_a_run_dir_is_refused_naming_the_holder(reference, work, gpt2_ranks):
    cfg, run_dir = write_config(work, "locked", gpt2_ranks, data_name="reference")
    log = open(work / "locked.log", "wb")
    longer = "train.max_steps=2000"  # still training when the second one gives up waiting
    first = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(cfg), longer], cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(lambda: metric_steps(run_dir) >= 1, 180, "training step 1", first)
        r = pretrain("run", str(cfg), longer, timeout=120)
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        assert f"pid {first.pid}" in r.stderr and "in use (workflow)" in r.stderr
        assert "workflow:" not in r.stdout  # it did nothing
        assert stage_status(run_dir)["train"] == "running"
        # SIGTERM (as from SLURM or `kill`) stops the first one cleanly: checkpointed, exit 3
        os.killpg(first.pid, signal.SIGTERM)
        assert first.wait(timeout=120) == 3
    finally:
        kill_tree(first)
    assert stage_status(run_dir)["train"] == "interrupted"
