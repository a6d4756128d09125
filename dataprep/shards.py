"""The on-disk contract between the data stage and the trainer: token shards and their manifest.

A shard is a llm.c-compatible file: a 1024-byte header of 256 little-endian int32
(``[20240520, 1, n_tokens, 0, ...]``) followed by ``n_tokens`` uint16 GPT-2 tokens. Every shard
starts with ``<|endoftext|>`` and documents never straddle two shards. Because the header carries
the token count, a truncated or padded file is detected on load from its size alone.

``manifest.json`` is written last, atomically: a shard directory without it is incomplete and is
refused. Readers go through :class:`TokenDataset`, never through the writer's internals.

What a reader checks, and when (a bad shard must never train silently, nor crash mid-run with an
IndexError that "rerun to resume" cannot fix):

* at open (every shard, cheap): manifest format/version, each shard's header and size;
* the first time a process maps a shard (one read of the file, 0.17-0.24 s per 100M-token / 200 MB
  shard from page cache on the 2-core CI machine): its sha256 against the manifest and every token id
  below the tokenizer's vocabulary. The trainer's loader starts the check of the next shard in a
  background thread while the current one is used, so it rarely waits; tokens are never handed
  out before their shard passed.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.durable import atomic_output

MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.uint16
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "pretrain-token-shards"
MANIFEST_VERSION = 1
MAX_SHARD_TOKENS = 2**31 - 1  # the header's token count is an int32
# Token ids a tokenizer can produce, for manifests that do not record `tokenizer.n_vocab`.
KNOWN_VOCAB = {"gpt2": 50257}


class ShardError(ValueError):
    """A shard or manifest that is missing, truncated, corrupt or of an unknown version."""


# Manifest entries that describe where the data was built, not what it is.
BUILD_ONLY_KEYS = ("ray_cluster",)


def manifest_fingerprint(manifest: dict[str, Any], raw: bytes) -> str:
    """Identifies the data a checkpoint was trained on (a resume on other data is refused): the
    sha256 of the manifest as written, less the entries that only say where it was built (the Ray
    cluster's nodes and CPUs), so the same data rebuilt on another cluster keeps its fingerprint.
    A manifest without them (older ones) hashes to the sha256 of its own bytes, as before."""
    if not any(k in manifest for k in BUILD_ONLY_KEYS):
        return hashlib.sha256(raw).hexdigest()
    data = {k: v for k, v in manifest.items() if k not in BUILD_ONLY_KEYS}
    return hashlib.sha256((json.dumps(data, indent=2, sort_keys=True) + "\n").encode()).hexdigest()


def shard_header(n_tokens: int) -> bytes:
    if not 0 <= n_tokens <= MAX_SHARD_TOKENS:
        raise ShardError(f"a shard holds at most {MAX_SHARD_TOKENS} tokens, got {n_tokens}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, SHARD_VERSION, n_tokens)
    return header.tobytes()


def write_shard(path: Path, pieces: Iterable[np.ndarray | bytes], n_tokens: int | None = None) -> tuple[int, str]:
    """Atomically write the concatenation of ``pieces`` (uint16 arrays or their little-endian bytes)
    as one shard; returns (tokens, sha256 of the file).

    With ``n_tokens`` given, ``pieces`` may be a generator: it is streamed to disk, so a writer
    holds one piece at a time, not the shard (a count that does not match is an error, and no
    file is left behind).
    """
    path = Path(path)
    if n_tokens is None:
        pieces = list(pieces)
        n_tokens = sum(len(p) // 2 if isinstance(p, (bytes, bytearray, memoryview)) else len(p) for p in pieces)
    h = hashlib.sha256()
    written = 0
    with atomic_output(path) as f:
        header = shard_header(n_tokens)
        f.write(header)
        h.update(header)
        for p in pieces:
            b = p if isinstance(p, (bytes, bytearray, memoryview)) else np.ascontiguousarray(p, dtype="<u2").tobytes()
            f.write(b)
            h.update(b)
            written += len(b) // 2
        if written != n_tokens:
            raise ShardError(f"{path}: {written} tokens written, the header says {n_tokens}")
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


def check_shard(path: Path, sha256: str, vocab_limit: int, bufsize: int = 1 << 23) -> None:
    """One pass over a shard: its sha256 must be ``sha256`` and every token id < ``vocab_limit``.

    Raises :class:`ShardError` naming the file and what is wrong. Reads in blocks (hashlib and
    numpy release the GIL on them, so this runs well in a background thread).
    """
    path = Path(path)
    h = hashlib.sha256()
    top = -1
    buf = bytearray(bufsize)  # even: blocks never split a uint16 token
    view = memoryview(buf)
    pos = 0
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
                start = max(0, HEADER_BYTES - pos)
                if n > start:
                    top = max(top, int(np.frombuffer(buf, dtype="<u2", count=(n - start) // 2, offset=start).max()))
                pos += n
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard: {e.strerror or e}") from e
    digest = h.hexdigest()
    if digest != sha256:
        raise ShardError(f"{path}: corrupt shard: sha256 {digest} does not match the manifest's {sha256}")
    if top >= vocab_limit:
        tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES)
        first = int(np.argmax(tokens >= vocab_limit))
        raise ShardError(
            f"{path}: token id {int(tokens[first])} at token {first} is outside the vocabulary "
            f"(ids must be < {vocab_limit}); the shard was not made by this tokenizer"
        )


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

    Opening validates the manifest's format/version and every shard's header and size (cheap).
    :meth:`tokens` hands out a shard's tokens only after :func:`check_shard` passed for it in this
    process (once per shard; :meth:`prefetch` starts that check in a background thread);
    :meth:`verify` checks every shard now. ``vocab_size`` (e.g. the model's) can only lower the
    token-id limit the manifest's tokenizer implies.
    """

    def __init__(self, directory: str | Path, vocab_size: int | None = None):
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
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != MANIFEST_FORMAT:
            fmt = self.manifest.get("format") if isinstance(self.manifest, dict) else None
            raise ShardError(f"{manifest_path}: not a token-shard manifest (format {fmt!r})")
        if self.manifest.get("format_version") != MANIFEST_VERSION:
            raise ShardError(
                f"{manifest_path}: manifest version {self.manifest.get('format_version')} is not supported "
                f"(this reader knows {MANIFEST_VERSION})"
            )
        self.fingerprint = manifest_fingerprint(self.manifest, raw)
        try:
            self.shards = [
                ShardInfo(self._inside(s["path"], manifest_path), s["split"], int(s["tokens"]), int(s["docs"]), str(s["sha256"]))
                for s in self.manifest["shards"]
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise ShardError(f"{manifest_path}: malformed shard list ({type(e).__name__}: {e})") from e
        for s in self.shards:
            n = read_header(s.path)
            if n != s.tokens:
                raise ShardError(f"{s.path}: holds {n} tokens but the manifest says {s.tokens}")
        self.vocab_limit = self._vocab_limit(vocab_size)
        self._checks: dict[Path, Future] = {}
        self._checks_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _inside(self, rel: Any, manifest_path: Path) -> Path:
        """A shard path from the manifest: a plain file name in this directory, nothing else."""
        if not isinstance(rel, str) or not rel or "/" in rel or "\\" in rel or rel.startswith("."):
            raise ShardError(f"{manifest_path}: shard path {rel!r} is not a file name in {self.directory}")
        return self.directory / rel

    def _vocab_limit(self, vocab_size: int | None) -> int:
        tok = self.manifest.get("tokenizer") or {}
        limit = int(tok.get("n_vocab") or KNOWN_VOCAB.get(str(tok.get("name")), 2**16))
        return min(limit, int(vocab_size)) if vocab_size else limit

    @property
    def eot_token(self) -> int:
        return int(self.manifest["tokenizer"]["eot_token"])

    def split(self, name: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == name]

    def prefetch(self, shard: ShardInfo) -> Future:
        """Start checking ``shard`` in the background (once per process); returns its future."""
        with self._checks_lock:
            fut = self._checks.get(shard.path)
            if fut is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-check")
                fut = self._checks[shard.path] = self._pool.submit(check_shard, shard.path, shard.sha256, self.vocab_limit)
            return fut

    def check(self, shard: ShardInfo) -> None:
        """Block until ``shard`` is known good; raises :class:`ShardError` if it is not."""
        self.prefetch(shard).result()

    def tokens(self, shard: ShardInfo) -> np.memmap:
        self.check(shard)
        return load_shard(shard.path)

    def verify(self) -> None:
        """Check every shard now (sha256 and token ids)."""
        for s in self.shards:
            self.prefetch(s)
        for s in self.shards:
            self.check(s)
