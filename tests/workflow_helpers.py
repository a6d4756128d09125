"""A tiny but complete workflow config (real corpus → Ray → torchrun → evals → report) for tests."""

from __future__ import annotations

import json
from pathlib import Path

from tests.corpus import make_corpus
from tests.evals_helpers import hellaswag_rows, write_jsonl

CONFIG = """\
run_dir: {run_dir}
data:
  source: {corpus}
  output_dir: {data_dir}
  tokenizer_file: {ranks}
  cache_dir: {work}/cache
  chunk_docs: 100
  minhash_buckets: 8
  minhash_hashes_per_bucket: 4
  shard_tokens: 30000
  val_tokens: 4000
ray:
  num_cpus: 2
model:
  name: micro
train:
  nproc_per_node: 2
  device: cpu
  micro_batch_size: 4
  seq_len: 32
  batch_tokens: 256
  max_steps: 12
  warmup_steps: 2
  val_every: 6
  val_batches: 2
  sample_every: 0
  ckpt_every: 6
  keep_last: 4
eval:
  hellaswag_path: {hellaswag}
  data_source: local
  batch_size: 8
  device: cpu
  max_parallel: 1
  poll_s: 1
  slurm:
    gpus: 0
    cpus: 1
    time: "10:00"
tracking:
  experiment: workflow-test
slurm:
  nodes: 1
  gpus_per_node: 0
  cpus_per_task: 2
  time: "10:00"
  signal_delay_s: 15
"""


def make_inputs(work: Path) -> tuple[Path, Path]:
    """(corpus dir, hellaswag jsonl) shared by the workflow runs of a test module."""
    corpus = work / "corpus"
    if not corpus.exists():
        make_corpus(corpus, n_unique=400, n_exact=20, n_near=20, n_files=2, seed=7)
    hellaswag = work / "hellaswag.jsonl"
    if not hellaswag.exists():
        write_jsonl(hellaswag, hellaswag_rows(12, seed=7))
    return corpus, hellaswag


def write_config(work: Path, name: str, ranks: str, data_name: str | None = None) -> tuple[Path, Path]:
    corpus, hellaswag = make_inputs(work)
    run_dir = work / "runs" / name
    cfg = work / f"{name}.yaml"
    cfg.write_text(CONFIG.format(run_dir=run_dir, corpus=corpus, data_dir=work / "data" / (data_name or name), ranks=ranks,
                                 work=work, hellaswag=hellaswag))
    return cfg, run_dir


def final_metrics(run_dir: Path) -> dict:
    """What must not depend on interruptions: every step's loss and every checkpoint's eval metrics."""
    from trainer.metrics import read_metrics

    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}
    evals = {}
    for f in sorted((run_dir / "evals").glob("step_*/*.json")):
        evals[f"{f.parent.name}/{f.stem}"] = json.loads(f.read_text())["metrics"]
    return {"losses": losses, "evals": evals}


def stage_status(run_dir: Path) -> dict[str, str]:
    path = run_dir / "workflow.json"
    if not path.is_file():
        return {}
    try:
        return {k: v["status"] for k, v in json.loads(path.read_text())["stages"].items()}
    except (ValueError, KeyError):
        return {}
