"""Benchmark: peak memory of one tokenize task, before (Python token lists) and after (streamed numpy batches).

Goal (issue 12): a tokenize worker holds <= 0.5 GB at the default ``data.chunk_docs`` (20,000),
whatever the corpus size. Each side runs in a fresh Python process on the same chunk (by default
20,000 documents of ~4 KB of English from the Python documentation) and reports its peak RSS
(VmHWM) and its RSS after imports and tokenizer load; the two token files must be byte-identical.

    python bench/tokenize_memory.py [--docs 20000] [--doc-chars 4000] [--tokenizer-file F]

"before" is the task body as it was up to commit 0e48de4 (read the chunk as one Arrow table and a
list of Python bytes, ``encode_ordinary_batch`` into lists of ints, concatenate with ``np.fromiter``,
filter, cast, write),
kept here as the baseline; "after" is ``dataprep.pipeline.task_tokenize`` itself.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/dataprep.py shares its name with the `dataprep` package: keep bench/ off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def make_chunk(path: Path, docs: int, doc_chars: int) -> None:
    """``docs`` documents of ``doc_chars`` characters of English (the stdlib docs, cut and marked)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataprep.sources import build_python_docs_corpus

    text = "\n\n".join(pq.read_table(build_python_docs_corpus(path.with_name("base.parquet"))).column("text").to_pylist())
    starts = itertools.cycle(range(0, len(text) - doc_chars, doc_chars))
    texts = [f"[doc {i}] " + text[s : s + doc_chars] for i, s in zip(range(docs), starts)]
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(docs)], "text": texts}), path, row_group_size=1000)


def before(src, chunk, cfg, out: Path) -> None:
    """The pre-change task body (this chunk has no invalid rows or duplicates to drop), reading as the
    reader did then: the whole chunk as one Arrow table and one list of Python bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataprep.tokenizer import get_gpt2

    pf = pq.ParquetFile(src.path)
    table = pf.read_row_groups(range(pf.metadata.num_row_groups), columns=[cfg.text_column, cfg.id_column])
    raw = table.column(cfg.text_column).cast(pa.binary()).to_pylist()
    texts = [r.decode("utf-8") for r in raw]
    enc = get_gpt2(cfg.tokenizer_file)
    encoded = enc.encode_ordinary_batch(texts, num_threads=1)
    lengths = np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.fromiter(itertools.chain.from_iterable(itertools.chain((enc.eot_token,), e) for e in encoded),
                         dtype=np.uint16, count=int(lengths.sum()))
    too_long = lengths > cfg.shard_tokens
    if too_long.any():
        tokens = tokens[np.repeat(~too_long, lengths)]
    tokens.astype("<u2").tofile(out / "000000.bin")


def child(side: str, parquet: Path, work: Path, ranks: str) -> None:
    from dataprep.config import DataConfig
    from dataprep.documents import Chunk
    from dataprep.pipeline import task_tokenize
    from dataprep.sources import describe_local
    from dataprep.tokenizer import get_gpt2

    get_gpt2(ranks)  # loaded before the baseline reading: both sides hold it
    src = describe_local(parquet.name, str(parquet))
    import pyarrow.parquet as pq

    chunk = Chunk(0, 0, 0, pq.ParquetFile(parquet).metadata.num_rows, 0)
    cfg = DataConfig(source=str(parquet.parent), output_dir=str(work), tokenizer_file=ranks)
    (work / "tokens").mkdir(parents=True)
    empty = np.zeros(0, np.int64)
    base = rss_mb("VmRSS")
    t0 = time.perf_counter()
    if side == "before":
        before(src, chunk, cfg, work / "tokens")
    else:
        task_tokenize(src, chunk, cfg, empty, np.zeros((0, 2), np.int64), empty, work)
    seconds = time.perf_counter() - t0
    print(json.dumps({"base_mb": base, "peak_mb": rss_mb("VmHWM"), "seconds": seconds}))


def run_side(side: str, parquet: Path, work: Path, ranks: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", side, str(parquet), str(work), ranks],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        sys.exit(f"{side}: failed\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=20_000, help="documents in the chunk (default: data.chunk_docs)")
    ap.add_argument("--doc-chars", type=int, default=4000)
    ap.add_argument("--tokenizer-file", default="", help="GPT-2 ranks file (default: the usual lookup)")
    ap.add_argument("--child", nargs=4, metavar=("SIDE", "PARQUET", "WORK", "RANKS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        side, parquet, work, ranks = args.child
        return child(side, Path(parquet), Path(work), ranks)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        parquet = tmp / "src" / "chunk.parquet"
        parquet.parent.mkdir()
        make_chunk(parquet, args.docs, args.doc_chars)
        results = {side: run_side(side, parquet, tmp / side, args.tokenizer_file) for side in ("before", "after")}
        old, new = (tmp / s / "tokens" / "000000.bin" for s in ("before", "after"))
        identical = old.read_bytes() == new.read_bytes()
        tokens = old.stat().st_size // 2
    mb = args.docs * args.doc_chars / 1e6
    print(f"chunk: {args.docs} docs, {mb:.0f} MB of text, {tokens / 1e6:.2f} M tokens")
    for side, r in results.items():
        extra = r["peak_mb"] - r["base_mb"]
        print(f"{side:6s}: peak RSS {r['peak_mb']:7.1f} MB (after imports {r['base_mb']:6.1f} MB; "
              f"+{extra:6.1f} MB = {extra * 2**20 / tokens:5.1f} B/token), {r['seconds']:.2f} s")
    print(f"ratio peak before/after: {results['before']['peak_mb'] / results['after']['peak_mb']:.2f}x; "
          f"token files identical: {identical}")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
