"""Assigning documents to shards: which documents are validation, in what order, which shard each is in.

Documents are numbered 0..n-1 in corpus order (source file order, then row order, kept documents
only). With ``shuffle_seed`` < 0 that is also the packing order: the first documents (at least
``val_tokens`` tokens) form the validation split, the rest the train split. With a seed:

1. **Validation is sampled first**: documents are ranked by a seeded key and taken in that order
   until they hold at least ``val_tokens`` tokens. That is a uniform random sample of whole
   documents, written in the (random) order it was drawn, so the first validation batches are
   as representative as the whole split.
2. **The rest is shuffled**: the remaining documents go to the train split in the order of a
   second, independent seeded key.

Keys are ``splitmix64(i XOR splitmix64(2·seed + stream))`` for document ``i``: a bijection on
64-bit integers, so keys never tie, and plain integer arithmetic, so the order is the same on any
machine, any numpy version and any number of workers. Within each split, shards are filled
greedily in that order: a shard is closed when the next document would overflow ``shard_tokens``
(every document fits; longer ones were dropped before packing). Whole documents only: every
shard starts with ``<|endoftext|>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_M64 = (1 << 64) - 1
VAL_STREAM, TRAIN_STREAM = 0, 1


@dataclass
class ShardPlan:
    """One shard to write: ``pieces`` is a (k, 3) int64 array of (chunk, first token, end token)
    ranges of the chunks' token files, in shard order (about one per document when shuffled; the
    driver knows every document's length, so a writer needs nothing but these ranges)."""

    name: str
    split: str
    pieces: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))
    tokens: int = 0
    docs: int = 0


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele et al.), element-wise on uint64; a bijection."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def document_keys(n: int, seed: int, stream: int) -> np.ndarray:
    """Seeded, tie-free uint64 sort keys of documents 0..n-1 (one independent stream per use)."""
    base = _splitmix64(np.array([(2 * seed + stream) & _M64], np.uint64))[0]
    return _splitmix64(np.arange(n, dtype=np.uint64) ^ base)


def _take_val(lengths: np.ndarray, order: np.ndarray, val_tokens: int) -> int:
    """How many documents of ``order`` form the validation split: documents are taken while the
    split holds fewer than ``val_tokens`` tokens (so it ends with at least that many, or all)."""
    before = np.concatenate(([0], np.cumsum(lengths[order])[:-1])) if len(order) else np.zeros(0, np.int64)
    return int(np.searchsorted(before, val_tokens, side="left"))


def split_order(lengths: np.ndarray, val_tokens: int, shuffle_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(val documents, train documents), each in packing order, as indices into ``lengths``."""
    n = len(lengths)
    if shuffle_seed < 0:
        k = _take_val(lengths, np.arange(n), val_tokens)
        return np.arange(k), np.arange(k, n)
    val_order = np.argsort(document_keys(n, shuffle_seed, VAL_STREAM))
    val = val_order[: _take_val(lengths, val_order, val_tokens)]
    rest = np.ones(n, bool)
    rest[val] = False
    train = np.flatnonzero(rest)
    train = train[np.argsort(document_keys(n, shuffle_seed, TRAIN_STREAM)[train])]
    return val, train


def _pieces(docs: np.ndarray, chunk_starts: np.ndarray, doc_starts: np.ndarray) -> np.ndarray:
    """Global document ids, in shard order → (chunk, first token, end token) ranges of the chunks'
    token files, one per run of consecutive documents of one chunk.

    ``chunk_starts[c]`` is the global id of chunk c's first document; ``doc_starts[g]`` the
    position of document g's first token in the concatenation of all chunks' token files.
    """
    if not len(docs):
        return np.zeros((0, 3), np.int64)
    chunk = np.searchsorted(chunk_starts, docs, side="right") - 1
    breaks = np.flatnonzero((np.diff(chunk) != 0) | (np.diff(docs) != 1)) + 1
    first = np.concatenate(([0], breaks))
    last = np.concatenate((breaks, [len(docs)])) - 1
    base = doc_starts[chunk_starts[chunk[first]]]  # token offset of each run's chunk
    return np.stack([chunk[first], doc_starts[docs[first]] - base, doc_starts[docs[last] + 1] - base], axis=1).astype(np.int64)


def _fill(split: str, docs: np.ndarray, lengths: np.ndarray, chunk_starts: np.ndarray, shard_tokens: int) -> list[ShardPlan]:
    """Greedy: each shard takes documents in order while they fit in ``shard_tokens``."""
    doc_starts = np.concatenate(([0], np.cumsum(lengths)))
    cum = np.concatenate(([0], np.cumsum(lengths[docs])))
    plans, start = [], 0
    while start < len(docs):
        end = int(np.searchsorted(cum, cum[start] + shard_tokens, side="right")) - 1
        plans.append(ShardPlan(f"{split}_{len(plans):06d}.bin", split, _pieces(docs[start:end], chunk_starts, doc_starts),
                               int(cum[end] - cum[start]), end - start))
        start = end
    return plans


def pack_documents(lengths: list[np.ndarray], shard_tokens: int, val_tokens: int, shuffle_seed: int = -1) -> list[ShardPlan]:
    """Shard plans, validation first, for chunks whose kept documents have ``lengths`` tokens each."""
    if any(int(l.max(initial=0)) > shard_tokens for l in lengths):
        raise ValueError(f"a document is longer than shard_tokens={shard_tokens}")
    counts = np.array([len(l) for l in lengths], np.int64)
    chunk_starts = np.concatenate(([0], np.cumsum(counts)[:-1])) if len(counts) else np.zeros(0, np.int64)
    flat = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
    val, train = split_order(flat, val_tokens, shuffle_seed)
    return _fill("val", val, flat, chunk_starts, shard_tokens) + _fill("train", train, flat, chunk_starts, shard_tokens)
