"""The trainer refuses what a rerun cannot fix, keeps its checkpoints, and skips bad steps.

Real components throughout: `pretrain train` with real torchrun (2 gloo ranks on CPU), a real
flock, a real full filesystem (a small tmpfs, mounted by the test as root), real sockets read
from /proc. The only fault injected is a NaN in one rank's loss (PRETRAIN_FAULT_NAN, test-only),
because nothing here produces one on demand.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipelines.config import ConfigError, load_config, to_dict
from tests.conftest import skip_or_fail
from tests.trainer_helpers import (
    descendants,
    kill_tree,
    losses,
    listening_sockets,
    make_shard_dir,
    metric_steps,
    micro_config,
    pretrain_cmd,
    rank_pids,
    start,
    train,
    wait_for_step,
)
from trainer import EXIT_OK, EXIT_REFUSED, EXIT_REQUEUE
from trainer.checkpoint import (
    MARKER,
    MODEL_FILE,
    OPTIM_FILE,
    CheckpointWriter,
    DiskFullError,
    apply_retention,
    list_committed,
    list_partial,
    read_meta,
    remove_partials,
    verify,
    write_checkpoint,
)
from trainer.config import MODEL_PRESETS, changed_hyperparameters
from trainer.metrics import read_metrics

TRAIN = {"max_steps": 12}  # no validation or samples; checkpoints 4, 8, 12
RERUN_HINT = "rerun the same command to resume"  # the launcher's advice for exit 1 only


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hardening")


@pytest.fixture(scope="module")
def data_dir(workdir) -> Path:
    return make_shard_dir(workdir / "data", seed=0)


def setup_run(workdir: Path, data_dir: Path, name: str) -> tuple[Path, Path, Path]:
    run_dir = workdir / name
    config = workdir / f"{name}.yaml"
    config.write_text(micro_config(run_dir, data_dir, train=TRAIN))
    return run_dir, config, workdir / f"{name}.log"


def committed_steps(run_dir: Path) -> list[int]:
    return [read_meta(c)["step"] for c in list_committed(run_dir)]


def weights(run_dir: Path, step: int, name: str = MODEL_FILE) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / name, weights_only=True)


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ config refused at load (exit 2)


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "train.lr must be > 0"),
    ("train.device=gpu", "train.device must be one of auto, cpu, cuda, got 'gpu'"),
    ("train.max_steps=0", "train.max_steps must be >= 1"),
    ("train.dtype=fp8", "train.dtype must be one of"),
    ("train.beta2=1.5", "train.beta2 must be in [0, 1)"),
    ("train.min_lr=1", "train.min_lr must be in [0, lr="),
    ("train.keep_last=0", "train.keep_last must be >= 1"),
    ("train.max_skipped_steps=0", "train.max_skipped_steps must be >= 1"),
    ("train.stop_timeout_s=0", "train.stop_timeout_s must be >= 1"),
    ("train.lr=nan", "train.lr must be a finite number"),
    ("model.name=gpt5", "model.n_layer is not set and name 'gpt5' is not a preset"),
    ("model.dropout=1", "model.dropout must be in [0, 1)"),
    ("model.vocab_size=1000", "model.vocab_size must be >= 50257"),
    ("model.vocab_size=10000000000", "model.vocab_size must be <= 65536"),  # was an allocation failure, exit 1
])  # fmt: skip
def test_invalid_model_and_train_values_are_refused_when_the_config_loads(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/smoke.yaml", [override])
    assert message in str(err.value) and "configs/smoke.yaml" in str(err.value)


def test_pretrain_train_refuses_an_unknown_device_with_exit_2_and_no_rerun_advice(workdir, data_dir):
    _, config, log = setup_run(workdir, data_dir, "badvalue")
    rc = train(config, log, "train.device=gpu", timeout=60)
    text = log.read_text()
    assert rc == EXIT_REFUSED, text
    assert "train.device must be one of auto, cpu, cuda, got 'gpu'" in text and RERUN_HINT not in text


def test_a_model_too_large_for_the_device_is_refused_with_exit_2_naming_its_shape(workdir, data_dir):
    """It was a RuntimeError traceback and exit 1 ("rerun to resume"): a rerun fails alike."""
    _, config, log = setup_run(workdir, data_dir, "toolarge")
    rc = train(config, log, "model.n_embd=4194304", "model.n_head=1", "train.nproc_per_node=1", timeout=120)
    text = log.read_text()
    assert rc == EXIT_REFUSED, text[-3000:]
    assert "the model does not fit in cpu memory (n_layer=" in text and "n_embd=4194304" in text and RERUN_HINT not in text
    # a refusal reads as one: torchrun's report of the worker's exit is a line per rank, not a traceback
    assert "Traceback" not in text and "torchrun: rank 0 (pid " in text and "ended with exit 2" in text


def test_model_presets_known_to_the_config_are_the_models_presets():
    from trainer.model import PRESETS

    assert set(MODEL_PRESETS) == set(PRESETS)


def test_hyperparameters_are_compared_and_runtime_knobs_are_not():
    base = to_dict(load_config("configs/smoke.yaml"))
    knobs = to_dict(load_config("configs/smoke.yaml", ["train.ckpt_every=7", "train.nproc_per_node=1", "train.compile=true",
                                                       "train.val_every=3", "train.max_skipped_steps=9", "eval.limit=5",
                                                       "train.stop_timeout_s=60"]))
    assert changed_hyperparameters(base, knobs) == []
    math = to_dict(load_config("configs/smoke.yaml", ["train.lr=0.0123", "train.max_steps=999", "model.dropout=0.1", "train.seed=7"]))
    assert changed_hyperparameters(base, math) == [
        "model.dropout: 0.0 -> 0.1", f"train.lr: {base['train']['lr']!r} -> 0.0123",
        f"train.max_steps: {base['train']['max_steps']} -> 999", f"train.seed: {base['train']['seed']} -> 7",
    ]
    # a checkpoint written before a key existed is not a change
    old = json.loads(json.dumps(base))
    del old["train"]["max_skipped_steps"], old["train"]["lr"]
    assert changed_hyperparameters(old, math) == ["model.dropout: 0.0 -> 0.1", f"train.max_steps: {base['train']['max_steps']} -> 999",
                                                  f"train.seed: {base['train']['seed']} -> 7"]


# ------------------------------------------------------------------ checkpoints on disk


def _save(run_dir: Path, step: int, size: int = 1000) -> Path:
    return write_checkpoint(run_dir, step, {"w": torch.full((size,), float(step))}, {"state": {}}, {"step": step}, {"step": step})


def test_a_file_in_place_of_a_checkpoint_is_moved_aside_not_left_to_break_the_next_write(tmp_path):
    _save(tmp_path, 10)
    stray = tmp_path / "checkpoints" / "step_00000020"
    stray.write_text("not a checkpoint")
    messages: list[str] = []
    remove_partials(tmp_path, log=messages.append)
    assert not os.path.lexists(stray) and "moved it aside" in messages[0]
    kept = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("stray-step_00000020-")]
    assert len(kept) == 1 and kept[0].read_text() == "not a checkpoint", "nothing may be deleted"
    # the same in the writer's way (a file appearing after the start): the write still commits
    stray.write_text("again")
    os.symlink("/nonexistent", tmp_path / "checkpoints" / "step_00000030")  # a dangling link too
    _save(tmp_path, 20)
    _save(tmp_path, 30)
    assert committed_steps(tmp_path) == [10, 20, 30] and list_partial(tmp_path) == []
    for ckpt in list_committed(tmp_path):
        verify(ckpt)


def test_retention_frees_space_before_a_write_but_never_the_newest_committed(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    # keep_last 2: once 40 is committed, 20 goes; it may go now (30 stays until 40 is committed)
    assert [p.name for p in apply_retention(tmp_path, keep_last=2, keep_every=0, upcoming=40)] == ["step_00000010", "step_00000020"]
    assert committed_steps(tmp_path) == [30]
    # keep_last 1: the newest committed is the only way back until its successor commits
    assert apply_retention(tmp_path, keep_last=1, keep_every=0, upcoming=40) == []
    assert committed_steps(tmp_path) == [30]
    _save(tmp_path, 40)
    assert [p.name for p in apply_retention(tmp_path, keep_last=1, keep_every=0)] == ["step_00000030"]


@pytest.fixture
def small_fs(tmp_path):
    """A real small filesystem (tmpfs), so that writes really end in ENOSPC."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        skip_or_fail("mounting a small tmpfs needs root")

    def mount(size_mb: int) -> Path:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mnt)], capture_output=True, text=True, check=False)
        if r.returncode:
            skip_or_fail(f"cannot mount a tmpfs: {r.stderr.strip()}")
        return mnt

    yield mount
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_disk_full_during_a_write_deletes_the_partial_write_and_keeps_the_committed_one(small_fs, asynchronous):
    run_dir = small_fs(30)
    writer = CheckpointWriter(run_dir, keep_last=1, keep_every=0, asynchronous=asynchronous, log=lambda m: None)
    state = {"w": torch.zeros(4_000_000)}  # 16 MB: one fits, two do not
    writer.save(1, state, {"state": {}}, {"step": 1}, {"step": 1})
    writer.wait()
    with pytest.raises(DiskFullError, match="disk full while writing checkpoint step 2.*free space"):
        writer.save(2, state, {"state": {}}, {"step": 2}, {"step": 2})
        writer.wait()
    assert committed_steps(run_dir) == [1] and list_partial(run_dir) == []
    verify(list_committed(run_dir)[0])
    assert shutil.disk_usage(run_dir).free > 12 * 2**20, "the partial write must be deleted, freeing its space"


# ------------------------------------------------------------------ one writer per run dir; loopback only


@pytest.fixture(scope="module")
def contended(workdir, data_dir) -> SimpleNamespace:
    """Training A runs; while its ranks are paused (still holding the lock and their sockets), a
    second `pretrain train` on the same run dir, with another lr, is started and must be refused."""
    run_dir, config, log = setup_run(workdir, data_dir, "contended")
    log_b = workdir / "contended-second.log"
    a = start(pretrain_cmd("train", str(config)), log)
    try:
        wait_for_step(a, run_dir, 2)
        ranks = rank_pids(a)
        assert set(ranks) == {0, 1}, ranks
        tree = [a.pid, *descendants(a.pid)]
        for pid in ranks.values():
            os.kill(pid, signal.SIGSTOP)
        try:
            sockets = listening_sockets(tree)
            metrics_before = (run_dir / "metrics.jsonl").read_bytes()
            b = start(pretrain_cmd("train", str(config), "train.lr=1e-3"), log_b)
            try:
                rc_b = b.wait(timeout=120)
            finally:
                kill_tree(b)
            metrics_after_b = (run_dir / "metrics.jsonl").read_bytes()
        finally:
            for pid in ranks.values():
                os.kill(pid, signal.SIGCONT)
        rc_a = a.wait(timeout=240)
    finally:
        kill_tree(a)
    return SimpleNamespace(run_dir=run_dir, config=config, log=log, log_b=log_b, rc_a=rc_a, rc_b=rc_b, ranks=ranks, tree=tree,
                           sockets=sockets, metrics_before=metrics_before, metrics_after_b=metrics_after_b)


def test_ranks_slower_than_torchruns_30_s_to_checkpoint_on_a_stop_are_not_killed(workdir, data_dir):
    """SLURM sends its stop signal to every process of the job, torchrun included, and torchrun then
    SIGKILLed ranks that had not exited after its own 30 s: a large model's stop checkpoint, cut
    short. Here the ranks are held (SIGSTOP, as a slow filesystem would) for 33 s after the signal
    reached the launcher, torchrun and both ranks: they must then commit the stop checkpoint (old
    code: SIGKILLed at 30 s, no checkpoint, the rerun would start over) within train.stop_timeout_s."""
    run_dir = workdir / "slow-stop"
    config = workdir / "slow-stop.yaml"
    config.write_text(micro_config(run_dir, data_dir, train={"max_steps": 200, "ckpt_every": 100}))
    proc = start(pretrain_cmd("train", str(config)), workdir / "slow-stop.log")
    try:
        wait_for_step(proc, run_dir, 3)
        ranks = list(rank_pids(proc).values())
        torchrun = [p for p in descendants(proc.pid) if p not in ranks]
        assert len(ranks) == 2 and len(torchrun) == 1, (ranks, torchrun)
        for pid in ranks:
            os.kill(pid, signal.SIGSTOP)
        for pid in [proc.pid, *torchrun, *ranks]:
            os.kill(pid, signal.SIGTERM)
        time.sleep(33)
        killed = []
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                killed.append(pid)
        assert not killed, f"torchrun SIGKILLed ranks {killed} while they were still to checkpoint"
        assert proc.wait(timeout=120) == EXIT_REQUEUE
    finally:
        kill_tree(proc)
    log = (workdir / "slow-stop.log").read_text()
    assert "checkpoint committed" in log.splitlines()[-1], log[-2000:]
    assert committed_steps(run_dir) == [metric_steps(run_dir)], log[-2000:]  # the step it stopped at


def test_a_second_training_on_the_same_run_dir_is_refused_naming_the_holder(contended):
    text_b = contended.log_b.read_text()
    assert contended.rc_b == EXIT_REFUSED, text_b[-3000:]
    assert f"host {socket.gethostname()}, pid {contended.ranks[0]}" in text_b, text_b[-3000:]
    assert "is in use (train)" in text_b and RERUN_HINT not in text_b
    assert "step 1/" not in text_b, "the second run must not train"
    # the first run is untouched by it and finishes normally
    assert contended.metrics_after_b == contended.metrics_before
    assert contended.rc_a == EXIT_OK, contended.log.read_text()[-3000:]
    final = (contended.run_dir / "metrics.jsonl").read_bytes()
    assert final.startswith(contended.metrics_before)
    assert sorted(losses(contended.run_dir)) == list(range(1, 13))
    assert "resumed from" not in contended.log.read_text()


def test_single_node_training_listens_on_loopback_only(contended):
    # the launcher, torchrun's agent (rendezvous + worker bootstrap stores) and both ranks (gloo)
    assert {pid for pid, _, _ in contended.sockets} >= set(contended.ranks.values()), contended.sockets
    assert len(contended.sockets) >= 4, contended.sockets
    exposed = [s for s in contended.sockets if s[1] not in ("127.0.0.1", "::1")]
    assert exposed == [], f"listening beyond loopback: {exposed}"


def test_resume_with_changed_hyperparameters_is_refused_unless_allowed(workdir, contended):
    run_dir = workdir / "changed"
    shutil.copytree(contended.run_dir, run_dir)
    config = workdir / "changed.yaml"
    config.write_text(contended.config.read_text().replace(str(contended.run_dir), str(run_dir)))
    before = (run_dir / "metrics.jsonl").read_bytes()
    log = workdir / "changed.log"
    assert train(config, log, "train.lr=1e-3", "train.max_steps=14") == EXIT_REFUSED
    text = log.read_text()
    assert "hyper-parameters changed since step_00000012 (train.lr: 0.003 -> 0.001; train.max_steps: 12 -> 14)" in text
    assert "--allow-changes" in text and RERUN_HINT not in text
    assert (run_dir / "metrics.jsonl").read_bytes() == before and committed_steps(run_dir) == [4, 8, 12]

    log2 = workdir / "changed-allowed.log"
    changes = ["train.lr=1e-3", "train.max_steps=14", "train.weight_decay=0.0", "train.beta2=0.5", "train.eps=0.001"]
    assert train(config, log2, *changes, "--allow-changes") == EXIT_OK, log2.read_text()[-3000:]
    text2 = log2.read_text()
    assert ("continuing with changed hyper-parameters (--allow-changes): train.beta2: 0.95 -> 0.5; train.eps: 1e-08 -> 0.001; "
            "train.lr: 0.003 -> 0.001; train.max_steps: 12 -> 14; train.weight_decay: 0.1 -> 0.0") in text2
    assert sorted(losses(run_dir)) == list(range(1, 15))
    newest = list_committed(run_dir)[-1]
    assert read_meta(newest)["config"]["train"]["lr"] == 1e-3
    # the new values are the ones the optimizer ran with, not the checkpoint's (restored with its state)
    groups = torch.load(newest / OPTIM_FILE, weights_only=True)["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"]), g["eps"]) for g in groups] == [(0.0, (0.9, 0.5), 0.001)] * 2


def _commit_as_is(ckpt: Path) -> None:
    """Rewrite COMMITTED.json so that it matches the files as they are now (verification passes)."""
    marker = json.loads((ckpt / MARKER).read_text())
    marker["files"] = {name: hashlib.sha256((ckpt / name).read_bytes()).hexdigest() for name in marker["files"]}
    (ckpt / MARKER).write_text(json.dumps(marker))
    verify(ckpt)


def test_committed_checkpoints_that_do_not_load_fall_back_to_the_previous_one(workdir, contended):
    run_dir = workdir / "unloadable"
    shutil.copytree(contended.run_dir, run_dir)
    config = workdir / "unloadable.yaml"
    config.write_text(contended.config.read_text().replace(str(contended.run_dir), str(run_dir)))
    ckpts = {read_meta(c)["step"]: c for c in list_committed(run_dir)}
    (ckpts[12] / MODEL_FILE).write_bytes(b"PK\x03\x04 not a torch file")  # torch.load fails
    torch.save({"bogus.weight": torch.zeros(3)}, ckpts[8] / MODEL_FILE)  # loads, but other keys
    _commit_as_is(ckpts[12])
    _commit_as_is(ckpts[8])
    log = workdir / "unloadable.log"
    assert train(config, log) == EXIT_OK, log.read_text()[-3000:]
    text = log.read_text()
    assert "checkpoint step_00000012 verifies but does not load" in text and "checkpoint step_00000008 verifies but does not load" in text
    assert "falling back to the previous committed checkpoint" in text
    assert f"resumed from {ckpts[4]} at step 4" in text
    aside = sorted(p.name.rsplit("-", 1)[0] for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("unusable-"))
    assert aside == ["unusable-step_00000008", "unusable-step_00000012"], "kept for inspection, out of the readers' way"
    # the resume is exact: the re-trained steps have bitwise the losses of the uninterrupted run
    assert losses(run_dir) == losses(contended.run_dir)
    assert same_tensors(weights(run_dir, 12), weights(contended.run_dir, 12))


# ------------------------------------------------------------------ non-finite steps


def test_a_nan_on_one_rank_is_skipped_by_every_rank_and_a_streak_stops_the_run(workdir, data_dir):
    run_dir, config, log = setup_run(workdir, data_dir, "nan")
    args = ["train.max_steps=8", "train.ckpt_every=1", "train.keep_last=10", "train.max_skipped_steps=2"]
    fault = {"PRETRAIN_FAULT_NAN": "1:3,1:6-7"}  # rank 1 only: step 3, then steps 6 and 7 in a row
    rc = train(config, log, *args, env=fault)
    text = log.read_text()
    assert rc == EXIT_REFUSED, text[-3000:]
    for step in (3, 6, 7):
        assert f"rank 0: step {step} skipped" in text and f"rank 1: step {step} skipped" in text
    recs = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}
    assert sorted(recs) == list(range(1, 8))
    assert [s for s, r in recs.items() if r.get("skipped")] == [3, 6, 7]
    assert all(r["loss"] == r["loss"] for s, r in recs.items() if s not in (3, 6, 7)), "other steps are finite"
    # a skipped step changes neither the weights nor the optimizer (rank 0 never saw the NaN itself)
    assert same_tensors(weights(run_dir, 3), weights(run_dir, 2))
    assert torch.load(run_dir / "checkpoints/step_00000003" / OPTIM_FILE, weights_only=True)["state"][0]["step"] == 2
    assert not same_tensors(weights(run_dir, 4), weights(run_dir, 3)), "training continues after a skipped step"
    assert same_tensors(weights(run_dir, 7), weights(run_dir, 5))
    assert committed_steps(run_dir)[-1] == 7
    assert "2 steps in a row (steps 6-7) had a non-finite loss or gradient norm" in text and RERUN_HINT not in text

    # after the cause is gone (here: no more fault), the same command resumes and finishes
    assert train(config, log, *args) == EXIT_OK, log.read_text()[-3000:]
    assert sorted(losses(run_dir)) == list(range(1, 9))


# ------------------------------------------------------------------ data and disk a rerun cannot fix


def test_a_corrupt_shard_stops_training_with_exit_2(workdir, data_dir):
    bad = workdir / "bad-data"
    shutil.copytree(data_dir, bad)
    shards = sorted(bad.glob("train_*.bin"))
    for shard in shards:
        blob = bytearray(shard.read_bytes())
        blob[-10] ^= 0x01  # one flipped bit in the body: header and size still fine
        shard.write_bytes(bytes(blob))
    run_dir, config, log = setup_run(workdir, bad, "bad-data-run")
    rc = train(config, log)
    text = log.read_text()
    assert rc == EXIT_REFUSED, text[-3000:]
    assert "the dataset is corrupt" in text and "sha256" in text and RERUN_HINT not in text
    assert any(s.name in text for s in shards)
    assert losses(run_dir) == {} and list_committed(run_dir) == [], "no token of a corrupt shard may be trained on"


def test_disk_full_exits_2_keeps_the_checkpoint_and_a_rerun_after_freeing_space_finishes(workdir, data_dir, small_fs):
    run_dir = small_fs(50)  # a checkpoint of the micro model is ~20 MB: two fit, three do not
    config = workdir / "diskfull.yaml"
    config.write_text(micro_config(run_dir, data_dir, train=TRAIN))
    log = workdir / "diskfull.log"
    ballast = run_dir / "ballast.bin"
    ballast.write_bytes(b"\0" * (22 << 20))  # someone else's data: leaves room for one checkpoint
    args = ["train.keep_last=2"]
    rc = train(config, log, *args)
    text = log.read_text()
    assert rc == EXIT_REFUSED, text[-3000:]
    assert "disk full while writing checkpoint step 8" in text and "free space" in text and RERUN_HINT not in text
    assert committed_steps(run_dir) == [4] and list_partial(run_dir) == []
    verify(list_committed(run_dir)[0])

    ballast.unlink()
    # 4 and 8 fill the disk; retention removes 4 *before* writing 12 (as it would after), so this fits
    assert train(config, log, *args) == EXIT_OK, log.read_text()[-3000:]
    assert "removed step_00000004 before writing step 12" in log.read_text()
    assert committed_steps(run_dir) == [8, 12]
    assert sorted(losses(run_dir)) == list(range(1, 13))
