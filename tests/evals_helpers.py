"""Helpers of the eval tests: HellaSwag-format rows, a tiny trained run, a real MLflow server."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.services import free_port, mlflow_server  # noqa: F401 - re-exported for the eval tests
from tests.trainer_helpers import kill_tree, make_shard_dir, pretrain_cmd, start

WORDS = (
    "the man woman dog kitchen ball table slowly quickly then rope water car road pan knife bread "
    "paint wall ladder camera guitar song field horse child chair window shoe bike garden tree "
    "runs jumps holds takes puts looks walks talks opens cuts washes throws smiles turns"
).split()
ACTIVITIES = ["Cooking", "Painting", "Playing guitar", "Riding a bike", "Home and Garden"]


def hellaswag_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows in the public jsonl format (int label), some with WikiHow-style `[title]` artefacts."""
    rng = random.Random(seed)

    def sentence(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    rows = []
    for i in range(n):
        ctx_a = sentence(rng.randint(4, 40)).capitalize() + "."
        if i % 5 == 0:
            ctx_a = "[header] How to " + sentence(3) + " [title] " + ctx_a
        ctx_b = sentence(rng.randint(1, 4))
        endings = [sentence(rng.randint(1, 14)) + "." for _ in range(4)]
        rows.append({
            "ind": i,
            "activity_label": rng.choice(ACTIVITIES),
            "ctx_a": ctx_a,
            "ctx_b": ctx_b,
            "ctx": ctx_a + " " + ctx_b,
            "endings": endings,
            "source_id": f"test~{i}",
            "split": "val",
            "split_type": "indomain",
            "label": rng.randrange(4),
        })
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TRAIN_CONFIG = """\
run_dir: {run_dir}
data:
  output_dir: {data_dir}
model:
  name: micro
train:
  nproc_per_node: 1
  device: cpu
  micro_batch_size: 4
  seq_len: 32
  batch_tokens: 128
  max_steps: 4
  warmup_steps: 1
  lr: 3.0e-3
  min_lr: 3.0e-4
  val_every: 0
  sample_every: 0
  ckpt_every: 2
  keep_last: 5
eval:
  hellaswag_path: {hellaswag}
  device: cpu
  batch_size: 8
  max_parallel: 1
  poll_s: 1
tracking:
  uri: {uri}
  experiment: evals-test
"""


def train_tiny_run(workdir: Path, hellaswag: Path, uri: str, timeout: float = 180) -> tuple[Path, Path]:
    """Train the micro model for 4 steps (checkpoints at 2 and 4); returns (run_dir, config)."""
    data_dir = make_shard_dir(workdir / "data", seed=0, train_shards=1, shard_tokens=3000, val_tokens=600)
    run_dir = workdir / "run"
    config = workdir / "run.yaml"
    config.write_text(TRAIN_CONFIG.format(run_dir=run_dir, data_dir=data_dir, hellaswag=hellaswag, uri=uri))
    log = workdir / "train.log"
    proc = start(pretrain_cmd("train", str(config)), log)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        kill_tree(proc)
    assert rc == 0, log.read_text()[-3000:]
    return run_dir, config


def run_cli(*args: str, log: Path, timeout: float = 240, env: dict | None = None) -> tuple[int, str]:
    """Run `pretrain ARGS` to completion; returns (exit code, this run's output)."""
    before = log.stat().st_size if log.exists() else 0
    proc = start(pretrain_cmd(*args), log, env)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        kill_tree(proc)
    with open(log, "rb") as f:
        f.seek(before)
        return rc, f.read().decode(errors="replace")


