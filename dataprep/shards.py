"""The on-disk contract between the data stage and the trainer: token shards and their manifest.

A shard is a llm.c-compatible file: a 1024-byte header of 256 little-endian int32
(``[20240520, 1, n_tokens, 0, ...]``) followed by ``n_tokens`` uint16 GPT-2 tokens. Every shard
starts with ``<|endoftext|>`` and documents never straddle two shards. Because the header carries
the token count, a truncated or padded file is detected on load from its size alone.

``manifest.json`` is written last, atomically: a shard directory without it is incomplete and is
refused. Readers go through :class:`TokenDataset`, never through the writer's internals.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.uint16
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "pretrain-token-shards"
MANIFEST_VERSION = 1
MAX_SHARD_TOKENS = 2**31 - 1  # the header's token count is an int32


class ShardError(ValueError):
    """A shard or manifest that is missing, truncated, corrupt or of an unknown version."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp name in the same directory, fsync, rename: readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def shard_header(n_tokens: int) -> bytes:
    if not 0 <= n_tokens <= MAX_SHARD_TOKENS:
        raise ShardError(f"a shard holds at most {MAX_SHARD_TOKENS} tokens, got {n_tokens}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, SHARD_VERSION, n_tokens)
    return header.tobytes()


def write_shard(path: Path, pieces: list[np.ndarray]) -> tuple[int, str]:
    """Atomically write the concatenation of ``pieces`` as one shard; returns (tokens, sha256 of the file)."""
    path = Path(path)
    n_tokens = sum(len(p) for p in pieces)
    h = hashlib.sha256()
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        header = shard_header(n_tokens)
        f.write(header)
        h.update(header)
        for p in pieces:
            b = np.ascontiguousarray(p, dtype="<u2").tobytes()
            f.write(b)
            h.update(b)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return n_tokens, h.hexdigest()


def read_header(path: Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard: {e.strerror or e}") from e
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: truncated shard ({size} bytes, shorter than its {HEADER_BYTES}-byte header)")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != MAGIC:
        raise ShardError(f"{path}: not a token shard (magic {int(header[0])}, expected {MAGIC})")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: shard version {int(header[1])} is not supported (this reader knows {SHARD_VERSION})")
    n_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * n_tokens
    if size != expected:
        kind = "truncated" if size < expected else "oversized"
        raise ShardError(f"{path}: {kind} shard: header says {n_tokens} tokens ({expected} bytes), file has {size} bytes")
    return n_tokens


def load_shard(path: Path) -> np.memmap:
    """Memory-map a shard's tokens after checking its header and size."""
    n_tokens = read_header(path)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def file_sha256(path: Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    """One shard as listed in the manifest."""

    path: Path
    split: str  # "train" | "val"
    tokens: int
    docs: int
    sha256: str


class TokenDataset:
    """A committed shard directory: the trainer's only way in to the data.

    Opening validates the manifest's format/version and every shard's header and size (cheap);
    :meth:`verify` also checks sha256 (reads every byte).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST_NAME
        if not manifest_path.is_file():
            raise ShardError(
                f"{self.directory}: no {MANIFEST_NAME}: not a finished shard directory (run `pretrain data` first)"
            )
        raw = manifest_path.read_bytes()
        try:
            self.manifest: dict[str, Any] = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ShardError(f"{manifest_path}: corrupt manifest: {e}") from e
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise ShardError(f"{manifest_path}: not a token-shard manifest (format {self.manifest.get('format')!r})")
        if self.manifest.get("format_version") != MANIFEST_VERSION:
            raise ShardError(
                f"{manifest_path}: manifest version {self.manifest.get('format_version')} is not supported "
                f"(this reader knows {MANIFEST_VERSION})"
            )
        # Identifies the data a checkpoint was trained on (refuse to resume on other data).
        self.fingerprint = hashlib.sha256(raw).hexdigest()
        self.shards = [
            ShardInfo(self.directory / s["path"], s["split"], int(s["tokens"]), int(s["docs"]), s["sha256"])
            for s in self.manifest["shards"]
        ]
        for s in self.shards:
            n = read_header(s.path)
            if n != s.tokens:
                raise ShardError(f"{s.path}: holds {n} tokens but the manifest says {s.tokens}")

    @property
    def eot_token(self) -> int:
        return int(self.manifest["tokenizer"]["eot_token"])

    def split(self, name: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == name]

    def tokens(self, shard: ShardInfo) -> np.memmap:
        return load_shard(shard.path)

    def verify(self) -> None:
        for s in self.shards:
            digest = file_sha256(s.path)
            if digest != s.sha256:
                raise ShardError(f"{s.path}: sha256 {digest} does not match the manifest's {s.sha256}")
