"""Following a run and knowing what produced it: in-process, fast, with real git, real MLflow stores.

The provenance tags and the dataset input on a real MLflow server, from a real training, are checked
in tests/test_tracking_outage.py (its training already logs to a server); the step line, `pretrain
status` and the eval scores `pretrain run` prints, on the finished workflow in tests/test_workflow.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pipelines.config import PipelineConfig
from pipelines.report import write_report
from tests.conftest import skip_or_fail
from trainer.metrics import MetricsLog
from trainer.progress import StepTimer, eta_from_records, format_duration
from common.rundir import RunDir
from trainer.provenance import (
    git_state,
    write_run_config,
)


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True, capture_output=True)


def test_git_state_names_the_commit_and_whether_tracked_files_changed(tmp_path):
    if shutil.which("git") is None:
        skip_or_fail("git is not installed")
    repo = tmp_path / "code"
    (repo / "trainer").mkdir(parents=True)
    assert git_state(repo) == {}  # not a checkout: no git tags at all
    _git(repo, "init", "-q")
    (repo / "trainer" / "x.py").write_text("a = 1\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "c")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_state(repo) == {"commit": head, "dirty": "false"}
    (repo / "runs").mkdir()
    (repo / "runs" / "metrics.jsonl").write_text("{}\n")  # a run dir inside the checkout is no code change
    assert git_state(repo)["dirty"] == "false"
    (repo / "trainer" / "x.py").write_text("a = 2\n")
    assert git_state(repo) == {"commit": head, "dirty": "true"}
    # a package installed inside some other repository (a venv in a project) is not that repository's code
    assert git_state(repo / "trainer") == {}


def test_run_config_is_rewritten_by_each_start_keeping_the_previous_one(tmp_path):
    run_dir = tmp_path / "run"
    write_run_config(run_dir, "train:\n  lr: 0.1\n")
    assert RunDir(run_dir).config.read_text() == "train:\n  lr: 0.1\n" and not RunDir(run_dir).prev_config.exists()
    write_run_config(run_dir, "train:\n  lr: 0.1\n")  # the same config again: nothing to keep
    assert not RunDir(run_dir).prev_config.exists()
    write_run_config(run_dir, "train:\n  lr: 0.2\n")
    assert RunDir(run_dir).config.read_text() == "train:\n  lr: 0.2\n"
    assert RunDir(run_dir).prev_config.read_text() == "train:\n  lr: 0.1\n"
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")], "no temporary file left behind"


def test_eta_leaves_out_warm_up_steps_and_restart_gaps():
    timer = StepTimer(warmup=3, window=4)
    assert timer.eta_s(100) is None
    for t in (0.0, 30.0, 31.0, 32.0):  # a 30 s first step (compile) is not counted
        timer.tick(t)
    assert timer.eta_s(10) == pytest.approx(10.0)
    for t in (34.0, 36.0, 38.0, 40.0):  # the window moves: 2 s per step now
        timer.tick(t)
    assert timer.eta_s(10) == pytest.approx(20.0)
    # metrics.jsonl spanning a restart 2 hours later: the median step time, not the gap
    records = [{"step": s, "time": 1000.0 + 2 * s} for s in range(1, 11)]
    records += [{"step": s, "time": 9000.0 + 2 * s} for s in range(11, 21)]
    assert eta_from_records(records, max_steps=120) == pytest.approx(200.0)
    assert eta_from_records(records[:1], max_steps=120) is None
    assert [format_duration(s) for s in (5, 125, 7300, 200_000, None)] == ["5s", "2m05s", "2h01m", "2d07h", "?"]


def _metrics(run_dir: Path, steps: range) -> None:
    log = MetricsLog(run_dir / "metrics.jsonl")
    for s in steps:
        log.append({"step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "grad_norm": 1.0, "tokens": 64 * s, "tokens_per_s": 100.0,
                    "time": time.time()})
    log.close()


def _loss_steps(uri: str, run_id: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss"))


def test_report_on_a_copied_run_dir_writes_into_the_copys_store(tmp_path):
    """mlflow_run.json names a local sqlite store relative to the run dir: `runs/` copied elsewhere is
    a self-contained copy, and `pretrain report` on it never writes into the original database."""
    original = tmp_path / "a" / "runs" / "r1"
    original.mkdir(parents=True)
    _metrics(original, range(1, 6))
    cfg = PipelineConfig(run_dir=str(original))  # tracking.uri "": sqlite next to the run dir
    cfg.tracking.experiment = "copy-test"
    write_report(original, cfg, log=lambda m: None)
    rec = json.loads((original / "mlflow_run.json").read_text())
    assert rec["sqlite"] == "../mlflow.db", rec
    original_uri = f"sqlite:///{original.parent / 'mlflow.db'}"
    assert _loss_steps(original_uri, rec["run_id"]) == [1, 2, 3, 4, 5]

    copy_runs = tmp_path / "b" / "runs"
    shutil.copytree(original.parent, copy_runs)
    copy = copy_runs / "r1"
    _metrics(copy, range(6, 9))  # the copy trains on (or gets steps) the original never had
    lines: list[str] = []
    write_report(copy, None, log=lines.append)  # no config at hand: the run file alone says where
    copy_uri = f"sqlite:///{copy_runs / 'mlflow.db'}"
    assert _loss_steps(copy_uri, rec["run_id"]) == list(range(1, 9)), lines
    assert _loss_steps(original_uri, rec["run_id"]) == [1, 2, 3, 4, 5], "the copy wrote into the original store"
    assert any(copy_uri in line for line in lines), lines

    # an older run file (absolute uri only) is still read: it points where it always did
    (copy / "mlflow_run.json").write_text(json.dumps({"run_id": rec["run_id"], "uri": original_uri}))
    _metrics(copy, range(9, 10))
    write_report(copy, None, log=lambda m: None)
    assert 9 in _loss_steps(original_uri, rec["run_id"]) and 9 not in _loss_steps(copy_uri, rec["run_id"])


def test_system_metrics_reach_the_run_when_psutil_is_installed(tmp_path, monkeypatch):
    """MLflow's system metrics monitor runs next to the tracker when it can (psutil), and stops with it."""
    from mlflow.tracking import MlflowClient

    from trainer.tracking import MlflowTracker

    try:
        import psutil  # noqa: F401
        available = True
    except ImportError:
        available = False
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "system-metrics", tmp_path / "run", None, {"k": 1}, "run", flush_every_s=0.2)
    assert tracker.wait_started(60)
    client = MlflowClient(tracking_uri=uri)

    def system_keys() -> set[str]:
        return {k for k in client.get_run(tracker.run_id).data.metrics if k.startswith("system/")}

    deadline = time.monotonic() + 30
    while available and not system_keys():
        assert time.monotonic() < deadline, "no system metric reached the run within 30 s"
        time.sleep(0.5)
    t0 = time.monotonic()
    assert tracker.finish("FINISHED", timeout=30)
    assert time.monotonic() - t0 < 10
    if available:
        assert "system/cpu_utilization_percentage" in system_keys() and "system/system_memory_usage_megabytes" in system_keys()
    else:
        assert system_keys() == set()  # off without psutil; tracking itself is unaffected
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
