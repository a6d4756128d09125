"""Benchmark: the data stage's tokenize+shard waves vs raw tiktoken on the same documents.

Both sides get the same number of threads (Ray workers vs `encode_ordinary_batch` threads) and
the same documents; the ratio of their tokens/s is what the pipeline costs on top of tiktoken
(reading parquet, filtering, EOT insertion, writing chunk token files and shards, scheduling).

    python bench/dataprep.py --mb 40 --workers 2

The corpus is the stdlib-docs corpus that ships with Python, repeated (with a per-copy marker so
documents stay distinct) up to the requested size; dedup is off since it is not what is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# This file shares its name with the `dataprep` package: drop bench/ from the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from dataprep import pipeline  # noqa: E402
from dataprep.config import DataConfig  # noqa: E402
from dataprep.sources import build_python_docs_corpus  # noqa: E402
from dataprep.tokenizer import check_gpt2, get_gpt2  # noqa: E402


def make_corpus(directory: Path, megabytes: float, files: int) -> list[str]:
    base = pq.read_table(build_python_docs_corpus(directory / "base.parquet")).column("text").to_pylist()
    texts: list[str] = []
    copy = 0
    while sum(map(len, texts)) < megabytes * 1e6:
        texts.extend(f"[copy {copy}] {t}" for t in base)
        copy += 1
    per = -(-len(texts) // files)
    for f in range(files):
        part = texts[f * per : (f + 1) * per]
        pq.write_table(pa.table({"text": part}), directory / f"part_{f:03d}.parquet", row_group_size=1000)
    (directory / "base.parquet").unlink()
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=40.0, help="corpus size in MB of text (>= 10)")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers = tiktoken threads")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--chunk-docs", type=int, default=4000)
    ap.add_argument("--tokenizer-file", default="", help="GPT-2 ranks file (default: the usual lookup)")
    args = ap.parse_args()

    enc = get_gpt2(args.tokenizer_file)
    ranks = check_gpt2(enc)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        texts = make_corpus(tmp / "src", args.mb, args.files)
        mb = sum(len(t.encode()) for t in texts) / 1e6

        # Baseline: raw tiktoken over the same documents, same thread count.
        t0 = time.perf_counter()
        encoded = enc.encode_ordinary_batch(texts, num_threads=args.workers)
        raw_s = time.perf_counter() - t0
        n_tokens = sum(len(e) for e in encoded) + len(texts)  # + one EOT per document, as the pipeline writes
        del encoded

        import ray

        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING")
        cfg = DataConfig(source=str(tmp / "src"), output_dir=str(tmp / "out"), tokenizer_file=args.tokenizer_file,
                         chunk_docs=args.chunk_docs, exact_dedup=False, minhash_dedup=False,
                         shard_tokens=5_000_000, val_tokens=0)
        waves = pipeline._Waves()
        manifest = pipeline._build(cfg, ranks, waves)
        ray.shutdown()
        stage_s = waves.seconds["tokenize"] + waves.seconds["shards"]
        total = manifest["stats"]["tokens"]["train"]
        assert total == n_tokens, (total, n_tokens)

    raw_tps, stage_tps = n_tokens / raw_s, n_tokens / stage_s
    print(f"corpus: {len(texts)} docs, {mb:.1f} MB, {n_tokens} tokens; {args.workers} workers/threads; cpus {os.cpu_count()}")
    print(f"raw encode_ordinary_batch : {raw_tps / 1e6:6.3f} M tokens/s ({raw_s:.2f} s)")
    print(f"tokenize+shard stage      : {stage_tps / 1e6:6.3f} M tokens/s ({stage_s:.2f} s: tokenize {waves.seconds['tokenize']:.2f} + shards {waves.seconds['shards']:.2f})")
    print(f"ratio stage/raw           : {stage_tps / raw_tps:.3f}  (target >= 0.9)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
