"""A small shard directory of real GPT-2 tokens from local text, without Ray (for a bare GPU machine).

    python bench/text_shards.py OUT_DIR ../shared/data/tinyshakespeare.txt --python-docs

The data stage (``pretrain data``) is the way to build a dataset; this script exists because a
benchmark machine may lack Ray and the network, yet a checkpoint worth evaluating needs real
text. Each text file is split into documents at blank-line runs (``--doc-lines`` lines each),
``--python-docs`` adds the standard library's docstrings (the smoke config's built-in corpus),
documents are tokenised with the GPT-2 BPE (``dataprep.tokenizer.get_gpt2``) and joined with EOT,
and the first ``--val-tokens`` go to a val shard. The output is the data stage's contract
(``manifest.json`` of uint16 shards with sha256), so the trainer reads it like any dataset.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.durable import atomic_write_json  # noqa: E402
from dataprep.shards import write_shard  # noqa: E402
from dataprep.tokenizer import EOT_TOKEN, get_gpt2  # noqa: E402


def text_documents(path: Path, doc_lines: int) -> list[str]:
    """``path`` cut into documents of about ``doc_lines`` non-empty lines, at paragraph ends."""
    docs, current = [], []
    for paragraph in path.read_text(encoding="utf-8").split("\n\n"):
        current.append(paragraph.strip())
        if sum(p.count("\n") + 1 for p in current) >= doc_lines:
            docs.append("\n\n".join(current))
            current = []
    if current:
        docs.append("\n\n".join(current))
    return [d for d in docs if d]


def python_docs() -> list[str]:
    import pyarrow.parquet as pq

    from dataprep.sources import build_python_docs_corpus

    with tempfile.TemporaryDirectory() as tmp:
        return pq.read_table(build_python_docs_corpus(Path(tmp) / "docs.parquet")).column("text").to_pylist()


def build(out: Path, docs: list[str], val_tokens: int) -> dict:
    enc = get_gpt2()
    tokens = np.concatenate([np.array([EOT_TOKEN] + enc.encode_ordinary(d), dtype=np.uint16) for d in docs])
    if len(tokens) <= 2 * val_tokens:
        raise SystemExit(f"text_shards: only {len(tokens):,} tokens; need more than {2 * val_tokens:,}")
    out.mkdir(parents=True, exist_ok=False)
    shards = []
    for name, split, part in (("val_000000.bin", "val", tokens[:val_tokens]), ("train_000000.bin", "train", tokens[val_tokens:])):
        n, sha = write_shard(out / name, [part])
        shards.append({"path": name, "split": split, "tokens": n, "docs": int((part == EOT_TOKEN).sum()), "sha256": sha})
    manifest = {"format": "pretrain-token-shards", "format_version": 1,
                "tokenizer": {"name": "gpt2", "eot_token": EOT_TOKEN}, "shards": shards,
                "note": f"bench/text_shards.py: {len(docs)} documents of local text"}
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="new shard directory (must not exist)")
    ap.add_argument("texts", nargs="*", type=Path, help="UTF-8 text files")
    ap.add_argument("--python-docs", action="store_true", help="add the standard library's docstrings")
    ap.add_argument("--doc-lines", type=int, default=40, help="lines per document cut from a text file")
    ap.add_argument("--val-tokens", type=int, default=65_536)
    args = ap.parse_args()
    if args.out.exists():
        print(f"text_shards: error: {args.out} exists; give a new directory", file=sys.stderr)
        return 2
    docs = [d for t in args.texts for d in text_documents(t, args.doc_lines)]
    if args.python_docs:
        docs += python_docs()
    manifest = build(args.out, docs, args.val_tokens)
    print(f"text_shards: {args.out}: " + ", ".join(f"{s['split']} {s['tokens']:,} tokens" for s in manifest["shards"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
