"""Damaged or hand-edited input files: a clear refusal (exit 2, naming the file) or, for the
read-only commands (`status`, `report`, `jobs`), an overview of what can still be read, and never
a traceback or a run dir that no rerun can resume.

Each file is built here, a few bytes at a time, in the shape an audit found it: non-UTF-8 bytes in
a config or metrics.jsonl, JSON of the wrong shape in workflow.json, a checkpoint's meta.json, an
eval result, jobs.jsonl or watch.json, and HellaSwag data that is empty or malformed. Everything
runs in-process (``pipelines.cli.main``); no training, eval job or scheduler is started.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.strict import ConfigError, read_yaml_mapping
from evals.data import BadEvalData, read_hellaswag_file
from evals.results import format_scores, read_result
from pipelines.cli import main
from pipelines.report import collect
from trainer.metrics import MetricsLog, read_metrics
from trainer.provenance import write_run_config

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
GOOD_RESULT = {"task": "hellaswag", "step": 4, "metrics": {"acc": 0.25, "acc_norm": 0.3}, "stderr": {"acc": 0.1}, "n": 20}
ROW = {"ctx": "A man", "ctx_a": "A man", "ctx_b": "", "activity_label": "x", "endings": ["a", "b", "c", "d"], "label": 0}


def run_dir_with_metrics(tmp_path: Path, *extra: bytes) -> Path:
    """A run dir whose metrics.jsonl has steps 1 and 2, then the ``extra`` raw lines."""
    run = tmp_path / "run"
    run.mkdir()
    good = [json.dumps({"step": s, "loss": 5.0, "tokens": 64 * s, "time": 1000.0 + s}).encode() for s in (1, 2)]
    (run / "metrics.jsonl").write_bytes(b"\n".join([*good, *extra]) + b"\n")
    return run


def committed_checkpoint(run: Path, step: int, meta: bytes) -> Path:
    """A checkpoint directory as `status` lists it: the commit marker and a meta.json."""
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "COMMITTED.json").write_text(json.dumps({"files": {}}))
    (ckpt / "meta.json").write_bytes(meta)
    return ckpt


# ------------------------------------------------------------------ A: config files


@pytest.mark.parametrize("content", [b"run_dir: runs/\xff\xfe\n", "run_dir: runs/x\n".encode("utf-16")], ids=["stray-bytes", "utf-16"])
def test_a_config_that_is_not_utf8_is_refused_with_exit_2_naming_the_file(tmp_path, capsys, content):
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    assert main(["config", "show", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "UTF-8" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="bad.yaml: not UTF-8"):
        read_yaml_mapping(config)


# ------------------------------------------------------------------ B: metrics.jsonl, RUN_DIR/config.yaml


def test_b_metrics_lines_that_are_not_utf8_or_lack_an_int_step_are_left_out_like_torn_ones(tmp_path):
    run = run_dir_with_metrics(tmp_path, b'{"step": 9, "x": "\xff', b'{"step": null}', b'{"step": "3"}', b"[1]", b'{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]


def test_b_resume_truncation_survives_a_line_that_is_not_utf8(tmp_path):
    """What `pretrain train` does on every resume: before the fix it raised, so no rerun could resume."""
    run = run_dir_with_metrics(tmp_path, b'{"step": 9, "x": "\xff', json.dumps({"step": 3, "loss": 1.0}).encode())
    assert MetricsLog(run / "metrics.jsonl").truncate_after(2) == 2  # the undecodable line and step 3
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]


def test_b_status_and_report_survive_undecodable_lines_a_null_step_and_a_text_time(tmp_path, capsys):
    run = run_dir_with_metrics(tmp_path, b'{"step": 9, "x": "\xff', b'{"step": null}',
                               json.dumps({"step": 3, "loss": 4.0, "tokens": 192, "time": "x"}).encode())
    assert main(["status", str(run)]) == 0
    assert "training  step 3," in capsys.readouterr().out
    assert main(["status", "--json", str(run)]) == 0
    training = json.loads(capsys.readouterr().out)["training"]
    assert training["step"] == 3 and training["last_step_time"] is None and training["last_step_age_s"] is None
    assert [r["step"] for r in collect(run)] == [1, 2, 3]
    assert main(["report", str(run)]) == 0 and (run / "report.png").is_file()


def test_b_a_previous_run_config_that_is_not_utf8_is_kept_not_fatal(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    old = b"train:\n  lr: \xff\xfe\n"
    (run / "config.yaml").write_bytes(old)
    write_run_config(run, "train:\n  lr: 0.1\n")
    assert (run / "config.yaml").read_text() == "train:\n  lr: 0.1\n"
    assert (run / "config.prev.yaml").read_bytes() == old  # nothing already written is lost


# ------------------------------------------------------------------ C: workflow.json, meta.json


@pytest.mark.parametrize("content", [b'{"executor": "loc', b"[1,2]", b'{"executor": "local", "stages": null}', b"\xff\xfe{"],
                         ids=["truncated", "list", "stages-null", "not-utf8"])
def test_c_status_shows_an_unreadable_workflow_json_as_such(tmp_path, capsys, content):
    run = run_dir_with_metrics(tmp_path)
    (run / "workflow.json").write_bytes(content)
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "workflow.json" in out and "unreadable" in out and "training  step 2" in out
    assert main(["status", "--json", str(run)]) == 0
    assert "unreadable" in json.loads(capsys.readouterr().out)["workflow"]["error"]


def test_c_status_shows_wrongly_typed_stage_fields_as_unknown(tmp_path, capsys):
    run = run_dir_with_metrics(tmp_path)
    stages = {"data": [1], "train": {"status": 5, "attempts": "x", "job_ids": [1], "started": "y", "ended": None}}
    (run / "workflow.json").write_text(json.dumps({"executor": "local", "overrides": [3], "stages": stages}))
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "  data    ?" in out and "  train   ?" in out


@pytest.mark.parametrize("meta", [b"[1]", b'{"step": null}', b'{"step": 4, "conf'], ids=["list", "step-null", "truncated"])
def test_c_status_shows_a_checkpoint_with_an_unreadable_meta_json_as_step_unknown(tmp_path, capsys, meta):
    run = run_dir_with_metrics(tmp_path)
    committed_checkpoint(run, 4, meta)
    assert main(["status", str(run)]) == 0
    assert "step_00000004 (step ?)" in capsys.readouterr().out


# ------------------------------------------------------------------ D: eval results

BAD_RESULTS = {
    "list": [1],
    "step-null": {**GOOD_RESULT, "step": None},
    "metrics-list": {**GOOD_RESULT, "metrics": [1]},
    "metric-text": {**GOOD_RESULT, "metrics": {"acc": "abc"}},
    "metric-null": {**GOOD_RESULT, "metrics": {"acc": None}},
    "stderr-text": {**GOOD_RESULT, "stderr": "x"},
}


@pytest.mark.parametrize("name", list(BAD_RESULTS))
def test_d_a_result_of_the_wrong_shape_reads_as_absent_in_status_report_and_the_eval_job(tmp_path, capsys, name):
    run = run_dir_with_metrics(tmp_path)
    ckpt = committed_checkpoint(run, 4, json.dumps({"step": 4}).encode())
    for d in (run / "evals" / "step_00000004", ckpt / "evals"):
        d.mkdir(parents=True)
        (d / "hellaswag.json").write_text(json.dumps(BAD_RESULTS[name]))
    assert read_result(ckpt, "hellaswag") is None  # the eval job evaluates it again instead of crashing on it
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "step_00000004 (step 4)  not evaluated yet" in out and "evals     latest" not in out
    assert not [k for row in collect(run) for k in row if k.startswith("eval/")]


def test_d_report_draws_the_good_results_beside_malformed_ones(tmp_path):
    run = run_dir_with_metrics(tmp_path)
    for i, bad in enumerate(BAD_RESULTS.values(), 1):
        d = run / "evals" / f"step_{i:08d}"
        d.mkdir(parents=True)
        (d / "hellaswag.json").write_text(json.dumps(bad))
    (run / "evals" / "step_00000002" / "lm_eval").mkdir()
    (run / "evals" / "step_00000002" / "lm_eval" / "piqa.json").write_text(json.dumps({**GOOD_RESULT, "task": "lm_eval/piqa", "step": 2}))
    assert main(["report", str(run)]) == 0
    assert {k for row in collect(run) for k in row if k.startswith("eval/")} == {
        "eval/lm_eval/piqa/acc", "eval/lm_eval/piqa/acc_norm", "eval/lm_eval/piqa/acc_stderr"}


def test_d_format_scores_shows_only_numbers_and_never_raises():
    assert format_scores({"task": "t", "metrics": [1], "stderr": "x"}) == "t: "
    assert format_scores({"task": "t", "metrics": {"acc": 0.5, "bad": "abc"}, "stderr": "x", "n": 3}) == "t: acc 0.5000 (n=3)"


# ------------------------------------------------------------------ E: jobs.jsonl


def test_e_jobs_leaves_out_a_record_with_a_wrongly_typed_field(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    lines = [{"job_id": "12", "cluster": None}, {"job_id": "13", "cluster": 5}, {"job_id": "14", "cluster": "local", "stdout": 5},
             {"job_id": "15", "name": "ok", "cluster": "local", "stdout": "out.log", "stderr": "err.log"}]
    (run / "slurm" / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["jobs", str(run)]) == 0
    out = capsys.readouterr().out
    assert "15" in out and "out.log" in out and not any(f"{j}  " in out for j in ("12", "13", "14"))
    assert main(["status", str(run)]) == 0
    assert "slurm jobs" in capsys.readouterr().out


# ------------------------------------------------------------------ F: watch.json


@pytest.mark.parametrize("entry", [{"attempts": "abc"}, {"errors": None}, {"step": "x"}, {"ckpt_id": None}, {"refused": "no"}],
                         ids=["attempts-text", "errors-null", "step-text", "ckpt-id-null", "refused-text"])
def test_f_a_watcher_state_entry_of_the_wrong_types_is_refused_naming_the_file(tmp_path, capsys, entry):
    run = tmp_path / "run"
    (run / "evals").mkdir(parents=True)
    good = {"step": 4, "ckpt_id": "abc", "status": "failed", "attempts": 1, "errors": ["boom"], "updated": 1.0, "refused": False}
    (run / "evals" / "watch.json").write_text(json.dumps({"checkpoints": {"step_00000004": {**good, **entry}}}))
    assert main(["evals", "watch", str(run), "--once", "--config", SMOKE]) == 2
    err = capsys.readouterr().err
    assert str(run / "evals" / "watch.json") in err and "unreadable watcher state" in err and "Traceback" not in err


# ------------------------------------------------------------------ G: HellaSwag data


def test_g_an_empty_hellaswag_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "hs.jsonl"
    path.write_text("\n")
    with pytest.raises(BadEvalData, match=f"{path}: no HellaSwag rows"):
        read_hellaswag_file(path)


def test_g_endings_that_are_a_string_are_refused_naming_file_and_line(tmp_path):
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + json.dumps({**ROW, "endings": "bcde"}) + "\n")
    with pytest.raises(BadEvalData, match=f"{path}:2: .*endings must be a list"):
        read_hellaswag_file(path)
    path.write_text(json.dumps(ROW) + "\n")
    assert read_hellaswag_file(path)[0]["endings"] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("name", ["hs.jsonl", "plain_dir"])
def test_g_a_hellaswag_path_that_is_a_directory_is_refused_like_a_missing_one(tmp_path, name):
    path = tmp_path / name
    path.mkdir()
    with pytest.raises(BadEvalData, match=str(path)):
        read_hellaswag_file(path)


@pytest.mark.parametrize("content", [b'{"run_id": "ab', b"[1, 2]", b'{"run_id": 5, "uri": "x"}', b'{"run_id": "ab", "sqlite": 5}', b"\xff\xfe"])
def test_h_a_damaged_mlflow_run_file_reads_as_no_run_in_status(tmp_path, capsys, content):
    """RUN_DIR/mlflow_run.json is written atomically, so only outside damage tears it: status shows
    the run without its MLflow line rather than a traceback (report and the workflow's last lines
    read it the same way)."""
    from trainer.tracking_mlflow import read_run_file

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0, "time": 1.0}) + "\n")
    (run / "mlflow_run.json").write_bytes(content)
    assert read_run_file(run) is None
    assert main(["status", str(run)]) == 0
    assert "Traceback" not in capsys.readouterr().err
