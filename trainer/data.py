"""Distributed, exactly resumable token loader over a committed shard directory.

The loader's whole position is ``LoaderState(epoch, shard_index, offset)``: three integers that
are *global* (the same on every rank). Each micro-step the ranks together consume one contiguous
span of ``world_size * B * T`` tokens of the current shard; rank ``r`` reads the window
``[offset + r*B*T, offset + (r+1)*B*T + 1)`` (the ``+1`` is the last target), so windows of
different ranks are disjoint in their inputs. Keeping the state global means a checkpoint taken
with N ranks can be resumed with M ranks and still continue from the exact next token.

Shard order is a permutation drawn per epoch from ``(seed, epoch)`` so that every epoch sees the
shards in a new order yet a resumed run draws the very same order. Windows never straddle shards
(documents never do either); a shard's tail shorter than one global span is skipped.

Every shard is checked (sha256 against the manifest, token ids within the vocabulary) before its
first tokens are used in this process: :meth:`TokenDataset.tokens` waits for that check. While
shard k is read, the check of the shard that follows it runs in a background thread, so the wait
is only ever for the first shard. A bad shard raises :class:`dataprep.shards.ShardError`.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch

from dataprep.shards import ShardInfo, TokenDataset


@dataclass(frozen=True)
class LoaderState:
    """Where the next micro-batch starts: epoch, index into that epoch's shard order, token offset."""

    epoch: int = 0
    shard_index: int = 0
    offset: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        return cls(int(d["epoch"]), int(d["shard_index"]), int(d["offset"]))


class TrainLoader:
    """Yields ``(x, y)`` int64 tensors of shape (B, T) for this rank; `state` resumes it exactly."""

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        seq_len: int,
        rank: int,
        world_size: int,
        seed: int,
        state: LoaderState | None = None,
    ):
        self.dataset = dataset
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.shards: list[ShardInfo] = dataset.split("train")
        self.span = world_size * batch_size * seq_len  # tokens consumed per micro-step, all ranks
        if not self.shards:
            raise ValueError(f"{dataset.directory}: the manifest lists no train shards")
        usable = [s for s in self.shards if s.tokens >= self.span + 1]
        if not usable:
            biggest = max(s.tokens for s in self.shards)
            raise ValueError(
                f"{dataset.directory}: no train shard holds one global micro-batch "
                f"({world_size} ranks x {batch_size} x {seq_len} + 1 = {self.span + 1} tokens; largest shard {biggest})"
            )
        self.state = state or LoaderState()
        self._order_epoch = -1
        self._order: list[int] = []
        self._cached: tuple[int, np.memmap] | None = None
        first = self._normalise(self.state)  # start checking the first shard while the model is built
        self.dataset.prefetch(self.shards[self.order(first.epoch)[first.shard_index]])

    def order(self, epoch: int) -> list[int]:
        """Shard order of ``epoch``: a permutation seeded by (seed, epoch), identical on all ranks."""
        if epoch != self._order_epoch:
            self._order = self._draw(epoch)
            self._order_epoch = epoch
        return self._order

    def _draw(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed, epoch])
        return [int(i) for i in rng.permutation(len(self.shards))]

    def _tokens(self, st: LoaderState) -> np.memmap:
        shard_id = self.order(st.epoch)[st.shard_index]
        if self._cached is None or self._cached[0] != shard_id:
            self._cached = (shard_id, self.dataset.tokens(self.shards[shard_id]))  # waits for its check
            self.dataset.prefetch(self.shards[self._following(st)])
        return self._cached[1]

    def _following(self, st: LoaderState) -> int:
        """The shard read after the one of ``st`` (the next epoch's first after the last)."""
        if st.shard_index + 1 < len(self.shards):
            return self.order(st.epoch)[st.shard_index + 1]
        return self._draw(st.epoch + 1)[0]

    def _normalise(self, st: LoaderState) -> LoaderState:
        """Advance past shards (and epochs) whose remainder cannot hold one global span."""
        epoch, idx, off = st.epoch, st.shard_index, st.offset
        while True:
            if idx >= len(self.shards):
                epoch, idx, off = epoch + 1, 0, 0
                continue
            shard = self.shards[self.order(epoch)[idx]]
            if off + self.span + 1 <= shard.tokens:
                return LoaderState(epoch, idx, off)
            idx, off = idx + 1, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        st = self._normalise(self.state)
        start = st.offset + self.rank * self.B * self.T
        buf = np.asarray(self._tokens(st)[start : start + self.B * self.T + 1], dtype=np.int64)
        t = torch.from_numpy(buf)
        x = t[:-1].view(self.B, self.T)
        y = t[1:].view(self.B, self.T)
        self.state = LoaderState(st.epoch, st.shard_index, st.offset + self.span)
        return x, y


class ValBatches:
    """The same ``n_batches`` micro-batches every time: val shards read front to back, split by rank.

    Fixed batches make val losses of different steps (and of a resumed run) directly comparable.
    When the val split is smaller than requested, as many whole batches as fit are used (with a
    warning); with none, validation is unavailable (``len() == 0``).
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int, rank: int, world_size: int, n_batches: int):
        self.dataset = dataset
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        span = world_size * batch_size * seq_len
        self.windows: list[tuple[ShardInfo, int]] = []
        for shard in dataset.split("val"):
            off = 0
            while off + span + 1 <= shard.tokens and len(self.windows) < n_batches:
                self.windows.append((shard, off + rank * batch_size * seq_len))
                off += span
        for shard in dict.fromkeys(s for s, _ in self.windows):
            dataset.prefetch(shard)  # checked in the background before the first validation
        if len(self.windows) < n_batches and rank == 0:
            warnings.warn(
                f"{dataset.directory}: val split holds {len(self.windows)} of the {n_batches} requested val batches "
                f"({world_size} x {batch_size} x {seq_len} tokens each); using {len(self.windows)}",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.windows)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for shard, start in self.windows:
            buf = np.asarray(self.dataset.tokens(shard)[start : start + self.B * self.T + 1], dtype=np.int64)
            t = torch.from_numpy(buf)
            yield t[:-1].view(self.B, self.T), t[1:].view(self.B, self.T)
