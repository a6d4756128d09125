"""GPT-2 tokenization of documents into flat uint16 token streams, ``<|endoftext|>`` before every document.

Memory is what limits a tokenize worker: tiktoken's ``encode_ordinary`` returns a Python list of
ints (~36 bytes per token with the list slot and the int object), so tokenizing a whole 20,000-document
chunk and then concatenating held ~52 bytes per token (~1.3 GB for a FineWeb-Edu chunk).
Here each document is encoded straight into a numpy buffer (``encode_to_numpy``: 4 bytes per
token, never a Python int), documents are taken in batches of a few MB of text, and each batch is
appended to the chunk's token file as soon as it is encoded, so a worker holds one batch of
tokens whatever the chunk or corpus size.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Self, TypeVar

import numpy as np
import tiktoken

from common.durable import publish, temp_name

T = TypeVar("T")
# Text per encode batch: bounds the tokens in flight (~4 bytes of uint32 per token, ~1 token per 4 chars).
BATCH_CHARS = 4 << 20


def _encode(enc: tiktoken.Encoding, text: str) -> np.ndarray:
    """``encode_ordinary`` as a uint32 array, without the Python list of ints in between.

    With no special token allowed and none disallowed, tiktoken's core encodes special-token text as
    ordinary text, which is what ``encode_ordinary`` does. Text that is not encodable as UTF-8
    (lone surrogates; the readers drop those rows first) takes ``encode_ordinary``'s repair path.
    """
    try:
        return enc.encode_to_numpy(text, disallowed_special=())
    except UnicodeEncodeError:
        return np.asarray(enc.encode_ordinary(text), dtype=np.uint32)


def tokenize_documents(enc: tiktoken.Encoding, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Return (tokens, lengths): ``<|endoftext|>`` + tokens of each text, concatenated as uint16;
    per-document lengths include the EOT."""
    encoded = [_encode(enc, t) for t in texts]
    lengths = np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.empty(int(lengths.sum()), dtype=np.uint16)
    pos = 0
    for e in encoded:
        tokens[pos] = enc.eot_token
        tokens[pos + 1 : pos + 1 + len(e)] = e  # GPT-2 ids are < 2**16: the cast is exact
        pos += 1 + len(e)
    return tokens, lengths


def batched_by_chars(items: Iterable[T], text_of, max_chars: int = BATCH_CHARS) -> Iterator[list[T]]:
    """Consecutive lists of ``items`` whose texts hold about ``max_chars`` characters (at least one item each)."""
    batch: list[T] = []
    size = 0
    for item in items:
        batch.append(item)
        size += len(text_of(item))
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class TokenFileWriter:
    """Appends documents' tokens to a chunk's token file; commit() makes it visible under its final name.

    Documents longer than ``max_doc_tokens`` (EOT included) are not written: :meth:`add` returns
    their (index in the batch, length) so the caller can report them. Only the lengths of written
    documents are kept in memory (8 bytes per document).
    """

    def __init__(self, path: Path, enc: tiktoken.Encoding, max_doc_tokens: int):
        self.path = Path(path)
        self.enc = enc
        self.max_doc_tokens = max_doc_tokens
        self._tmp = temp_name(self.path)
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - open across add() calls; closed by commit/discard
        self._lengths: list[np.ndarray] = []

    def add(self, texts: list[str]) -> list[tuple[int, int]]:
        tokens, lengths = tokenize_documents(self.enc, texts)
        too_long = lengths > self.max_doc_tokens  # could never fit a shard
        if too_long.any():
            tokens = tokens[np.repeat(~too_long, lengths)]
        self._file.write(tokens.astype("<u2", copy=False).tobytes())
        self._lengths.append(lengths[~too_long])
        return [(int(i), int(lengths[i])) for i in np.flatnonzero(too_long)]

    @property
    def lengths(self) -> np.ndarray:
        return np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)

    def commit(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        publish(self._tmp, self.path)

    def discard(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
