"""User mistakes with the read-side commands (`status`, `report`, `export hf`): each is refused
with exit 2 and a message naming the path, never a traceback, a misleading "no steps yet", or a
file written where it does not belong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pipelines.cli import main


def _fake_checkpoint(run: Path, step: int = 4) -> Path:
    """What `status` and `report` see of a checkpoint: its commit marker, meta.json and evals/."""
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    (ckpt / "evals").mkdir(parents=True)
    (ckpt / "COMMITTED.json").write_text(json.dumps({"files": {}}))
    (ckpt / "meta.json").write_text(json.dumps({"step": step}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": step, "loss": 5.0, "tokens": 64 * step, "time": 1000.0}) + "\n")
    return ckpt


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["report"]])
def test_a_directory_that_is_no_run_dir_is_refused_and_nothing_is_written(tmp_path, capsys, command):
    # `pretrain status CKPT` printed "training  no steps yet / checkpoints (0 committed)" with exit 0,
    # and `pretrain report CKPT` wrote report.png and report.csv into the committed checkpoint
    ckpt = _fake_checkpoint(tmp_path / "run")
    before = sorted(p.name for p in ckpt.iterdir())
    assert main([*command, str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "is a checkpoint, not a run directory" in err and str(tmp_path / "run") in err and "Traceback" not in err
    assert sorted(p.name for p in ckpt.iterdir()) == before

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*command, str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"{empty}: not a run directory" in err and "metrics.jsonl" in err
    assert list(empty.iterdir()) == []

    # the run dir itself is still read
    assert main([*command, str(tmp_path / "run")]) == 0


def test_report_with_tracking_none_logs_nothing_to_the_recorded_mlflow_run(tmp_path, capsys, monkeypatch):
    # README: "Overrides apply on top of the run's recorded config (`tracking.uri=none` for a copied
    # run dir)"; the run file's store won over the override, so a copy's report went into the original's run
    import trainer.tracking_mlflow as tracking_mlflow

    opened: list[str] = []
    monkeypatch.setattr(tracking_mlflow, "MlflowRun", lambda uri, *a, **k: opened.append(uri) or pytest.fail("opened MLflow"))
    run = tmp_path / "copy"
    _fake_checkpoint(run)
    db = tmp_path / "original" / "mlflow.db"
    (run / "mlflow_run.json").write_text(json.dumps({"run_id": "abc", "uri": f"sqlite:///{db}"}))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(run), "model": {"name": "micro"}, "train": {"seq_len": 64}}))
    (run / "workflow.json").write_text(json.dumps({"config_path": str(config), "overrides": []}))
    assert main(["report", str(run), "tracking.uri=none"]) == 0
    out = capsys.readouterr().out
    assert opened == [] and (run / "report.png").is_file()
    assert "tracking.uri=none" in out and "not logged to a tracking store" in out


def _tiny_checkpoint(run: Path, ranks: str) -> Path:
    from trainer.checkpoint import write_checkpoint
    from trainer.model import GPT, GPTConfig

    cfg = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8)
    torch.manual_seed(0)
    meta = {"step": 2, "model": {**cfg.__dict__}, "config": {"data": {"tokenizer_file": ranks}}, "tokens_seen": 16,
            "data_fingerprint": "test"}
    return write_checkpoint(run, 2, GPT(cfg).state_dict(), {"state": {}}, {"step": 2}, meta)


def test_export_into_a_directory_it_cannot_write_is_refused_without_a_traceback(tmp_path, capsys, monkeypatch, gpt2_ranks):
    # the temporary dir next to OUT_DIR was created outside the error handling: a parent you may not
    # write to (a shared models dir, a read-only mount) gave a PermissionError traceback and exit 1
    pytest.importorskip("transformers")
    ckpt = _tiny_checkpoint(tmp_path / "run", gpt2_ranks)
    parent = tmp_path / "readonly"
    parent.mkdir()
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.parent == parent:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main(["export", "hf", str(ckpt), str(parent / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{parent / 'out'}: cannot create" in err and "Permission denied" in err
    assert list(parent.iterdir()) == []


def test_a_run_dir_given_to_eval_and_a_checkpoint_given_to_the_watcher_are_refused_saying_what_to_pass(tmp_path, capsys):
    """`pretrain eval RUN_DIR` only said "not a committed checkpoint"; `evals watch CKPT` advised
    --config for "a run that has not checkpointed yet". Both now name the path to pass instead."""
    run = tmp_path / "run"
    ckpt = _fake_checkpoint(run)
    assert main(["eval", str(run)]) == 2
    assert f"{run} is a run directory: its newest checkpoint is {ckpt}" in capsys.readouterr().err
    assert main(["evals", "watch", str(ckpt), "--once"]) == 2
    err = capsys.readouterr().err
    assert "is a checkpoint, not a run directory" in err and f"({run})" in err and "--config" not in err


def test_optional_overrides_are_not_listed_as_required(capsys):
    with pytest.raises(SystemExit) as e:
        main(["config", "show"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "required: config\n" in err, err
