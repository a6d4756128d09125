"""In-process unit tests of the trainer's pieces: loader, LR schedule, checkpoints, metrics, RNG."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dataprep.shards import TokenDataset
from tests.trainer_helpers import make_shard_dir
from trainer.checkpoint import (
    MARKER,
    MODEL_FILE,
    CheckpointError,
    apply_retention,
    find_resumable,
    list_committed,
    list_partial,
    load_model_for_eval,
    verify,
    write_checkpoint,
)
from trainer.data import LoaderState, TrainLoader, ValBatches
from trainer.metrics import MetricsLog, read_metrics
from trainer.model import GPT, GPTConfig
from trainer.optim import build_optimizer, lr_at
from trainer.rng import capture_rng, restore_rng
from trainer.train import RefusedError, grad_accum_steps


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> TokenDataset:
    return TokenDataset(make_shard_dir(tmp_path_factory.mktemp("units") / "data", seed=3, train_shards=5, shard_tokens=2000))


def test_ranks_read_disjoint_shifted_windows(dataset):
    B, T, W = 2, 16, 3
    loaders = [TrainLoader(dataset, B, T, r, W, seed=1) for r in range(W)]
    for _ in range(5):
        state = loaders[0].state
        batches = [ld.next_batch() for ld in loaders]
        assert len({ld.state for ld in loaders}) == 1, "the loader state is global: equal on every rank"
        st = loaders[0]._normalise(state)
        tokens = np.asarray(dataset.tokens(loaders[0].shards[loaders[0].order(st.epoch)[st.shard_index]]), dtype=np.int64)
        for r, (x, y) in enumerate(batches):
            start = st.offset + r * B * T
            assert x.shape == y.shape == (B, T)
            assert torch.equal(x.flatten(), torch.from_numpy(tokens[start : start + B * T]))
            assert torch.equal(y.flatten(), torch.from_numpy(tokens[start + 1 : start + B * T + 1]))


def test_loader_resumes_exactly_from_its_state_across_epochs(dataset):
    ref = TrainLoader(dataset, 4, 32, 0, 2, seed=5)
    seen = [ref.next_batch()[0] for _ in range(60)]  # 60 x 256 tokens: several epochs of ~10k tokens
    assert ref.state.epoch >= 1
    probe = TrainLoader(dataset, 4, 32, 0, 2, seed=5)
    for i in range(60):
        if i in (7, 23, 41):
            state = LoaderState.from_dict(json.loads(json.dumps(probe.state.to_dict())))
            probe = TrainLoader(dataset, 4, 32, 0, 2, seed=5, state=state)
        assert torch.equal(probe.next_batch()[0], seen[i])


def test_shard_order_is_reshuffled_per_epoch_from_the_seed(dataset):
    ld = TrainLoader(dataset, 1, 8, 0, 1, seed=11)
    orders = [ld.order(e) for e in range(6)]
    assert all(sorted(o) == list(range(5)) for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    assert orders == [TrainLoader(dataset, 1, 8, 0, 1, seed=11).order(e) for e in range(6)]
    assert orders != [TrainLoader(dataset, 1, 8, 0, 1, seed=12).order(e) for e in range(6)]


def test_loader_rejects_batches_bigger_than_any_shard(dataset):
    with pytest.raises(ValueError, match="no train shard holds one global micro-batch"):
        TrainLoader(dataset, 64, 64, 0, 2, seed=0)


def test_val_batches_are_fixed_and_capped(dataset):
    with pytest.warns(UserWarning, match="val split holds"):
        val = ValBatches(dataset, 4, 32, 0, 2, n_batches=100)
    assert 0 < len(val) < 100
    a = [x for x, _ in val]
    b = [x for x, _ in val]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    other_rank = ValBatches(dataset, 4, 32, 1, 2, n_batches=len(val))
    assert not torch.equal(next(iter(other_rank))[0], a[0])


def test_grad_accum_must_divide_exactly():
    assert grad_accum_steps(524_288, 64, 1024, 8) == 1
    assert grad_accum_steps(524_288, 16, 1024, 8) == 4
    with pytest.raises(RefusedError, match="must be a positive multiple"):
        grad_accum_steps(500_000, 16, 1024, 8)


def test_lr_schedule():
    kw = dict(lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kw) == pytest.approx(6e-5)
    assert lr_at(9, **kw) == pytest.approx(6e-4)
    assert lr_at(10, **kw) == pytest.approx(6e-4)
    assert lr_at(60, **kw) == pytest.approx((6e-4 + 6e-5) / 2)
    assert lr_at(110, **kw) == pytest.approx(6e-5) and lr_at(500, **kw) == pytest.approx(6e-5)
    lrs = [lr_at(s, **kw) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8))
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_rng_state_roundtrips_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(3)
    torch.save(capture_rng(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def _save(run_dir: Path, step: int, model: GPT) -> Path:
    return write_checkpoint(run_dir, step, model.state_dict(), {"state": {}}, {"step": step},
                            {"step": step, "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8,
                                                     "vocab_size": 50304, "dropout": 0.0, "bias": True}})


def test_checkpoint_commit_verify_corruption_and_retention(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8))
    for step in (10, 20, 30, 40, 50):
        _save(tmp_path, step, model)
    assert [p.name for p in list_committed(tmp_path)] == [f"step_{s:08d}" for s in (10, 20, 30, 40, 50)]
    removed = apply_retention(tmp_path, keep_last=2, keep_every=20)
    assert [p.name for p in removed] == ["step_00000010", "step_00000030"]
    assert [p.name for p in list_committed(tmp_path)] == ["step_00000020", "step_00000040", "step_00000050"]

    loaded, meta = load_model_for_eval(list_committed(tmp_path)[-1])
    assert meta["step"] == 50 and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))

    newest = list_committed(tmp_path)[-1]
    with open(newest / MODEL_FILE, "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage")
    with pytest.raises(CheckpointError, match="model.pt is corrupt"):
        verify(newest)
    messages: list[str] = []
    assert find_resumable(tmp_path, log=messages.append).name == "step_00000040"
    assert "skipping step_00000050" in messages[0]

    # every checkpoint corrupt: refuse rather than restart from scratch over them
    other = tmp_path / "allbad"
    _save(other, 5, model)
    (list_committed(other)[0] / MODEL_FILE).write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="none of the 1 committed checkpoints verifies"):
        find_resumable(other, log=messages.append)
    assert find_resumable(tmp_path / "empty") is None

    # a directory without the marker is invisible to readers
    (newest / MARKER).unlink()
    assert list_committed(tmp_path)[-1].name == "step_00000040"
    assert [p.name for p in list_partial(tmp_path)] == ["step_00000050"]
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        load_model_for_eval(newest)
    # rewriting that step replaces the partial directory
    _save(tmp_path, 50, model)
    verify(list_committed(tmp_path)[-1])


def test_metrics_truncation_drops_rerun_steps_and_torn_lines(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for s in range(1, 8):
        log.append({"step": s, "loss": 1.0 / 3.0 * s})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # killed mid-write
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 7
    assert MetricsLog(tmp_path / "metrics.jsonl").truncate_after(4) == 4
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[2]["loss"] == 1.0 / 3.0 * 3  # floats round-trip exactly


def test_train_state_files_keep_their_keys_and_old_states_load():
    """trainer_state.pt and meta.json are views of one TrainState; their keys are the on-disk format."""
    from trainer.state import TrainState

    config = {"train": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "max_steps": 10}}
    st = TrainState(world_size=2, model={"n_layer": 2}, model_shape={"n_layer": 2}, data_fingerprint="ab",
                    data_dir="/d", config=config, step=4, tokens_seen=512, skipped_in_row=1, run_id="r",
                    loader_states=[{"epoch": 0, "shard_index": 1, "offset": 64}] * 2, rng_states=[capture_rng(), capture_rng()])
    saved = st.state_dict()
    assert set(saved) == {"format_version", "step", "tokens_seen", "world_size", "schedule", "loader_states", "rng_states",
                          "mlflow_run_id", "data_fingerprint", "model_shape", "config", "skipped_in_row"}
    assert saved["schedule"] == {"next_step": 4, "next_lr": lr_at(4, 1e-3, 1e-4, 2, 10)}
    meta = st.meta()
    assert set(meta) == {"step", "tokens_seen", "world_size", "model", "model_shape", "data_fingerprint", "data_dir",
                         "mlflow_run_id", "loader_states", "config", "time"}
    json.dumps(meta)  # no tensors in meta.json
    # an older trainer_state.pt (no streak, no run id) loads; identity stays this run's
    old = {k: v for k, v in saved.items() if k not in ("skipped_in_row", "mlflow_run_id")}
    fresh = TrainState(world_size=1, config={"x": 1})
    fresh.load_state_dict(old)
    assert (fresh.step, fresh.tokens_seen, fresh.skipped_in_row, fresh.run_id, fresh.world_size) == (4, 512, 0, None, 1)
    loader, rng = fresh.position_for(0, 1)  # another world size: the global data position, no RNG stream
    assert loader == LoaderState(0, 1, 64) and rng is None
    assert fresh.position_for(1, 2)[1] is saved["rng_states"][1]
