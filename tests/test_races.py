"""Readers of a run dir that another process is writing: each test performs the other process's
write (training's retention pruning a checkpoint, another Ray head creating the auth token)
exactly inside the reader's window, so the outcome never depends on timing.

Retention un-commits a checkpoint first (its marker goes) and then deletes the files
(``trainer.checkpoint._remove_tree``); a reader that finds no marker must treat the checkpoint
as gone, never as failed, and never bring its directory back.
"""

from __future__ import annotations

import json
import pathlib
import types
from pathlib import Path

import torch

import trainer.checkpoint as checkpoint
from trainer.checkpoint import MARKER, list_committed, list_partial, write_checkpoint

MAX_STEPS = 1000


def make_run(run_dir: Path, steps: list[int]) -> Path:
    """Committed checkpoints (the real writer, tiny tensors) of a run still training."""
    for s in steps:
        meta = {"step": s, "config": {"train": {"max_steps": MAX_STEPS}, "eval": {}}, "model": {}}
        write_checkpoint(run_dir, s, {"w": torch.zeros(2)}, {"o": torch.zeros(1)}, {"step": s}, meta)
    return run_dir


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def test_a_checkpoint_pruned_while_its_eval_job_runs_is_skipped_not_failed(tmp_path):
    """The job finds no marker and refuses; the directory is still there when the watcher collects.
    With eval.max_retries=0 that used to fail the checkpoint for good (watcher exit 1)."""
    from evals.config import EvalConfig
    from evals.watch import Watcher

    run = make_run(tmp_path / "run", [100])
    victim = ckpt(run, 100)

    class PrunedOnSubmit(Watcher):
        def _submit(self, c: Path) -> None:
            (c / MARKER).unlink()  # retention has begun on it: un-committed, files not yet deleted
            super()._submit(c)

    cfg = EvalConfig(device="cpu", tracking_uri="none", max_retries=0, max_parallel=1)
    messages: list[str] = []
    w = PrunedOnSubmit(run, cfg, executor="local", log=messages.append)
    assert w.run(once=True, tick_s=0.2) == 0, messages
    assert w.entries[victim.name].status == "skipped", messages


def test_status_of_a_run_whose_checkpoint_is_pruned_while_it_reads(tmp_path, monkeypatch):
    from pipelines.status import status_data

    run = make_run(tmp_path / "run", [100, 200, 300])
    real = checkpoint.list_committed

    def listing_then_pruned(run_dir):
        found = real(run_dir)
        checkpoint._remove_tree(ckpt(Path(run_dir), 100))  # keep_last prunes step 100 right after the listing
        return found

    monkeypatch.setattr(checkpoint, "list_committed", listing_then_pruned)
    data = status_data(run)
    assert [c["step"] for c in data["checkpoints"]] == [200, 300]


def test_an_eval_result_never_brings_a_pruned_checkpoint_back(tmp_path, monkeypatch):
    from evals.results import archive_path, save_result

    run = make_run(tmp_path / "run", [100, 200])
    victim = ckpt(run, 100)
    real_mkdir = pathlib.Path.mkdir
    pruned: list[Path] = []

    def mkdir_then_pruned(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if self == victim / "evals" and not pruned:
            checkpoint._remove_tree(victim)  # retention prunes it just after the results dir was made
            pruned.append(victim)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir_then_pruned)
    logged: list[str] = []
    save_result(victim, {"task": "hellaswag", "step": 100, "metrics": {"acc": 0.3}}, log=logged.append)
    monkeypatch.undo()
    assert not victim.exists(), "a markerless step dir: the next training start deletes it as a partial checkpoint"
    assert list_partial(run) == [] and [c.name for c in list_committed(run)] == ["step_00000200"]
    assert json.loads(archive_path(run, 100, "hellaswag").read_text())["metrics"] == {"acc": 0.3}, "the result is kept"
    assert "deleted meanwhile" in " ".join(logged)


def test_restart_from_eval_archives_what_is_left_when_training_prunes_meanwhile(tmp_path):
    """`pretrain run --restart-from eval` while a SLURM training job still runs and prunes."""
    from pipelines.config import load_config
    from pipelines.workflow import Workflow

    run = make_run(tmp_path / "run", [100, 200, 300])
    for s in (100, 200, 300):
        (ckpt(run, s) / "evals").mkdir()
        (ckpt(run, s) / "evals" / "hellaswag.json").write_text("{}")
    (run / "evals").mkdir()
    (run / "evals" / "watch.json").write_text("{}")
    config = tmp_path / "c.yaml"
    config.write_text(f"run_dir: {run}\ntracking: {{uri: none}}\n")
    w = Workflow(str(config), [], load_config(config), log=lambda m: None)
    archive = w._archive

    def pruned_then_archive(items, renamed=None):
        checkpoint._remove_tree(ckpt(run, 200))  # between the listing of step_*/evals and the moves
        return archive(items, renamed)

    w._archive = pruned_then_archive
    w._reset("eval")
    (moved,) = (run / "archive").iterdir()
    assert sorted(p.parent.name for p in (moved / "checkpoint_evals").glob("*/hellaswag.json")) == ["step_00000100", "step_00000300"]
    assert (moved / "evals" / "watch.json").is_file() and not (run / "evals").exists()
    assert w.stages["eval"].status != "done"


def test_another_head_never_sees_a_half_written_ray_token(tmp_path, monkeypatch):
    """Two SLURM jobs' Ray heads may create ~/.ray/auth_token at once; one that finds the file
    empty (created, not yet written) would start with a token of its own."""
    import secrets

    import slurm.ray_cluster as ray_cluster

    path = tmp_path / "ray" / "auth_token"
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    seen: list[str | None] = []

    def token_hex(n: int) -> str:  # every point where our writer makes something: what would another head see?
        seen.append(path.read_text() if path.exists() else None)
        return secrets.token_hex(n)

    monkeypatch.setattr(ray_cluster, "secrets", types.SimpleNamespace(token_hex=token_hex))
    ray_cluster.ensure_auth_token()
    assert all(s is None or s.strip() for s in seen), f"another head saw an empty token file: {seen}"
    assert len(path.read_text().strip()) == 64 and oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in path.parent.iterdir()] == ["auth_token"], "no temp file left behind"


def test_a_torn_line_in_the_job_record_loses_only_itself(tmp_path):
    """A submitter killed while appending to RUN_DIR/slurm/jobs.jsonl leaves half a line: `pretrain
    status` and `pretrain jobs` still list every whole record, and the next one recorded is kept."""
    from pipelines.launching import list_jobs
    from slurm.submit import JOBS_FILE, record_job

    run = tmp_path / "run"
    slurm = run / "slurm"
    record_job(slurm, {"job_id": "11", "name": "a", "cluster": "local", "stdout": "", "stderr": ""})
    with open(slurm / JOBS_FILE, "a") as f:
        f.write('{"cluster": "local", "job_id": "1')  # the kill
    record_job(slurm, {"job_id": "12", "name": "b", "cluster": "local", "stdout": "", "stderr": ""})
    assert [(j["job_id"], j["state"]) for j in list_jobs(run)] == [("11", "local"), ("12", "local")]
