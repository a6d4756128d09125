"""dataprep.minhash against datatrove's MinhashDedupSignature: the same signature files, bit for bit.

The documents are built to reach every path of the fast implementation: pure ASCII, sparse and
dense non-ASCII (accents, combining marks, Greek final sigma, CJK, Arabic-Indic and fullwidth
digits, curly quotes, non-breaking and ideographic spaces, C1 controls, characters NFD turns into
punctuation, combining marks NFD reorders, kept or dropped), documents with fewer words than an
n-gram, documents that normalise to nothing, and words long enough that a shingle needs a second
SHA-1 block.
"""

from __future__ import annotations

import hashlib
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from datatrove.data import Document
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
from loguru import logger

from dataprep import dedup, minhash
from dataprep.config import DataConfig
from tests.corpus import WORDS, english_doc, near_copy

logger.disable("datatrove")

SPECIALS = [
    "é", "è", "ç", "ñ", "ø", "ß", "Æ", "Œ", "ü", "İ", "ﬁ", "e\u0301", "a\u0308\u0327", "ΑΣ", "σας", "Σ", "яблоко", "中文字符",
    "한국", "٣٤٫٥", "١٢", "１２", "3,5", "4.25", "²", "Ⅻ", "“", "”", "‘", "’", "—", "–", "…", "«", "»", "\u00a0", "\u2009",
    "\u3000", "\u2000", "\x85", "\x9f", "\x7f", "\u037e", "\u1fef", "🙂", "_", "a_b", "x+y", "\t", "\n\n", "\r\n", "\udc80",
]  # fmt: skip
# NFD reorders these combining marks (canonical classes 226 > 216, 230 > 220): spacing ones survive
# the normalisation (as word separators), nonspacing ones are dropped; U+1D15F decomposes into a
# note and a spacing mark
REORDERED = ["\U0001d16d\U0001d165", "a\u0301\u0316", "\U0001d15f\U0001d16d", "\u1734"]


def unicode_doc(rng: random.Random, n_words: int, marks: bool = False) -> str:
    """English words with non-ASCII pieces and punctuation mixed in (or glued on)."""
    parts = []
    for _ in range(n_words):
        word = rng.choice(WORDS)
        if rng.random() < 0.3:
            special = rng.choice(SPECIALS)
            word = rng.choice([special, word + special, special + word, word.capitalize() + special + word])
        parts.append(word)
    if marks:
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(WORDS) + rng.choice(REORDERED) + rng.choice(["", "x"]))
    return rng.choice([" ", "  ", " , "]).join(parts) + rng.choice(["", ".", " !", "\n"])


def corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = [english_doc(rng, rng.randint(2, 12)) for _ in range(120)]  # pure ASCII
    docs += [unicode_doc(rng, rng.randint(5, 200)) for _ in range(150)]
    docs += [unicode_doc(rng, rng.randint(20, 60), marks=True) for _ in range(8)]
    docs += ["", " ", "!!! ... ??? ---", "“…” — «»", "\u0301\u0308", "one two three four", "a b c d e", "ÉTÉ été"]  # < 5 words, or none
    long_word = "".join(rng.choice("abcdefghij") for _ in range(70))
    docs += [f"{long_word} and {long_word}x then more words follow here {long_word}y and so on to the end" for _ in range(3)]
    docs += [near_copy(rng, docs[i]) for i in range(0, 40, 4)]
    rng.shuffle(docs)
    return docs


def datatrove_files(docs: list[str], out: Path, rank: int = 3) -> dict[str, bytes]:
    cfg = DataConfig()
    step = MinhashDedupSignature(output_folder=str(out), config=dedup.minhash_config(cfg), language=dedup.RegexWordTokenizer())
    step.run((Document(text=t, id=str(i)) for i, t in enumerate(docs)), rank=rank, world_size=8)
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.minhash.sig"))}


def our_files(docs: list[str], out: Path, batch_docs: int, rank: int = 3) -> dict[str, bytes]:
    signer = minhash.MinhashSigner(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=1)
    minhash.write_signatures(iter(docs), rank, out, signer, batch_docs=batch_docs)
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("batch_docs", [1000, 7])  # one vectorised batch; many batches too small for numpy SHA-1
def test_signature_files_equal_datatrove(tmp_path, batch_docs):
    docs = corpus()
    theirs = datatrove_files(docs, tmp_path / "datatrove")
    ours = our_files(docs, tmp_path / "ours", batch_docs)
    assert len(theirs) == 14 and ours.keys() == theirs.keys()  # and no temp files left behind
    for name in theirs:
        assert ours[name] == theirs[name], name
    n_records = len(theirs["bucket_000/00003.minhash.sig"]) // (8 * 8 + 4)
    assert 0 < n_records < len(docs)  # documents without a shingle have no record, as in datatrove


def test_empty_chunk_writes_empty_files(tmp_path):
    assert datatrove_files(["", "two words"], tmp_path / "d") == our_files(["", "two words"], tmp_path / "o", 10)
    assert our_files([], tmp_path / "none", 10) == {f"bucket_{b:03d}/00003.minhash.sig": b"" for b in range(14)}


def test_words_equal_datatrove_normalisation():
    rng = random.Random(1)
    docs = [unicode_doc(rng, rng.randint(0, 40), marks=rng.random() < 0.1) for _ in range(1500)]
    for doc in docs:
        assert minhash.words(doc) == minhash.exact_words(doc), repr(doc)
    batch = minhash.normalised_batch(docs)
    assert [line.split() for line in batch.split(b"\n")[:-1]] == [minhash.exact_words(d) for d in docs]


def test_sha1_u64_equals_hashlib():
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    lengths = np.concatenate([np.arange(0, 140), rng.integers(0, 60, 6000)])  # 55/56: one block / two
    starts = rng.integers(0, len(data) - 140, len(lengths))
    expected = [struct.unpack("<Q", hashlib.sha1(data[s : s + n]).digest()[:8])[0] for s, n in zip(starts, lengths)]
    assert minhash.sha1_u64(data, starts, starts + lengths).tolist() == expected
    assert minhash.sha1_u64(data, starts[:50], starts[:50] + lengths[:50]).tolist() == expected[:50]  # hashlib path


def test_mersenne_reduction_wraps_like_datatrove(tmp_path):
    """A shingle whose permuted value lands in [p, 2**61 + 6] after the fast reduction (never seen in
    real data) is still reduced mod p exactly as datatrove's ``%`` does."""
    signer = minhash.MinhashSigner(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=1)
    j = int(np.flatnonzero(signer.a.ravel() % 2 == 1)[0])  # an odd multiplier is invertible mod 2**64
    a, b = int(signer.a[j, 0]), int(signer.b[j, 0])
    h = ((2**64 - 1 - b) * pow(a, -1, 2**64)) % 2**64  # a*h + b = 2**64 - 1 (mod 2**64): (x & p) + (x >> 61) = p + 7
    hashes = np.array([h, 12345, 2**63 + 5], np.uint64)
    step = MinhashDedupSignature(output_folder=str(tmp_path), config=dedup.minhash_config(DataConfig()), language=dedup.RegexWordTokenizer())
    expected = np.concatenate(step.get_signature(hashes.reshape(-1, 1)))
    got = signer.min_permuted(hashes, np.array([0, 3]))[:, 0]
    assert got[j] == 7 and np.array_equal(got, expected)


def test_stage_blocks_find_the_same_pairs(tmp_path):
    """Buckets + clusters over our signature files give the data stage the same near-duplicate
    removals as over datatrove's (two chunks, so pairs across files count too)."""
    rng = random.Random(3)
    originals = [english_doc(rng, rng.randint(10, 16)) for _ in range(60)]
    chunks = [originals[:30] + [near_copy(rng, t) for t in originals[30:40]], originals[30:] + [near_copy(rng, t) for t in originals[:10]]]
    cfg = DataConfig()
    removed = {}
    for side in ("datatrove", "ours"):
        work = tmp_path / side
        for rank, docs in enumerate(chunks):
            if side == "datatrove":
                step = MinhashDedupSignature(output_folder=str(work / "sigs"), config=dedup.minhash_config(cfg), language=dedup.RegexWordTokenizer())
                step.run((Document(text=t, id=str(i)) for i, t in enumerate(docs)), rank=rank, world_size=2)
            else:
                dedup.write_signatures(docs, rank, 2, work / "sigs", cfg)
        for bucket in range(cfg.minhash_buckets):
            dedup.find_bucket_matches(bucket, work / "sigs", work / "dups", cfg)
        dedup.cluster_duplicates(work / "dups", work / "clusters", cfg)
        removed[side] = [r.tolist() for r in dedup.near_duplicates(work / "clusters", len(chunks))]
    assert removed["ours"] == removed["datatrove"]
    # corpus order keeps the earliest member of each cluster: chunk 0's near copies (positions 30..39)
    # come before their originals in chunk 1 (positions 0..9); chunk 1's near copies (30..39) of
    # chunk 0's first documents go
    assert removed["ours"] == [[], list(range(0, 10)) + list(range(30, 40))]


@pytest.mark.parametrize("slice_records", [minhash.SLICE_RECORDS, 7])  # one merge; many hash ranges
def test_bucket_pairs_equal_datatrove(tmp_path, monkeypatch, slice_records):
    """Three ranks (one empty) whose documents repeat within and across files, exactly and nearly:
    the .dups files equal those of datatrove's MinhashDedupBuckets, bucket by bucket."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets

    rng = random.Random(4)
    docs = [english_doc(rng, rng.randint(8, 14)) for _ in range(40)]
    ranks = [docs[:25] + docs[:3] + [near_copy(rng, d) for d in docs[20:30]], [], docs[10:40] + docs[:5]]
    cfg = DataConfig()
    for rank, texts in enumerate(ranks):
        dedup.write_signatures(texts, rank, len(ranks), tmp_path / "sigs", cfg)
    monkeypatch.setattr(minhash, "SLICE_RECORDS", slice_records)
    total = 0
    for bucket in range(cfg.minhash_buckets):
        step = MinhashDedupBuckets(input_folder=str(tmp_path / "sigs"), output_folder=str(tmp_path / "theirs"), config=dedup.minhash_config(cfg))
        step.run(None, rank=bucket, world_size=cfg.minhash_buckets)
        dedup.find_bucket_matches(bucket, tmp_path / "sigs", tmp_path / "ours", cfg)
        name = f"{bucket:05d}_00.dups"
        theirs = (tmp_path / "theirs" / name).read_bytes()
        assert (tmp_path / "ours" / name).read_bytes() == theirs, bucket
        # identical documents agree in every bucket: docs 0-2 occur 3 times (2 pairs each), docs
        # 3-4 and 10-24 twice (1 pair each)
        assert len(theirs) // 16 >= 23, bucket
        total += len(theirs) // 16
    assert total > 23 * cfg.minhash_buckets  # and the near copies in some buckets
