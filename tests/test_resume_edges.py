"""Exact resume at the boundaries tests/test_trainer_resume.py does not reach (real torchrun, 2 gloo
ranks, CPU): the loader wrapping around the train shards (an epoch boundary) between the checkpoint
and the kill and exactly at the checkpoint step, with dropout (so the per-rank RNG streams matter),
validation and sampling on; a step skipped for a non-finite loss at the checkpoint step and a
skip streak across it; and a committed checkpoint whose meta.json verifies but is no usable
metadata (it must be skipped like any unloadable one, not crash every rerun with exit 1).

Kill points are deterministic: the checkpoint fault hook (``PRETRAIN_FAULT_INJECT``) SIGKILLs
rank 0's process group in the middle of writing a given checkpoint, so the run resumes from the
one before it and re-trains across the boundary.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.trainer_helpers import make_shard_dir, micro_config, train
from trainer import EXIT_OK, EXIT_REFUSED
from trainer.checkpoint import MARKER, MODEL_FILE, STATE_FILE, list_committed, list_partial, read_meta
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slow

MAX_STEPS = 16
SPAN = 2 * 2 * 32  # tokens of one micro-step, both ranks (the loader's global span)
MODEL = {"dropout": 0.1}  # dropout on: the per-rank RNG streams matter
# validation and samples often, so that they fall on and around the checkpoints; keep every checkpoint
TRAIN = {"max_steps": MAX_STEPS, "val_every": 3, "val_batches": 2, "sample_every": 2, "sample_tokens": 4,
         "keep_last": 10}
FAULT = "PRETRAIN_FAULT_INJECT"  # trainer.checkpoint: "tmp:STEP" kills rank 0 mid-write of checkpoint STEP
NAN = "PRETRAIN_FAULT_NAN"  # trainer.train: "RANK:STEP[-LAST]" makes that rank's loss NaN


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume-edges")


@pytest.fixture(scope="module")
def data_dir(workdir) -> Path:
    # two train shards of 770 and 807 tokens: 6 micro-steps each, so one epoch is 12 micro-steps,
    # 6 optimizer steps; epochs end after steps 6 (between checkpoints 4 and 8) and 12 (a checkpoint)
    return make_shard_dir(workdir / "data", seed=0, train_shards=2, shard_tokens=770, val_tokens=3000)


def setup_run(workdir: Path, data_dir: Path, name: str) -> tuple[Path, Path, Path]:
    run_dir = workdir / name
    config = workdir / f"{name}.yaml"
    config.write_text(micro_config(run_dir, data_dir, model=MODEL, train=TRAIN))
    return run_dir, config, workdir / f"{name}.log"


def run_ok(config: Path, log: Path, *args: str, env: dict | None = None) -> None:
    rc = train(config, log, *args, env=env)
    assert rc == EXIT_OK, log.read_text()[-3000:]


def records(run_dir: Path) -> dict[int, dict]:
    recs = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1)), "each step once, in order"
    return {r["step"]: r for r in recs}


def assert_same_run(run_dir: Path, baseline: Path) -> None:
    """Every step's loss (a skipped step's is null in both), val loss and sample bit for bit, and
    every committed checkpoint's weights."""
    got, want = records(run_dir), records(baseline)
    assert sorted(got) == sorted(want) == list(range(1, MAX_STEPS + 1))
    for step, w in want.items():
        for key in ("loss", "val_loss", "sample", "skipped"):
            assert got[step].get(key) == w.get(key), f"step {step}: {key} {got[step].get(key)!r} != uninterrupted {w.get(key)!r}"
    ckpts = {read_meta(c)["step"]: c for c in list_committed(baseline)}
    for c in list_committed(run_dir):
        a = torch.load(c / MODEL_FILE, weights_only=True)
        b = torch.load(ckpts[read_meta(c)["step"]] / MODEL_FILE, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in b), f"weights of {c.name} differ"


def loader_state(ckpt: Path) -> dict[str, int]:
    states = torch.load(ckpt / STATE_FILE, weights_only=True)["loader_states"]
    assert states[0] == states[1]
    return states[0]


@pytest.fixture(scope="module")
def baseline(workdir, data_dir) -> Path:
    run_dir, config, log = setup_run(workdir, data_dir, "baseline")
    run_ok(config, log)
    return run_dir


# ------------------------------------------------------------------ epoch boundaries


def test_loader_wraps_between_and_at_checkpoints_and_resume_is_exact(workdir, data_dir, baseline):
    """Confirms existing behaviour (uncovered end to end before): resumed from 4 across the epoch
    end after step 6, and from 12, whose stored position is the very end of epoch 1."""
    ckpts = {read_meta(c)["step"]: c for c in list_committed(baseline)}
    assert loader_state(ckpts[4])["epoch"] == 0 and loader_state(ckpts[8])["epoch"] == 1
    at_12 = loader_state(ckpts[12])  # the last shard of epoch 1 has no room for another span
    assert at_12["epoch"] == 1 and at_12["shard_index"] == 1 and at_12["offset"] + SPAN + 1 > 807
    assert loader_state(ckpts[16])["epoch"] == 2

    run_dir, config, log = setup_run(workdir, data_dir, "epochs")
    assert train(config, log, env={FAULT: "tmp:8"}) != EXIT_OK  # dies writing 8: resumes from 4
    assert [read_meta(c)["step"] for c in list_committed(run_dir)] == [4]
    assert train(config, log, env={FAULT: "tmp:16"}) != EXIT_OK  # dies writing 16: resumes from 12
    assert [read_meta(c)["step"] for c in list_committed(run_dir)] == [4, 8, 12]
    run_ok(config, log)
    text = log.read_text()
    assert "at step 4 (" in text and "at step 12 (" in text and list_partial(run_dir) == []
    assert_same_run(run_dir, baseline)


# ------------------------------------------------------------------ non-finite steps


def test_skipped_step_at_a_checkpoint_and_a_streak_across_it_resume_exactly(workdir, data_dir):
    """Confirms existing behaviour (uncovered end to end before): checkpoint 4 is of a skipped
    step inside a streak (steps 3-4), checkpoint 8 of another skipped step; resumed from 4 the
    streak goes on as in the run that never stopped."""
    nan = {NAN: "1:3-4,1:8"}
    want, config, log = setup_run(workdir, data_dir, "nan-baseline")
    run_ok(config, log, env=nan)
    assert [s for s, r in records(want).items() if r.get("skipped")] == [3, 4, 8]
    assert torch.load(list_committed(want)[0] / STATE_FILE, weights_only=True)["skipped_in_row"] == 2

    run_dir, config, log = setup_run(workdir, data_dir, "nan-resumed")
    assert train(config, log, env={**nan, FAULT: "tmp:8"}) != EXIT_OK
    assert [read_meta(c)["step"] for c in list_committed(run_dir)] == [4]
    run_ok(config, log, env=nan)
    assert "at step 4 (" in log.read_text()
    assert all(r["loss"] is None or math.isfinite(r["loss"]) for r in records(run_dir).values())
    assert_same_run(run_dir, want)


def test_a_streak_that_reaches_the_limit_after_a_resume_stops_where_the_uninterrupted_one_did(workdir, data_dir):
    """Confirms existing behaviour: the streak length is checkpointed (steps 3-4 skipped before
    checkpoint 4, step 5 after it), so with train.max_skipped_steps=3 both runs stop at step 5."""
    nan, args = {NAN: "1:3-5"}, ["train.max_skipped_steps=3"]
    want, config, log = setup_run(workdir, data_dir, "streak-baseline")
    assert train(config, log, *args, env=nan) == EXIT_REFUSED, log.read_text()[-3000:]
    run_dir, config, log = setup_run(workdir, data_dir, "streak-resumed")
    # stopped by the time limit right after checkpoint 4 (simulated: that checkpoint copied alone)
    shutil.copytree(list_committed(want)[0], run_dir / "checkpoints" / list_committed(want)[0].name)
    assert train(config, log, *args, env=nan) == EXIT_REFUSED, log.read_text()[-3000:]
    assert "3 steps in a row (steps 3-5)" in log.read_text()
    assert [read_meta(c)["step"] for c in list_committed(run_dir)] == [4, 5]
    assert [(r["step"], r["loss"], r.get("skipped")) for r in read_metrics(run_dir / "metrics.jsonl")] == [(5, None, True)]
    assert records(want)[5]["skipped"] and records(want)[5]["loss"] is None


# ------------------------------------------------------------------ a checkpoint whose metadata is unusable


def _recommit(ckpt: Path, meta_text: str) -> None:
    """Replace meta.json and rewrite COMMITTED.json to match (it verifies: as a writer of another
    code version, or a marker rewritten over a bad file, would leave it)."""
    (ckpt / "meta.json").write_text(meta_text)
    marker = json.loads((ckpt / MARKER).read_text())
    marker["files"]["meta.json"] = hashlib.sha256((ckpt / "meta.json").read_bytes()).hexdigest()
    (ckpt / MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize("meta", ["[]\n", '{"step": 16', '{"step": 16, "model": {}}\n'], ids=["not-an-object", "torn", "other-version"])
def test_a_checkpoint_whose_meta_verifies_but_is_unusable_is_skipped_and_resume_is_exact(workdir, baseline, meta):
    """Defect fixed: rank 0 raised CheckpointError/KeyError while picking the checkpoint (exit 1,
    "rerun to resume", and every rerun crashed alike). Now it is skipped, set aside, and the run
    resumes from the one before, exactly."""
    name = f"meta-{len(meta)}"
    run_dir = workdir / name
    shutil.copytree(baseline, run_dir)
    config = workdir / f"{name}.yaml"
    config.write_text((workdir / "baseline.yaml").read_text().replace(str(baseline), str(run_dir)))
    newest = list_committed(run_dir)[-1]
    _recommit(newest, meta)
    log = workdir / f"{name}.log"
    run_ok(config, log)
    text = log.read_text()
    assert "skipping step_00000016" in text and "resumed from" in text and "at step 12 (" in text
    aside = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("unusable-step_00000016")]
    assert len(aside) == 1, "kept for inspection, out of the readers' way"
    assert_same_run(run_dir, baseline)
