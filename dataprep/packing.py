"""Assigning documents to shards: validation first, then train, whole documents only."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ShardPlan:
    """One shard to write: ``pieces`` are (chunk, first doc, end doc) ranges of the chunks' token files."""

    name: str
    split: str
    pieces: list[tuple[int, int, int]] = field(default_factory=list)
    tokens: int = 0
    docs: int = 0


def pack_documents(lengths: list[np.ndarray], shard_tokens: int, val_tokens: int) -> list[ShardPlan]:
    """Greedy, in corpus order: documents fill the validation split until it holds at least
    ``val_tokens`` tokens, then the train split; a shard is closed when the next document would
    overflow ``shard_tokens``. Every document fits (longer ones were dropped before packing)."""
    shards: list[ShardPlan] = []
    counters = {"val": 0, "train": 0}
    split = "val" if val_tokens > 0 else "train"
    val_total = 0
    current: ShardPlan | None = None

    def new_shard() -> ShardPlan:
        plan = ShardPlan(name=f"{split}_{counters[split]:06d}.bin", split=split)
        counters[split] += 1
        shards.append(plan)
        return plan

    for chunk, lens in enumerate(lengths):
        for doc, n in enumerate(lens.tolist()):
            if split == "val" and val_total >= val_tokens:
                split, current = "train", None
            if current is None or current.tokens + n > shard_tokens:
                current = new_shard()
            if current.pieces and current.pieces[-1][0] == chunk and current.pieces[-1][2] == doc:
                c, lo, _ = current.pieces[-1]
                current.pieces[-1] = (c, lo, doc + 1)
            else:
                current.pieces.append((chunk, doc, doc + 1))
            current.tokens += n
            current.docs += 1
            if split == "val":
                val_total += n
    return shards
