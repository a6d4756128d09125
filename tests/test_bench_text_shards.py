"""bench/text_shards.py (real GPT-2 tokens for a GPU bench machine without Ray): its output is a
shard directory the trainer opens and verifies, holding exactly the text's tokens, EOT-separated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from dataprep.shards import TokenDataset

REPO = Path(__file__).resolve().parents[1]


def test_text_shards_writes_a_verified_dataset_of_the_texts_tokens(tmp_path, gpt2_ranks):
    from dataprep.tokenizer import EOT_TOKEN, get_gpt2

    paragraphs = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog, café {i}." for i in range(400)]
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(paragraphs), encoding="utf-8")
    out = tmp_path / "data"
    cmd = [sys.executable, "bench/text_shards.py", str(out), str(text), "--doc-lines", "10", "--val-tokens", "500"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    ds = TokenDataset(out, vocab_size=50304)
    ds.verify()  # headers, sizes and sha256 of every shard
    (val,), (train,) = ds.split("val"), ds.split("train")
    tokens = np.concatenate([np.asarray(ds.tokens(val)), np.asarray(ds.tokens(train))])
    assert len(ds.tokens(val)) == 500
    docs = [enc_doc for enc_doc in np.split(tokens, np.flatnonzero(tokens == EOT_TOKEN)) if len(enc_doc)]
    enc = get_gpt2()
    assert len(docs) == 40  # 400 paragraphs, 10 per document
    assert "\n\n".join(enc.decode(d[1:].tolist()) for d in docs) == text.read_text(encoding="utf-8")

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr  # an existing directory is never overwritten
    assert TokenDataset(out).manifest == ds.manifest
