"""Shuffled shards: train documents in a seeded permutation, validation a seeded sample taken before it.

What a user relies on: the documents are all there exactly once (train and val disjoint), the order
is not the corpus order and depends on the seed only (not on the number of Ray workers, nor on a
kill and rerun), and a changed seed never mixes with a finished dataset.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from dataprep.config import RayConfig
from dataprep.errors import DataError
from dataprep.packing import pack_documents, split_order
from dataprep.pipeline import run_data_stage
from dataprep.shards import TokenDataset
from dataprep.tokenizer import EOT_TOKEN, get_gpt2
from tests.corpus import make_corpus
from tests.test_data import (
    REPO,
    data_cfg,
    run_cli,
    sigkill_data_run,
    tree_digest,
    write_config,
)

# Small shards, so that the shard wave has many tasks (and a kill can land inside it).
SETTINGS = {"chunk_docs": 100, "shard_tokens": 600, "val_tokens": 20_000, "minhash_dedup": False}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("shuffle-corpus")
    c = make_corpus(d, n_unique=900, n_exact=60, n_near=0, n_files=3, seed=3)
    kept = [doc["text"] for doc in c.docs if doc["id"] not in c.exact_ids]
    return d, kept


def build(corpus, root: Path, name: str, ranks: str, **kw) -> tuple[Path, dict]:
    src, _ = corpus
    out = root / name
    return out, run_data_stage(data_cfg(src, out, ranks, **{**SETTINGS, **kw}), RayConfig())


@pytest.fixture(scope="module")
def builds(corpus, tmp_path_factory, gpt2_ranks, ray_cluster) -> dict[int, tuple[Path, dict]]:
    """The same corpus with the default seed, another seed, and shuffling off (2 Ray workers)."""
    root = tmp_path_factory.mktemp("shuffle-builds")
    return {seed: build(corpus, root, f"seed{seed}", gpt2_ranks, shuffle_seed=seed) for seed in (1234, 7, -1)}


def documents(out: Path, split: str, ranks: str) -> list[str]:
    """The documents of a split in stored order, cut at every <|endoftext|>."""
    ds = TokenDataset(out)
    ds.verify()
    tokens = np.concatenate([np.asarray(ds.tokens(s)) for s in ds.split(split)])
    starts = np.flatnonzero(tokens == EOT_TOKEN)
    assert len(starts) and starts[0] == 0, "a split must start with <|endoftext|>"
    enc = get_gpt2(ranks)
    return [enc.decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts, [*starts[1:], len(tokens)])]


def test_train_is_a_permutation_of_the_kept_documents_minus_a_disjoint_val_sample(corpus, builds, gpt2_ranks):
    _, kept = corpus
    out, manifest = builds[1234]
    val, train = documents(out, "val", gpt2_ranks), documents(out, "train", gpt2_ranks)
    assert len(set(kept)) == len(kept), "the test corpus must have distinct documents"
    assert sorted(val + train) == sorted(kept)  # every kept document exactly once ...
    assert not set(val) & set(train)  # ... in one split only
    position = {t: i for i, t in enumerate(kept)}
    val_pos, train_pos = [position[t] for t in val], [position[t] for t in train]
    assert val_pos != sorted(val_pos) and train_pos != sorted(train_pos)  # neither split is in corpus order
    # Validation is a sample from the whole corpus, not its first documents.
    assert max(val_pos) > len(kept) // 2 and sorted(val_pos) != list(range(len(val)))
    assert sum(s["tokens"] for s in manifest["shards"] if s["split"] == "val") >= SETTINGS["val_tokens"]
    assert manifest["config"]["shuffle_seed"] == 1234 and manifest["order"]["shuffle_seed"] == 1234
    assert manifest["stats"]["docs_kept"] == len(kept) and manifest["stats"]["shards"]["train"] > 100


def test_another_seed_gives_another_order_and_off_gives_corpus_order(corpus, builds, gpt2_ranks):
    _, kept = corpus
    (a, ma), (b, mb), (off, moff) = builds[1234], builds[7], builds[-1]
    train_a, train_b = documents(a, "train", gpt2_ranks), documents(b, "train", gpt2_ranks)
    assert sorted(train_a + documents(a, "val", gpt2_ranks)) == sorted(train_b + documents(b, "val", gpt2_ranks))
    assert train_a != train_b and set(documents(a, "val", gpt2_ranks)) != set(documents(b, "val", gpt2_ranks))
    assert ma["plan_fingerprint"] != mb["plan_fingerprint"]
    # Off: the shards are the corpus, in order, validation first (the behaviour before shuffling).
    assert documents(off, "val", gpt2_ranks) + documents(off, "train", gpt2_ranks) == kept
    assert moff["order"]["shuffle_seed"] is None and moff["config"]["shuffle_seed"] == -1


def test_a_changed_seed_is_refused_on_a_finished_dataset_naming_it(corpus, builds, gpt2_ranks):
    src, _ = corpus
    out, _ = builds[1234]
    before = tree_digest(out)
    with pytest.raises(DataError, match=re.escape("shuffle_seed 1234 -> 99")):
        run_data_stage(data_cfg(src, out, gpt2_ranks, **{**SETTINGS, "shuffle_seed": 99}), RayConfig())
    assert tree_digest(out) == before


def test_one_worker_killed_in_the_shard_wave_resumes_to_the_bytes_of_two_workers(corpus, builds, tmp_path, gpt2_ranks):
    """A different worker count and a SIGKILL while shards are written: the same bytes as the reference."""
    src, _ = corpus
    ref, _ = builds[1234]
    out = tmp_path / "killed"
    cfg = write_config(tmp_path / "k.yaml", src, out, gpt2_ranks, 1, **SETTINGS)
    sigkill_data_run(cfg, out, "shards", 1)
    r = run_cli("data", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    assert tree_digest(out) == tree_digest(ref)
    assert json.loads((out / "manifest.json").read_text())["config"]["shuffle_seed"] == 1234


# --- the packing order alone (no Ray) ---------------------------------------------------------


def test_split_order_samples_val_then_permutes_the_rest():
    lengths = np.random.default_rng(0).integers(1, 500, 5000)
    val, train = split_order(lengths, 40_000, 1234)
    assert sorted(np.concatenate([val, train]).tolist()) == list(range(5000))
    assert lengths[val].sum() >= 40_000 and lengths[val[:-1]].sum() < 40_000  # the smallest sample that holds val_tokens
    assert not np.array_equal(train, np.sort(train))
    val2, train2 = split_order(lengths, 40_000, 1234)
    assert np.array_equal(val, val2) and np.array_equal(train, train2)  # a function of the seed only
    val7, train7 = split_order(lengths, 40_000, 7)
    assert not np.array_equal(val, val7[: len(val)]) and not np.array_equal(train[:100], train7[:100])
    off_val, off_train = split_order(lengths, 40_000, -1)
    assert np.array_equal(np.concatenate([off_val, off_train]), np.arange(5000))


def test_shuffled_shards_respect_the_size_limit_and_hold_every_token_once():
    rng = np.random.default_rng(1)
    lengths = [rng.integers(1, 300, n) for n in (40, 0, 75, 13)]
    plans = pack_documents(lengths, shard_tokens=1000, val_tokens=3000, shuffle_seed=5)
    covered = [(int(c), t) for p in plans for c, a, b in p.pieces for t in range(a, b)]
    assert sorted(covered) == [(c, t) for c, l in enumerate(lengths) for t in range(int(l.sum()))]
    assert all(0 < p.tokens <= 1000 and p.tokens == int((p.pieces[:, 2] - p.pieces[:, 1]).sum()) for p in plans)
    assert sum(p.docs for p in plans) == sum(len(l) for l in lengths)
    assert [p.split for p in plans] == sorted((p.split for p in plans), key=lambda s: s != "val")


def test_a_bad_shuffle_seed_is_refused_when_the_config_loads():
    from pipelines.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape("data.shuffle_seed must be -1 (off, corpus order) or between 0 and 2**63-1, got -2")):
        load_config(REPO / "configs" / "smoke.yaml", ["data.shuffle_seed=-2"])
    assert load_config(REPO / "configs" / "smoke.yaml", ["data.shuffle_seed=-1"]).data.shuffle_seed == -1
