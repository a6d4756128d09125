"""What a user sees in MLflow after resumes with changes, reports with overrides and evals run again.

Real MLflow (local sqlite stores, no server needed), the real `pretrain eval` CLI on a tiny trained
checkpoint; each test pins a defect found by an audit of the tracking path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.evals_helpers import hellaswag_rows, run_cli, train_tiny_run, write_jsonl


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _open(uri: str, run_dir: Path, params: dict) -> str:
    from trainer.tracking_mlflow import MlflowRun

    session = MlflowRun(uri, run_dir, log=lambda _: None)
    session.open(None, "audit", params, run_name=run_dir.name)
    return session.run_id


def test_resumed_with_tag_follows_the_latest_start_back_to_the_original_value(tmp_path):
    """`--allow-changes train.lr=0.001`, then a resume with the original 0.003: the tag said 0.001
    for the rest of the run although every later step trained with 0.003."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    run_id = _open(uri, run_dir, {"train.lr": 0.003, "train.seed": 1})
    tags = lambda: {k: v for k, v in _client(uri).get_run(run_id).data.tags.items() if k.startswith("resumed_with.")}  # noqa: E731
    assert tags() == {}
    _open(uri, run_dir, {"train.lr": 0.003, "train.seed": 1})
    assert tags() == {}  # a resume without changes adds no tag
    _open(uri, run_dir, {"train.lr": 0.001, "train.seed": 1})
    assert tags() == {"resumed_with.train.lr": "0.001"}
    _open(uri, run_dir, {"train.lr": 0.003, "train.seed": 1})
    assert tags() == {"resumed_with.train.lr": "0.003"}  # before: still "0.001"
    params = _client(uri).get_run(run_id).data.params
    assert params == {"train.lr": "0.003", "train.seed": "1"}  # the first start's params, never changed


def test_report_overrides_are_not_recorded_as_a_resume_of_the_training_run(tmp_path):
    """`pretrain report RUN_DIR train.val_every=5` changes what the report reads, not the training:
    it set `resumed_with.train.val_every` on the training's run."""
    from pipelines.config import PipelineConfig, flatten, to_dict
    from pipelines.report import write_report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    cfg = PipelineConfig(run_dir=str(run_dir))
    cfg.tracking.uri = uri
    run_id = _open(uri, run_dir, flatten(to_dict(cfg)))
    before = _client(uri).get_run(run_id).data
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "tokens": 64 * s, "time": 1000.0 + s}) + "\n" for s in (1, 2, 3)))
    cfg.train.val_every = cfg.train.val_every + 5  # a report override
    lines: list[str] = []
    write_report(run_dir, cfg, log=lines.append)
    after = _client(uri).get_run(run_id).data
    assert any("3 replayed" in line for line in lines), lines
    assert not [k for k in after.tags if k.startswith("resumed_with.")], after.tags  # before: resumed_with.train.val_every
    assert after.params == before.params


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """A 4-step micro training without tracking (checkpoints at 2 and 4) and its HellaSwag rows."""
    work = tmp_path_factory.mktemp("audit-run")
    hellaswag = write_jsonl(work / "hellaswag.jsonl", hellaswag_rows(16))
    run_dir, _ = train_tiny_run(work, hellaswag, uri="none")
    return run_dir, work


def test_an_eval_before_the_training_has_an_mlflow_run_is_logged_once_the_run_exists(tiny_run):
    """A tracked training whose server was unreachable so far has no run yet (`pretrain report` or the
    trainer creates it later). Its checkpoints' results were marked logged "disabled", exit 0, and
    never reached the run once it existed: `pretrain eval` then said "already evaluated and logged"."""
    run_dir, work = tiny_run
    ckpt = run_dir / "checkpoints" / "step_00000002"
    uri = f"sqlite:///{work / 'late.db'}"  # tracking on (as eval.tracking_uri), no run recorded yet
    log = work / "eval-late.log"
    rc, out = run_cli("eval", str(ckpt), f"eval.tracking_uri={uri}", log=log)
    result = json.loads((ckpt / "evals" / "hellaswag.json").read_text())
    assert rc == 1 and result["logged"] is False, out[-3000:]  # before: 0 and "disabled"
    assert "no MLflow run yet" in out

    run_id = _client(uri).create_run(_client(uri).create_experiment("late")).info.run_id
    (run_dir / "mlflow_run.json").write_text(json.dumps({"run_id": run_id, "uri": uri}))
    try:
        rc, out = run_cli("eval", str(ckpt), f"eval.tracking_uri={uri}", log=log)
        assert rc == 0, out[-3000:]
        assert json.loads((ckpt / "evals" / "hellaswag.json").read_text())["logged"] is True
        history = _client(uri).get_metric_history(run_id, "eval/hellaswag/acc_norm")
        assert [(m.step, m.value) for m in history] == [(2, result["metrics"]["acc_norm"])]
    finally:
        (run_dir / "mlflow_run.json").unlink()


def test_a_checkpoint_evaluated_again_adds_no_second_point_at_its_step(tiny_run):
    """A damaged result file (or `pretrain run --restart-from eval`) makes the checkpoint be evaluated
    again: the same value, with the new result's time, became a second point at the same step."""
    from evals.results import log_to_mlflow

    run_dir, work = tiny_run
    ckpt = run_dir / "checkpoints" / "step_00000004"
    uri = f"sqlite:///{work / 'again.db'}"
    log = work / "eval-again.log"
    run_id = _client(uri).create_run(_client(uri).create_experiment("again")).info.run_id
    (run_dir / "mlflow_run.json").write_text(json.dumps({"run_id": run_id, "uri": uri}))
    try:
        for _ in range(3):
            rc, out = run_cli("eval", str(ckpt), f"eval.tracking_uri={uri}", log=log)
            assert rc == 0, out[-3000:]
            (ckpt / "evals" / "hellaswag.json").write_text("{torn")  # damaged again: evaluated again
    finally:
        (run_dir / "mlflow_run.json").unlink()
    for key in ("eval/hellaswag/acc", "eval/hellaswag/acc_norm"):
        history = _client(uri).get_metric_history(run_id, key)
        assert [m.step for m in history] == [4], f"{key}: {[(m.step, m.value, m.timestamp) for m in history]}"

    # a different value at that step (a result under other settings) is still logged
    log_to_mlflow(uri, run_id, 4, {"eval/hellaswag/acc": history[0].value + 0.5}, when=time.time())
    assert len(_client(uri).get_metric_history(run_id, "eval/hellaswag/acc")) == 2


@pytest.mark.parametrize("max_steps, status", [(3, "FINISHED"), (10, "KILLED")])
def test_report_ends_a_run_that_no_training_holds_any_more(tmp_path, max_steps, status):
    """A training killed (SIGKILL, OOM) or whose final status was lost in an outage leaves its run
    RUNNING, and so did a run `pretrain report` created for a training that never reached MLflow: the
    report replayed every step yet the UI showed the run running forever."""
    from pipelines.config import PipelineConfig, flatten, to_dict
    from pipelines.report import write_report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    cfg = PipelineConfig(run_dir=str(run_dir))
    cfg.tracking.uri, cfg.train.max_steps = uri, max_steps
    run_id = _open(uri, run_dir, flatten(to_dict(cfg)))
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "tokens": 64 * s, "time": 1000.0 + s}) + "\n" for s in (1, 2, 3)))
    assert _client(uri).get_run(run_id).info.status == "RUNNING"
    write_report(run_dir, cfg, log=lambda _: None)
    assert _client(uri).get_run(run_id).info.status == status  # before: RUNNING

    # a live training holds the run dir: its run is left alone
    from trainer.runlock import RunLock

    _client(uri).update_run(run_id, status="RUNNING")
    lock = RunLock(run_dir, "train", wait_s=0).acquire()
    try:
        write_report(run_dir, cfg, log=lambda _: None)
    finally:
        lock.release()
    assert _client(uri).get_run(run_id).info.status == "RUNNING"


def test_steps_trained_again_with_changes_reach_mlflow(tmp_path):
    """A resume from an earlier checkpoint with `--allow-changes train.lr=...` (the usual recovery
    from a loss spike): the re-run steps trained with the new rate, but MLflow kept the first run's
    values for them, so the change seemed to start later than it did. Now they are sent again: the
    newest point at every step equals metrics.jsonl, and the run's tag says which steps were redone.
    An exact resume (no changes) still sends nothing twice."""
    import shutil

    from trainer.metrics import read_metrics

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    hellaswag = write_jsonl(tmp_path / "hellaswag.jsonl", hellaswag_rows(4))
    run_dir, config = train_tiny_run(tmp_path, hellaswag, uri=uri)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    client = _client(uri)
    steps = lambda: sorted(m.step for m in client.get_metric_history(run_id, "lr"))  # noqa: E731

    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")  # back to step 2: steps 3-4 run again
    rc, out = run_cli("train", str(config), log=tmp_path / "exact.log")
    assert rc == 0, out[-3000:]
    assert steps() == [1, 2, 3, 4]  # exact: the same values, not sent again
    assert "pretrain.rewound" not in client.get_run(run_id).data.tags

    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    rc, out = run_cli("train", str(config), "--allow-changes", "train.lr=0.001", log=tmp_path / "changed.log")
    assert rc == 0, out[-3000:]

    def newest(key: str) -> dict[int, float]:
        points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        return {m.step: m.value for m in points}  # the later point of a step wins

    record = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}
    assert newest("lr") == {s: r["lr"] for s, r in record.items()}  # before: steps 3-4 showed the old rate
    assert newest("loss") == {s: r["loss"] for s, r in record.items()}
    assert "steps 3-4 trained again from step 2" in client.get_run(run_id).data.tags["pretrain.rewound"]
    assert steps() == [1, 2, 3, 3, 4, 4]  # MLflow keeps both values of a re-run step
