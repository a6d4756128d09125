"""One attempt at a transfer into a ``<name>.part`` file, resumed where the last one stopped.

A FineWeb-Edu file is ~2 GB: a connection dropped near its end must not cost the whole file again.
Each attempt appends to the partial file from its current size (an HTTP ``Range: bytes=N-`` request,
or a seek for ``file://``/``s3://``/``gs://``), and the finished file is checked against what the
listing or the server says it is (its size, and its sha256 where one is known) before
:func:`dataprep.sources.download` renames it into place. While an attempt runs, ``<name>.part.size``
notes that size where known, for the driver's progress bar. The rules for a server's answer:

- 206 whose ``Content-Range`` starts at N: append.
- 200 to a Range request (the server ignored it): truncate and take the whole body from byte 0.
- 416 (the partial is not shorter than the file): complete if its total equals the partial's size,
  otherwise start again from byte 0; so does a partial longer than the listed size.
- a body cut short raises (the partial is kept: the next attempt resumes); a finished file of the
  wrong size or sha256 raises :class:`Mismatch` (the caller throws the partial away).

The sha256 comes from the listing (the Hub's LFS ``sha256``) or from the Hub's own headers
(``X-Linked-Etag``, or the ``ETag`` of a Hub response, for LFS files). Another server's ETag is not
read as a checksum: nothing says what it hashes. So from such a server a partial is trusted to be
a prefix of the file: within one process a continued body with another strong ETag starts again
from byte 0, but a file replaced between a kill and the rerun is caught only by its size.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.durable import atomic_write_bytes

BLOCK = 1 << 22
# An HTTP body is read in smaller pieces: each is on disk as it arrives, so the driver's progress bar
# (and a resume after a cut) sees bytes every second or so even on a slow link, not once per 4 MB.
HTTP_PIECE = 1 << 18
SIZE_SUFFIX = ".size"  # beside a partial: the size it will have when complete (for progress bars)
HTTP_TIMEOUT_S = (30, 120)  # connect, and the longest wait for the next bytes of a body
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)")


class Mismatch(Exception):
    """The finished file is not the file that was described: its partial is worthless."""


@dataclass(frozen=True)
class Expected:
    """What the finished file must be; None where nobody said."""

    size: int | None = None
    sha256: str | None = None

    def filled_from(self, other: Expected) -> Expected:
        """Keep what is known here (the listing), take the rest from ``other`` (the server)."""
        return replace(self, size=self.size if self.size is not None else other.size, sha256=self.sha256 or other.sha256)


class Partial:
    """The ``<name>.part`` file being filled, with the running sha256 of the bytes it holds.

    Opened in append mode: a partial left by an earlier attempt or a killed run is hashed once and
    continued, never rewritten.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size_path = path.with_name(path.name + SIZE_SUFFIX)
        self.sha = hashlib.sha256()
        self.n = 0
        self._announced: int | None = None
        if path.exists():
            with open(path, "rb") as f:
                while block := f.read(BLOCK):
                    self.sha.update(block)
                    self.n += len(block)
        self._file = open(path, "ab")
        self.etag: str | None = None  # of the response that wrote byte 0, when seen in this process

    def restart(self) -> None:
        self._file.truncate(0)
        self.sha = hashlib.sha256()
        self.n = 0
        self.etag = None

    def write(self, block: bytes) -> None:
        self._file.write(block)
        self.sha.update(block)
        self.n += len(block)

    def announce(self, size: int | None) -> None:
        """Note beside the partial (``<name>.part.size``) the size the finished file will have, once a
        listing or a server states it: the driver's progress bar reads it for the total and the ETA
        (an HTTP file's size is known only from its response). Removed by :meth:`forget_size`."""
        if size is not None and size != self._announced:
            atomic_write_bytes(self.size_path, str(size).encode())
            self._announced = size

    def forget_size(self) -> None:
        self.size_path.unlink(missing_ok=True)
        self._announced = None

    def close(self) -> None:
        """Flush and fsync: what is renamed into place is on disk."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)
        self.forget_size()


def verify(part: Partial, expected: Expected, what: str) -> None:
    """Raise unless the partial is the whole described file (a short one raises OSError: resume it)."""
    if expected.size is not None and part.n < expected.size:
        raise OSError(f"transfer ended early: {part.n} of {expected.size} bytes")
    if expected.size is not None and part.n > expected.size:
        raise Mismatch(f"{what}: got {part.n} bytes, expected {expected.size}")
    if expected.sha256 and part.sha.hexdigest() != expected.sha256:
        raise Mismatch(f"{what}: sha256 {part.sha.hexdigest()} does not match the expected {expected.sha256}")


# ---------------------------------------------------------------------------------------------
# HTTP


def hub_target(url: str) -> tuple[str, dict[str, str], Expected]:
    """The https URL, auth headers and listed size/sha256 of an ``hf://`` file (one Hub API call)."""
    import fsspec
    from huggingface_hub.utils import build_hf_headers

    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    lfs = info.get("lfs") or {}
    return fs.url(path), build_hf_headers(), Expected(size=info.get("size"), sha256=lfs.get("sha256"))


def fetch_http(url: str, headers: dict[str, str], part: Partial, expected: Expected) -> Expected:
    """One GET appending to ``part`` from its size; returns the expectation the server adds to ``expected``.

    Raises on a transfer error (the partial keeps what arrived). A partial the server cannot
    continue (416 with another total, a Content-Range starting elsewhere, a changed ETag) is
    truncated and the body fetched from byte 0 in the same attempt.
    """
    import requests

    if expected.size is not None and part.n > expected.size:
        part.restart()
    ask = {**headers, "Accept-Encoding": "identity"}  # the stored bytes are the served bytes
    if part.n:
        ask["Range"] = f"bytes={part.n}-"
    with requests.get(url, headers=ask, stream=True, timeout=HTTP_TIMEOUT_S) as r:
        served = expected.filled_from(_served(r, part.n))
        part.announce(served.size)
        start = _body_start(r, part)
        if start is None:  # the partial already holds the whole file
            return served
        if start == 0 and part.n:  # a 200 to a Range request: take the whole body from byte 0
            part.restart()
        if start != part.n or _etag_changed(r, part):
            if part.n == 0:
                raise OSError(f"HTTP {r.status_code} with Content-Range {r.headers.get('Content-Range')!r} to a request from byte 0")
            part.restart()
            r.close()
            return fetch_http(url, headers, part, expected)
        if part.n == 0:
            part.etag = _strong_etag(r)
        for block in r.raw.stream(HTTP_PIECE, decode_content=False):
            part.write(block)
    return served


def _body_start(r: Any, part: Partial) -> int | None:
    """Where the body of ``r`` starts in the file; None when a 416 says the partial is complete."""
    if r.status_code == 206:
        m = _CONTENT_RANGE.fullmatch(r.headers.get("Content-Range", "").strip())
        return int(m.group(1)) if m and m.group(1) is not None else -1
    if r.status_code == 416:
        m = _CONTENT_RANGE.fullmatch(r.headers.get("Content-Range", "").strip())
        return None if m and m.group(2) == str(part.n) else -1
    r.raise_for_status()
    if r.status_code != 200:
        raise OSError(f"HTTP {r.status_code} {r.reason}")
    return 0  # a whole body: if a range was asked for, the server ignored it


def _served(r: Any, offset: int) -> Expected:
    """The size and sha256 the server's headers state for the whole file."""
    size = None
    m = _CONTENT_RANGE.fullmatch(r.headers.get("Content-Range", "").strip())
    if m and m.group(2) != "*":
        size = int(m.group(2))
    elif r.status_code == 200 and r.headers.get("Content-Length", "").isdigit():
        size = int(r.headers["Content-Length"])
    linked = [h.headers for h in (*r.history, r) if "X-Linked-Size" in h.headers]
    if linked and linked[0]["X-Linked-Size"].isdigit():
        size = int(linked[0]["X-Linked-Size"])
    return Expected(size=size, sha256=_hub_sha256(r))


def _hub_sha256(r: Any) -> str | None:
    """The sha256 the Hub states for an LFS file: ``X-Linked-Etag``, or the ETag of a Hub response."""
    for h in (*r.history, r):
        for key in ("X-Linked-Etag", "ETag"):
            if key == "ETag" and "X-Repo-Commit" not in h.headers:
                continue  # only the Hub's ETags are known to be sha256 of the content
            value = h.headers.get(key, "").strip().strip('"').lower()
            if _SHA256.fullmatch(value):
                return value
    return None


def _strong_etag(r: Any) -> str | None:
    etag = r.headers.get("ETag")
    return etag if etag and not etag.startswith("W/") else None


def _etag_changed(r: Any, part: Partial) -> bool:
    """A continued body whose ETag differs from the one that started the partial: another file."""
    etag = _strong_etag(r)
    return r.status_code == 206 and part.etag is not None and etag is not None and etag != part.etag


# ---------------------------------------------------------------------------------------------
# fsspec (file://, s3://, gs://)


def fetch_fsspec(url: str, part: Partial, expected: Expected) -> Expected:
    """Append to ``part`` from its size through fsspec (a seek, which remote filesystems turn into a range)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    served = expected.filled_from(Expected(size=fs.info(path).get("size")))
    part.announce(served.size)
    if served.size is not None and part.n > served.size:
        part.restart()
    with fs.open(path, "rb") as src:
        if part.n:
            src.seek(part.n)
        while block := src.read(BLOCK):
            part.write(block)
    return served
