"""Deduplication: exact (hash of normalised text) across the whole corpus, then MinHash near-dedup.

Exact dedup keeps the first occurrence in corpus order (source file order, then row order) and
records which document each removed one duplicated. MinHash uses datatrove's four dedup blocks
(signature → buckets → cluster → remove lists) with each chunk as a datatrove "rank", so a chunk's
signatures and remove list are its own files and every block can run as independent Ray tasks.
The signature and bucket blocks are :mod:`dataprep.minhash`: the same files as datatrove's
``MinhashDedupSignature`` and ``MinhashDedupBuckets``, bit for bit, computed several times faster.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupCluster
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from common.durable import atomic_write_bytes
from dataprep import minhash
from dataprep.config import DataConfig


def exact_key(text: str) -> int:
    """64-bit hash of the text with case and whitespace normalised (so re-wrapped copies match)."""
    normalised = " ".join(text.lower().split())
    return int.from_bytes(hashlib.blake2b(normalised.encode("utf-8"), digest_size=8).digest(), "little")


def find_exact_duplicates(hashes: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """For each chunk's array of doc hashes: a boolean "is a later copy" mask and, for those, the
    global position (chunk, index-in-chunk) of the first copy."""
    sizes = np.array([len(h) for h in hashes], dtype=np.int64)
    flat = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    first_of = first[inverse]
    is_dup = first_of != np.arange(len(flat))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    chunk_of = np.searchsorted(offsets, first_of, side="right") - 1
    masks, origins = [], []
    for c in range(len(hashes)):
        sl = slice(offsets[c], offsets[c + 1])
        masks.append(is_dup[sl])
        origins.append(np.stack([chunk_of[sl], first_of[sl] - offsets[chunk_of[sl]]], axis=1)[is_dup[sl]])
    return masks, origins


class RegexWordTokenizer(WordTokenizer):
    """Words for shingling: runs of letters/digits. Language-agnostic and dependency-free
    (datatrove's default English tokenizer needs spaCy, which this pipeline does not)."""

    _word = re.compile(r"\w+", re.UNICODE)
    _sentence = re.compile(r"[^.!?]+[.!?]*")

    def __init__(self) -> None:
        super().__init__("und")

    def word_tokenize(self, text: str) -> list[str]:
        return self._word.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s.strip() for s in self._sentence.findall(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in self._sentence.finditer(text)]


def minhash_config(cfg: DataConfig) -> MinhashConfig:
    return MinhashConfig(
        n_grams=cfg.minhash_ngrams,
        num_buckets=cfg.minhash_buckets,
        hashes_per_bucket=cfg.minhash_hashes_per_bucket,
        seed=cfg.minhash_seed,
        # sha1 keeps results independent of the installed xxhash version
        hash_config=HashConfig(precision=64, hash_fc="sha1"),
    )


def _quiet_datatrove() -> None:
    from loguru import logger

    logger.disable("datatrove")


@functools.lru_cache(maxsize=4)
def _signer(n_grams: int, num_buckets: int, hashes_per_bucket: int, seed: int) -> minhash.MinhashSigner:
    return minhash.MinhashSigner(n_grams, num_buckets, hashes_per_bucket, seed)


def write_signatures(texts: Iterable[str], chunk_index: int, n_chunks: int, sig_dir: Path, cfg: DataConfig) -> None:
    """Block 1: signatures of one chunk's documents (doc ids = position in ``texts``), the files
    datatrove's ``MinhashDedupSignature`` (with :func:`minhash_config` and
    :class:`RegexWordTokenizer`) would write as rank ``chunk_index`` of ``n_chunks``."""
    signer = _signer(cfg.minhash_ngrams, cfg.minhash_buckets, cfg.minhash_hashes_per_bucket, cfg.minhash_seed)
    minhash.write_signatures(texts, chunk_index, sig_dir, signer)


def find_bucket_matches(bucket: int, sig_dir: Path, dups_dir: Path, cfg: DataConfig) -> None:
    """Block 2: candidate duplicate pairs within one LSH bucket: the file datatrove's
    ``MinhashDedupBuckets`` (one worker per bucket) writes, computed with numpy."""
    dups_dir.mkdir(parents=True, exist_ok=True)
    pairs = minhash.bucket_pairs(sig_dir, bucket, cfg.minhash_hashes_per_bucket)
    atomic_write_bytes(dups_dir / f"{bucket:05d}_00.dups", pairs)


def cluster_duplicates(dups_dir: Path, cluster_dir: Path, cfg: DataConfig) -> None:
    """Block 3: union-find over all candidate pairs, saving every member's cluster id."""
    _quiet_datatrove()
    step = MinhashDedupCluster(input_folder=str(dups_dir), output_folder=str(cluster_dir), config=minhash_config(cfg), save_cluster_id=True)
    step.run(None, 0, 1)


def near_duplicates(cluster_dir: Path, n_chunks: int) -> list[np.ndarray]:
    """Block 4: per chunk, the positions (in its signature stream) of documents to drop.

    datatrove's own remove lists keep each cluster's union-find root, which can be a *later*
    document; we keep the earliest member in corpus order instead, as exact dedup does, so the
    original survives and its copies go.
    """
    members = []
    for chunk in range(n_chunks):
        path = cluster_dir / f"{chunk:06d}.clusters"
        if path.is_file():
            pairs = np.fromfile(path, dtype="<u4").reshape(-1, 2).astype(np.int64)
            members.append(np.column_stack([np.full(len(pairs), chunk), pairs]))
    removed = [np.zeros(0, np.int64) for _ in range(n_chunks)]
    if not members:
        return removed
    m = np.concatenate(members)  # rows: chunk, doc, cluster
    order = np.lexsort((m[:, 1], m[:, 0], m[:, 2]))  # by cluster, then corpus position
    m = m[order]
    is_first = np.concatenate([[True], m[1:, 2] != m[:-1, 2]])
    drop = m[~is_first]
    for chunk in np.unique(drop[:, 0]):
        removed[int(chunk)] = np.sort(drop[drop[:, 0] == chunk, 1])
    return removed
