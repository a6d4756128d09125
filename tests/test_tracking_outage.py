"""An MLflow outage neither stops training nor delays a stop, and MLflow ends up with every step exactly once.

Real components only: a real `mlflow server` on 127.0.0.1 (killed and restarted on the same port
and store, as an outage looks to a user), real `pretrain train` under torchrun with 2 gloo ranks,
and `pretrain report` replaying what the server missed; in-process, a frozen server (SIGSTOP) and an
overflowing queue.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.config import PipelineConfig
from pipelines.report import write_report
from tests.services import MlflowServer, free_port
from tests.trainer_helpers import (
    kill_tree,
    make_shard_dir,
    metric_steps,
    micro_config,
    pretrain_cmd,
    start,
    wait_for_step,
)
from trainer import EXIT_OK, EXIT_REFUSED, EXIT_REQUEUE
from trainer.checkpoint import MODEL_FILE, list_committed, read_meta
from trainer.metrics import MetricsLog, read_metrics
from trainer.tracking import MlflowTracker

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_shard_dir(tmp_path_factory.mktemp("outage-data"), seed=3)


def write_config(tmp: Path, data_dir: Path, uri: str, max_steps: int, nproc: int = 2) -> tuple[Path, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    run_dir = tmp / "run"
    path = tmp / "config.yaml"
    train = {"nproc_per_node": nproc, "micro_batch_size": 2, "seq_len": 16,
             "batch_tokens": 32 * nproc,  # nproc ranks x 2 x 16, no grad accumulation
             "max_steps": max_steps, "ckpt_every": 10, "keep_last": 2, "keep_every": 0}
    path.write_text(micro_config(run_dir, data_dir, train=train, tracking_uri=uri, extra={"tracking": {"experiment": "outage"}}))
    return path, run_dir


def run(cmd: list[str], log: Path, timeout: float = 240) -> int:
    proc = start(cmd, log)
    try:
        return proc.wait(timeout=timeout)
    finally:
        kill_tree(proc)


def mlflow_last(uri: str, run_id: str) -> int:
    """The newest step of the run's loss curve in MLflow (0 if none)."""
    from mlflow.tracking import MlflowClient

    return max((m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss")), default=0)


def assert_every_step_once(uri: str, run_id: str, run_dir: Path, last_step: int) -> None:
    """MLflow's history of each key: one point per step 1..last_step, equal to metrics.jsonl.

    ``tokens_per_s`` is only counted: a step re-run after a resume has the same loss, lr and grad
    norm bit for bit (exact resume) but not the same speed, and MLflow keeps the first one.
    """
    from mlflow.tracking import MlflowClient

    records = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}
    assert sorted(records) == list(range(1, last_step + 1))
    client = MlflowClient(tracking_uri=uri)
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s"):
        history = client.get_metric_history(run_id, key)
        steps = sorted(m.step for m in history)
        assert steps == list(range(1, last_step + 1)), f"{key}: MLflow must hold each step exactly once, has {steps}"
        if key != "tokens_per_s":
            for m in history:
                assert m.value == records[m.step][key], f"{key} at step {m.step}: MLflow {m.value} != metrics.jsonl"


def committed_run_id(run_dir: Path) -> str | None:
    committed = list_committed(run_dir)
    return read_meta(committed[-1]).get("mlflow_run_id") if committed else None


def mark(log: Path, text: str, t0: float) -> None:
    """A line in the training log saying where the test is (for reading a failure)."""
    with open(log, "a") as f:
        f.write(f"--- test: {text} (+{time.monotonic() - t0:.1f} s)\n")


def wait_until(predicate: Callable[[], bool], what: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"training exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)


def test_killed_server_neither_stalls_training_nor_delays_sigterm_and_every_step_lands_once(tmp_path, data_dir):
    from mlflow.tracking import MlflowClient

    (tmp_path / "mlflow").mkdir()
    server = MlflowServer(tmp_path / "mlflow")
    uri = server.start()
    # stopped by signals long before max_steps; every rerun continues the same schedule
    config, run_dir = write_config(tmp_path, data_dir, uri, max_steps=100_000)
    log = tmp_path / "train.log"
    t_start = time.monotonic()
    try:
        # 1. the server dies mid-run: steps keep coming, and SIGTERM still exits 3 promptly
        proc = start(pretrain_cmd("train", str(config)), log)
        try:
            wait_for_step(proc, run_dir, 3)
            run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]  # created at start, server up
            server.kill()
            mark(log, "server killed", t_start)
            killed_at = metric_steps(run_dir)
            wait_for_step(proc, run_dir, killed_at + 8, timeout=60)
            t0 = time.monotonic()
            mark(log, "SIGTERM", t_start)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
            stop_s = time.monotonic() - t0
            mark(log, f"exit {rc} {stop_s:.1f} s after SIGTERM", t_start)
        finally:
            kill_tree(proc)
        assert rc == EXIT_REQUEUE, log.read_text()[-3000:]
        assert stop_s < 30, f"SIGTERM took {stop_s:.1f} s with the tracking server down"
        assert "training goes on" in log.read_text()
        stopped = metric_steps(run_dir)
        assert read_meta(list_committed(run_dir)[-1])["step"] == stopped

        # 2. the server is back (same port, same store): `pretrain report` replays the gap; the rerun goes
        # on live (nothing to replay twice) and stops by signal
        server.start()
        mark(log, "server restarted", t_start)
        assert run(pretrain_cmd("report", str(run_dir), "--config", str(config)), log) == EXIT_OK, log.read_text()[-3000:]
        assert_every_step_once(uri, run_id, run_dir, stopped)
        proc = start(pretrain_cmd("train", str(config)), log)
        try:
            wait_until(lambda: mlflow_last(uri, run_id) >= stopped + 5, "MLflow gets live steps again", proc)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == EXIT_REQUEUE, log.read_text()[-3000:]
        finally:
            kill_tree(proc)
        reached = metric_steps(run_dir)
        assert mlflow_last(uri, run_id) == reached

        # 3. the newest checkpoint is corrupt: the rerun resumes from the one before and re-runs steps
        # MLflow has (bitwise identical, not sent again), then stops by signal
        newest, earlier = list_committed(run_dir)[-1], list_committed(run_dir)[-2]
        earlier_step = read_meta(earlier)["step"]  # retention may remove it once the rerun passes it
        assert earlier_step < reached
        blob = bytearray((newest / MODEL_FILE).read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        (newest / MODEL_FILE).write_bytes(bytes(blob))
        mark(log, f"corrupted {newest.name}, MLflow has {reached}", t_start)
        proc = start(pretrain_cmd("train", str(config)), log)
        try:
            wait_for_step(proc, run_dir, reached + 3)  # metrics.jsonl is cut back to the checkpoint first
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == EXIT_REQUEUE, log.read_text()[-3000:]
        finally:
            kill_tree(proc)
        assert f"resumed from {earlier} at step {earlier_step}" in log.read_text()

        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        assert [r.info.run_id for r in runs] == [run_id], "one run across the outage and every resume"
        assert_every_step_once(uri, run_id, run_dir, metric_steps(run_dir))
        assert client.get_run(run_id).info.status == "KILLED"
        assert_provenance(client.get_run(run_id), run_dir, config)
    finally:
        server.stop()


def assert_provenance(run, run_dir: Path, config: Path) -> None:
    """What the MLflow run says about the code, machine and data that produced it (trainer.provenance),
    after four starts of the training: one dataset input, the tags of the newest start."""
    import socket

    import mlflow
    import numpy
    import torch

    from pipelines.config import dump_yaml, load_config
    from trainer.provenance import git_state

    tags = run.data.tags
    assert tags["mlflow.source.name"] == "pretrain train"
    assert tags["mlflow.source.type"] == ("JOB" if os.environ.get("SLURM_JOB_ID") else "LOCAL")
    assert tags["pretrain.hostname"] == socket.gethostname()
    assert tags["pretrain.version.torch"] == torch.__version__ and tags["pretrain.version.cuda"] == (torch.version.cuda or "none")
    assert tags["pretrain.version.mlflow"] == mlflow.__version__ and tags["pretrain.version.numpy"] == numpy.__version__
    assert tags["pretrain.gpu.count"] == str(torch.cuda.device_count() if torch.cuda.is_available() else 0)
    git = git_state()
    if git:  # the tests run from a checkout: its commit and whether tracked files differ from it
        assert tags["pretrain.git.commit"] == tags["mlflow.source.git.commit"] == git["commit"]
        assert tags["pretrain.git.dirty"] == git["dirty"]
    else:
        assert "pretrain.git.commit" not in tags
    fingerprint = read_meta(list_committed(run_dir)[-1])["data_fingerprint"]
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1, [i.dataset.name for i in inputs]
    dataset = inputs[0].dataset
    assert dataset.digest == fingerprint[:36] and {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "train"
    manifest = json.loads((Path(load_config(config).data.output_dir) / "manifest.json").read_text())
    profile = json.loads(dataset.profile)
    assert profile["fingerprint"] == fingerprint
    assert profile["train_tokens"] == sum(s["tokens"] for s in manifest["shards"] if s["split"] == "train")
    assert profile["val_tokens"] == sum(s["tokens"] for s in manifest["shards"] if s["split"] == "val")
    assert (run_dir / "config.yaml").read_text() == dump_yaml(load_config(config))


def test_unreachable_tracking_uri_at_start_trains_at_once_and_the_run_is_created_when_the_server_appears(tmp_path, data_dir):
    port = free_port()  # nothing listens there yet
    uri = f"http://127.0.0.1:{port}"
    config, run_dir = write_config(tmp_path, data_dir, uri, max_steps=100_000, nproc=1)
    log = tmp_path / "train.log"
    server = MlflowServer(tmp_path, port=port)
    t0 = time.monotonic()
    proc = start(pretrain_cmd("train", str(config)), log)
    try:
        wait_for_step(proc, run_dir, 1, timeout=60)
        first_step_s = time.monotonic() - t0
        assert not (run_dir / "mlflow_run.json").exists()
        server.start()  # the server appears on that address while training goes on
        run_file = run_dir / "mlflow_run.json"
        wait_until(run_file.exists, "the run is created in the background", proc)
        run_id = json.loads(run_file.read_text())["run_id"]
        # the late run id reaches the checkpoints, so a resume continues this run
        wait_until(lambda: committed_run_id(run_dir) == run_id, "a checkpoint with the run id", proc)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        kill_tree(proc)
    text = log.read_text()
    assert rc == EXIT_REQUEUE, text[-3000:]
    assert first_step_s < 45, f"first step after {first_step_s:.0f} s: the start waited for the tracking server"
    assert "training goes on, untracked meanwhile" in text
    assert_every_step_once(uri, run_id, run_dir, metric_steps(run_dir))  # the steps before it existed too
    try:
        # a run dir whose recorded run this server does not have: refused (exit 2), nothing trained
        other, other_dir = write_config(tmp_path / "other", data_dir, uri, max_steps=12, nproc=1)
        other_dir.mkdir(parents=True)
        (other_dir / "mlflow_run.json").write_text(json.dumps({"run_id": "0" * 32, "uri": uri}))
        other_log = tmp_path / "other.log"
        assert run(pretrain_cmd("train", str(other)), other_log) == EXIT_REFUSED, other_log.read_text()[-3000:]
        assert "refused the run" in other_log.read_text() and metric_steps(other_dir) == 0
    finally:
        server.stop()


def test_frozen_server_never_blocks_logging_and_a_full_queue_is_filled_from_metrics_jsonl(tmp_path):
    """In-process: the server stops answering (SIGSTOP), the queue overflows, the server resumes."""
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path)
    uri = server.start()
    run_dir = tmp_path / "run"
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    tracker = MlflowTracker(uri, "frozen", run_dir, None, {"k": 1}, "run", flush_every_s=0.2, queue_size=20)
    frozen = False
    try:
        assert tracker.wait_started(30)

        def step(i: int) -> float:
            record = {"step": i, "loss": 1.0 / i, "lr": 1e-3, "grad_norm": 0.5, "tokens": 64 * i, "tokens_per_s": 10.0 + i,
                      "time": time.time()}
            metrics.append(record)
            t0 = time.perf_counter()
            tracker.log_record(record)
            return time.perf_counter() - t0

        for i in range(1, 11):
            step(i)
        deadline = time.monotonic() + 30
        while mlflow_last(uri, tracker.run_id) < 10:
            assert time.monotonic() < deadline, "the live steps did not reach MLflow"
            time.sleep(0.1)
        os.killpg(server.proc.pid, signal.SIGSTOP)
        frozen = True
        slowest = max(step(i) for i in range(11, 301))
        assert slowest < 0.05, f"log_record blocked for {slowest:.3f} s with the server frozen"
        assert tracker.dropped > 0  # the queue (20 items) overflowed
        os.killpg(server.proc.pid, signal.SIGCONT)
        frozen = False
        assert tracker.finish("FINISHED", timeout=60)
        metrics.close()
        assert_every_step_once(uri, tracker.run_id, run_dir, 300)
        assert MlflowClient(tracking_uri=uri).get_run(tracker.run_id).info.status == "FINISHED"

        # a run dir that never reached MLflow: `pretrain report` creates its run and replays every step
        copy = tmp_path / "never-tracked"
        copy.mkdir()
        shutil.copy(run_dir / "metrics.jsonl", copy / "metrics.jsonl")
        cfg = PipelineConfig(run_dir=str(copy))
        cfg.tracking.uri, cfg.tracking.experiment = uri, "created-by-report"
        lines: list[str] = []
        write_report(copy, cfg, log=lines.append)
        created = json.loads((copy / "mlflow_run.json").read_text())["run_id"]
        assert created != tracker.run_id and any("300 replayed" in line for line in lines), lines
        assert_every_step_once(uri, created, copy, 300)
    finally:
        if frozen:
            os.killpg(server.proc.pid, signal.SIGCONT)
        server.stop()


def _wait_for_text(log: Path, text: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    wait_until(lambda: log.exists() and text in log.read_text(), f"{text!r} in the log", proc, timeout)


def test_a_stop_signal_during_start_up_is_honoured_at_once(tmp_path, data_dir):
    """Start-up waits that are not training (a silent tracking server: up to 15 s; the run lock in a
    requeued job: up to 300 s) must not hold a stop: a prompt exit 3, never a refusal after the wait."""
    import socket

    from tests.test_runlock import hold

    silent = socket.socket()  # accepts connections (the kernel does) and never answers a request
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    config, run_dir = write_config(tmp_path / "silent", data_dir, f"http://127.0.0.1:{silent.getsockname()[1]}", max_steps=1000, nproc=1)
    log = tmp_path / "silent.log"
    proc = start(pretrain_cmd("train", str(config)), log)
    try:
        _wait_for_text(log, "starting a new run", proc)
        time.sleep(1.0)  # the tracker thread is now waiting on the silent server
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        stop_s = time.monotonic() - t0
    finally:
        kill_tree(proc)
        silent.close()
    assert rc == EXIT_REQUEUE, log.read_text()[-3000:]
    # before: the whole 15 s start wait, then the 5 s finish wait
    assert stop_s < 12, f"SIGTERM took {stop_s:.1f} s while the tracking server was silent"
    assert "a stop signal came first; training starts untracked" in log.read_text()

    config, run_dir = write_config(tmp_path / "locked", data_dir, "none", max_steps=1000, nproc=1)
    holder = hold(run_dir, 120)  # another writer of this run dir, as a requeued job meets its previous incarnation
    log = tmp_path / "locked.log"
    proc = start(pretrain_cmd("train", str(config)), log)
    try:
        _wait_for_text(log, "waiting up to", proc)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        kill_tree(proc)
        holder.kill()
        holder.wait()
    text = log.read_text()
    assert rc == EXIT_REQUEUE and "stopped while waiting for train of" in text, text[-3000:]  # before: 2 ("in use") after the wait
    assert metric_steps(run_dir) == 0 and not list_committed(run_dir)
