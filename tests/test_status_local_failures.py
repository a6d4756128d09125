"""`pretrain status` of a local run (`pretrain run`, the README's default) that failed or was refused
says why, as it does for a SLURM job (``slurm_jobs``): per stage the meaning (refused / failed /
stopped), `pretrain run`'s exit code, the line that says why and the log that holds it.

Before, a refused training showed only "failed ... WorkflowError: pretrain train exited with 2"
(the reason, e.g. a checkpoint of another model shape, was on the terminal only) and a refused
eval "evals refused for step_... (see RUN_DIR/evals)", with neither the error nor the job's log.

Real runs: torchrun with gloo, the eval watcher's local submitit jobs. The data stage is recorded
done over a shard directory written directly (what a finished data stage leaves), so no Ray starts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.evals_helpers import hellaswag_rows, write_jsonl
from tests.trainer_helpers import REPO, kill_tree, make_shard_dir, micro_config, pretrain_cmd, rank_pids, start, wait_for_step

pytestmark = pytest.mark.slow


def pretrain(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def local_run(tmp_path: Path, name: str, hellaswag: Path) -> tuple[Path, Path]:
    """(config, run dir) of a 2-step micro training with one checkpoint to evaluate; its data stage
    recorded done in workflow.json over ``tmp_path/data``, as a finished data stage records it."""
    from dataprep.shards import TokenDataset
    from pipelines.config import load_config
    from pipelines.stages import stage
    from pipelines.workflow import STATE_FORMAT, fingerprint

    data = tmp_path / "data"
    if not data.exists():
        make_shard_dir(data)
    run_dir = tmp_path / name
    text = micro_config(run_dir, data, train={"max_steps": 2, "ckpt_every": 0, "warmup_steps": 1},
                        extra={"eval": {"hellaswag_path": str(hellaswag), "data_source": "local", "batch_size": 8, "device": "cpu",
                                        "max_parallel": 1, "max_retries": 0}})
    cfg_path = tmp_path / f"{name}.yaml"
    cfg_path.write_text(text)
    values = stage("data").depends_on(load_config(str(cfg_path), []))
    data_done = {"status": "done", "fingerprint": fingerprint(values), "config": values, "attempts": 1,
                 "outputs": {"output_dir": str(data.resolve()), "manifest_fingerprint": TokenDataset(data).fingerprint}}
    run_dir.mkdir()
    (run_dir / "workflow.json").write_text(json.dumps({"format": STATE_FORMAT, "config_path": str(cfg_path), "overrides": [],
                                                       "executor": "local", "stages": {"data": data_done}}))
    return cfg_path, run_dir


def shown(run_dir: Path, stage: str, capsys) -> tuple[str, dict]:
    """(the stage's lines of `pretrain status`, its entry of `pretrain status --json`), in this process."""
    from pipelines.cli import main

    assert main(["status", str(run_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"  {stage:<7} "))
    assert main(["status", "--json", str(run_dir)]) == 0
    return "\n".join(lines[at:at + 2]), json.loads(capsys.readouterr().out)["workflow"]["stages"][stage]


def test_status_says_why_a_local_eval_and_a_local_training_were_refused(tmp_path, capsys):
    bad = tmp_path / "hellaswag.jsonl"
    write_jsonl(bad, hellaswag_rows(3, seed=1))
    with bad.open("a") as f:
        f.write('{"ind": 3, "ctx": "torn\n')  # line 4 is no JSON: the eval job refuses its data

    # 1. training finishes, the eval of its checkpoint is refused (exit 2) by the eval job
    cfg, run_dir = local_run(tmp_path, "evalrefused", bad)
    t0 = time.time()
    r = pretrain("run", str(cfg))
    print(f"eval refused after {time.time() - t0:.1f} s")
    assert r.returncode == 2 and "stage 'eval' refused" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    text, st = shown(run_dir, "eval", capsys)
    assert (st["status"], st["meaning"], st["exit_code"]) == ("failed", "refused", 2), st
    assert f"{bad}:4: not JSON" in st["error"], st  # the job's own error, not "evals refused for ..."
    log = Path(st["log"])  # the eval job's stderr, which holds the error with its traceback
    assert log.parent == run_dir / "evals" / "jobs" and f"{bad}:4: not JSON" in log.read_text(), st
    assert f"refused; exit code 2; {st['error']}  (log: {log})" in text, text

    # 2. a run dir holding that checkpoint (2 layers) trains a 3-layer model: training refused (exit 2)
    cfg2, run_dir2 = local_run(tmp_path, "trainrefused", bad)
    shutil.copytree(run_dir / "checkpoints", run_dir2 / "checkpoints")
    t0 = time.time()
    r = pretrain("run", str(cfg2), "model.n_layer=3")
    print(f"training refused after {time.time() - t0:.1f} s")
    assert r.returncode == 2 and "stage 'train' refused" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    text, st = shown(run_dir2, "train", capsys)
    assert (st["status"], st["meaning"], st["exit_code"], st["log"]) == ("failed", "refused", 2, None), st
    assert st["error"].startswith("pretrain train: exit 2: refused: refusing to resume") and "model shape differs" in st["error"], st
    assert st["error"] in r.stderr.splitlines()  # the very line the user saw on the terminal
    assert f"refused; exit code 2; {st['error']}  (log: none kept: it went to the terminal that ran it)" in text, text
    assert not (run_dir2 / "errors").exists()  # a refusal's one line is its whole reason: no traceback kept

    # 3. a run dir of a version that recorded neither (nor knows a key added later) stays readable
    wf = json.loads((run_dir2 / "workflow.json").read_text())
    for key in ("exit_code", "log"):
        del wf["stages"]["train"][key]
    wf["stages"]["train"]["a_later_key"] = 1
    (run_dir2 / "workflow.json").write_text(json.dumps(wf))
    text, st = shown(run_dir2, "train", capsys)
    assert (st["meaning"], st["exit_code"], st["log"]) == ("failed", None, None) and f"  {st['error']}" in text, (text, st)
    from pipelines.config import load_config
    from pipelines.workflow import Workflow

    loaded = Workflow(str(cfg2), [], load_config(str(cfg2), ["model.n_layer=3"]), log=lambda m: None)
    assert loaded.stages["train"].status == "failed" and loaded.stages["train"].exit_code is None


def test_a_rank_killed_while_training_is_named_by_the_launcher_and_by_status(tmp_path, capsys):
    """Rank 1 of a local 2-rank training killed without a word (the OOM killer's SIGKILL): rank 0 then
    fails on the lost connection, which says nothing of the cause. The launcher's last line, which
    `pretrain status` shows, names the rank that wrote no outcome and the first error any rank
    wrote. Before, both said only "exit 1: failed; rerun the same command"."""
    hellaswag = tmp_path / "hellaswag.jsonl"
    write_jsonl(hellaswag, hellaswag_rows(3, seed=1))
    cfg, run_dir = local_run(tmp_path, "rankkilled", hellaswag)
    proc = start(pretrain_cmd("run", str(cfg), "train.max_steps=5000"), tmp_path / "run.log")
    try:
        wait_for_step(proc, run_dir, 2)
        ranks = rank_pids(proc)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        assert proc.wait(timeout=120) == 1, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        kill_tree(proc)
    said = [line for line in (tmp_path / "run.log").read_text().splitlines() if line.startswith("pretrain train: exit ")]
    assert said and said[-1].startswith("pretrain train: exit 1: failed (local rank 1 ended without a word (killed by a signal"), said
    assert "; first error: rank 0: " in said[-1] and said[-1].endswith("; rerun the same command to resume from the last committed checkpoint"), said
    text, st = shown(run_dir, "train", capsys)
    assert (st["status"], st["meaning"], st["exit_code"], st["error"]) == ("failed", "failed", 1, said[-1]), st
    assert "local rank 1 ended without a word" in text, text
    # rank 0's whole traceback is kept in the run dir, named on the line and shown as the stage's log
    kept = sorted((run_dir / "errors").iterdir())
    assert [p.name.endswith("-rank0.txt") for p in kept] == [True], kept
    assert f" (traceback: {kept[0]})" in said[-1] and st["log"] == str(kept[0]) and f"(log: {kept[0]})" in text, (said, st, text)
    trace = kept[0].read_text()
    assert "rank: 0 of 2" in trace and "Traceback (most recent call last):" in trace and "trainer/train.py" in trace, trace
