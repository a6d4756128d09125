"""Resumable downloads against real HTTP servers on 127.0.0.1 (dataprep.sources.download).

Each server serves one generated 3 MB file and logs every request: the Range it was asked for and
what it answered. The behaviours are the ones a 2 GB FineWeb-Edu file meets on a real network:
connections cut midway, servers that ignore Range, a partial left by a killed run, and a file whose
bytes are not the ones the Hub lists.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dataprep.errors import TransientDataError
from dataprep.sources import download

SIZE = 3 * 1024 * 1024 + 12345
MIN_PIECE = 128 * 1024  # a cut transfer still sends this much (or the rest)


@pytest.fixture(scope="module")
def payload() -> bytes:
    return np.random.default_rng(12).integers(0, 256, SIZE, dtype=np.uint8).tobytes()


class Server:
    """A ThreadingHTTPServer in a thread serving ``payload``; ``mode`` says how (see ``answer``)."""

    def __init__(
        self, payload: bytes, mode: str, sha_header: str | None = None, delay_s: float = 0.0, etag: str = "cdn-etag-1", replaced_by: bytes | None = None
    ) -> None:  # fmt: skip
        self.payload, self.mode, self.sha_header, self.delay_s, self.etag = payload, mode, sha_header, delay_s, etag
        self.replaced_by = replaced_by  # served, with another ETag, from the second request on
        self.log: list[dict] = []  # one entry per GET: path, range start (None: no Range), status, bytes sent
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.answer(self)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = f"{self.root}/data/file.parquet"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def answer(self, h: http.server.BaseHTTPRequestHandler) -> None:
        time.sleep(self.delay_s)
        m = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        start = int(m.group(1)) if m else None
        entry = {"path": h.path, "range": start, "status": None, "sent": 0}
        self.log.append(entry)
        if self.replaced_by is not None and len(self.log) == 2:
            self.payload, self.etag = self.replaced_by, "cdn-etag-2"
        if self.mode == "hub" and h.path == "/data/file.parquet":  # the Hub: a redirect to its CDN
            entry["status"] = 302
            h.send_response(302)
            h.send_header("Location", "/cdn/file.parquet")
            h.send_header("X-Repo-Commit", "0" * 40)
            h.send_header("X-Linked-Etag", f'"{self.sha_header}"')
            h.send_header("X-Linked-Size", str(len(self.payload)))
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if self.mode == "ranges" and start is not None and start >= len(self.payload):
            entry["status"] = 416
            h.send_response(416)
            h.send_header("Content-Range", f"bytes */{len(self.payload)}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        honour = self.mode in ("ranges", "ranges-whole") and start is not None
        body_from = start if honour else 0
        rest = len(self.payload) - body_from
        cut = self.mode in ("ranges", "ignores-range-cuts") or (self.mode == "ignores-range" and len(self.log) == 1)
        n = min(rest, max(rest // 2, MIN_PIECE)) if cut else rest
        entry["status"] = 206 if honour else 200
        h.send_response(entry["status"])
        h.send_header("Content-Length", str(rest))
        h.send_header("ETag", f'"{self.etag}"')
        if honour:
            h.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        h.end_headers()
        h.wfile.write(self.payload[body_from : body_from + n])
        h.wfile.flush()
        entry["sent"] = n
        h.close_connection = True

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeHub(Server):
    """The Hub's API for one dataset repo ``org/ds`` (repo info, tree listing with LFS sha256, resolve
    redirects) in front of a CDN that cuts every transfer (``Server`` in mode ``ranges``).

    The redirect carries no ``X-Linked-Etag``: the only sha256 is the one in the listing.
    """

    def __init__(self, payload: bytes, listed_sha256: dict[str, str]) -> None:
        super().__init__(payload, "ranges")
        self.listed_sha256 = listed_sha256
        self.api_log: list[tuple[str, str | None]] = []  # (path, Authorization) of the API and resolve calls

    def answer(self, h: http.server.BaseHTTPRequestHandler) -> None:
        path = h.path.split("?")[0]
        if path.startswith("/cdn/"):
            return super().answer(h)
        self.api_log.append((path, h.headers.get("Authorization")))
        if path.startswith("/datasets/org/ds/resolve/main/data/"):
            return self._send(h, 302, b"", Location=f"/cdn/{path.rsplit('/', 1)[1]}", **{"X-Repo-Commit": "a" * 40})
        if path in ("/api/datasets/org/ds", "/api/datasets/org/ds/revision/main"):
            return self._send(h, 200, json.dumps({"id": "org/ds", "sha": "a" * 40, "private": False}).encode())
        if path == "/api/datasets/org/ds/tree/main/data":
            files = [
                {"type": "file", "oid": "b" * 40, "size": len(self.payload), "path": f"data/{name}", "lfs": {"oid": sha, "size": len(self.payload), "pointerSize": 134}}
                for name, sha in self.listed_sha256.items()
            ]  # fmt: skip
            return self._send(h, 200, json.dumps(files).encode())
        return self._send(h, 404, b"")

    @staticmethod
    def _send(h: http.server.BaseHTTPRequestHandler, status: int, body: bytes, **headers: str) -> None:
        h.send_response(status)
        for k, v in {"Content-Length": str(len(body)), "Content-Type": "application/json", **headers}.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)


@pytest.fixture
def serve(payload: bytes) -> Iterator:
    servers: list[Server] = []

    def start(mode: str, **kw) -> Server:
        servers.append(Server(payload, mode, **kw).__enter__())
        return servers[-1]

    yield start
    for s in servers:
        s.__exit__()


def _only_final_files(cache: Path) -> list[str]:
    return sorted(p.name.split("-", 1)[1] for p in cache.iterdir() if not p.name.endswith(".lock"))


def test_every_transfer_cut_completes_through_range_resumes(serve, payload, tmp_path) -> None:
    server = serve("ranges")
    got = download(server.url, "file.parquet", tmp_path, retries=1, backoff_s=0.01)
    assert Path(got.path).read_bytes() == payload
    assert got.bytes == SIZE and got.sha256 == hashlib.sha256(payload).hexdigest()
    starts = [e["range"] for e in server.log]
    assert len(starts) >= 4 and starts[0] is None  # several cuts, each resumed
    offset = 0
    for entry in server.log:  # each request asks for exactly the bytes not yet received
        assert (entry["range"], entry["status"]) == ((offset, 206) if offset else (None, 200))
        offset += entry["sent"]
    assert offset == SIZE  # no byte was fetched twice
    assert _only_final_files(tmp_path) == ["file.parquet", "file.parquet.meta.json"]
    again = download(server.url, "file.parquet", tmp_path, retries=1, backoff_s=0.01)
    assert again == got and len(server.log) == len(starts)  # complete: no request at all


def test_a_server_that_ignores_range_still_gives_the_whole_file(serve, payload, tmp_path) -> None:
    server = serve("ignores-range")
    got = download(server.url, "file.parquet", tmp_path, retries=2, backoff_s=0.01)
    assert Path(got.path).read_bytes() == payload
    assert [(e["range"], e["status"]) for e in server.log] == [(None, 200), (SIZE // 2, 200)]  # asked to resume, got it all
    assert _only_final_files(tmp_path) == ["file.parquet", "file.parquet.meta.json"]


def test_a_server_that_ignores_range_and_always_cuts_fails_after_the_retries(serve, tmp_path) -> None:
    server = serve("ignores-range-cuts")  # every attempt restarts at 0 and stops at the same byte: no progress
    with pytest.raises(TransientDataError, match=r"file\.parquet.*after 3 attempts"):
        download(server.url, "file.parquet", tmp_path, retries=2, backoff_s=0.01)
    assert len(server.log) == 4  # the first cut counts as progress, the next three do not
    assert _only_final_files(tmp_path) == ["file.parquet.part"]  # kept for a rerun


def test_a_file_replaced_during_the_download_is_fetched_again_from_zero(serve, payload, tmp_path) -> None:
    newer = payload[::-1]
    server = serve("ranges", replaced_by=newer)
    got = download(server.url, "file.parquet", tmp_path, retries=1, backoff_s=0.01)  # the restart costs one retry
    assert Path(got.path).read_bytes() == newer
    assert [e["range"] for e in server.log[:3]] == [None, SIZE // 2, None]  # its ETag changed: from byte 0


def test_a_partial_left_by_a_killed_run_is_continued(serve, payload, tmp_path) -> None:
    server = serve("ranges-whole")
    first = download(server.url, "file.parquet", tmp_path / "a", retries=0)
    part = Path(first.path).with_name(Path(first.path).name + ".part")
    part.write_bytes(payload[:1_000_000])  # what a SIGKILLed download leaves in a fresh cache
    Path(first.path).unlink()
    got = download(server.url, "file.parquet", tmp_path / "a", retries=0)
    assert Path(got.path).read_bytes() == payload and not part.exists()
    assert [e["range"] for e in server.log] == [None, 1_000_000]


def test_a_partial_longer_than_the_file_starts_again_from_zero(serve, payload, tmp_path) -> None:
    server = serve("ranges")  # answers 416 to a range past its end
    first = Path(download(server.url, "file.parquet", tmp_path, retries=1, backoff_s=0.01).path)
    first.unlink()
    first.with_name(first.name + ".part").write_bytes(payload + b"garbage from another version of the file")
    server.log.clear()
    got = download(server.url, "file.parquet", tmp_path, retries=1, backoff_s=0.01)
    assert Path(got.path).read_bytes() == payload
    assert server.log[0]["status"] == 416 and server.log[1]["range"] is None


def test_a_complete_partial_is_verified_not_fetched_again(serve, payload, tmp_path) -> None:
    server = serve("ranges")
    first = Path(download(server.url, "file.parquet", tmp_path, retries=1, backoff_s=0.01).path)
    first.rename(first.with_name(first.name + ".part"))  # killed after the last byte, before the rename
    server.log.clear()
    got = download(server.url, "file.parquet", tmp_path, retries=0)
    assert Path(got.path).read_bytes() == payload
    assert [(e["range"], e["status"], e["sent"]) for e in server.log] == [(SIZE, 416, 0)]


def test_an_etag_from_another_server_is_not_taken_for_a_checksum(serve, payload, tmp_path) -> None:
    server = serve("ranges-whole", etag=hashlib.sha256(b"the server's own validator").hexdigest())
    got = download(server.url, "file.parquet", tmp_path, retries=0)
    assert Path(got.path).read_bytes() == payload


@pytest.mark.parametrize("where", ["hub-header", "listing"])
def test_a_checksum_mismatch_is_refused_after_retries(serve, payload, tmp_path, where) -> None:
    wrong = hashlib.sha256(b"another file").hexdigest()
    server = serve("hub", sha_header=wrong if where == "hub-header" else hashlib.sha256(payload).hexdigest())
    listed = wrong if where == "listing" else None
    with pytest.raises(TransientDataError, match=r"file\.parquet.*sha256") as e:
        download(server.url, "file.parquet", tmp_path, retries=2, backoff_s=0.01, expected_sha256=listed)
    assert e.value.exit_code == 1 and wrong in str(e.value)
    assert sum(e["path"] == "/cdn/file.parquet" for e in server.log) == 3  # each try fetched it all again
    assert _only_final_files(tmp_path) == []  # no final file, no partial, no sidecar


def test_the_hub_checksum_accepts_the_right_bytes(serve, payload, tmp_path) -> None:
    server = serve("hub", sha_header=hashlib.sha256(payload).hexdigest())
    got = download(server.url, "file.parquet", tmp_path, retries=0)
    assert Path(got.path).read_bytes() == payload and [e["status"] for e in server.log] == [302, 200]


def test_concurrent_downloads_of_one_file_fetch_it_once(serve, payload, tmp_path) -> None:
    server = serve("ranges-whole", delay_s=0.3)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(download(server.url, "file.parquet", tmp_path, retries=0))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1] and Path(results[0].path).read_bytes() == payload
    assert len(server.log) == 1


def test_file_urls_resume_from_the_partial(payload, tmp_path) -> None:
    src = tmp_path / "src" / "file.parquet"
    src.parent.mkdir()
    src.write_bytes(payload)
    cache = tmp_path / "cache"
    url = f"file://{src}"
    first = download(url, "file.parquet", cache, retries=0)
    part = Path(first.path).with_name(Path(first.path).name + ".part")
    part.write_bytes(payload[:777])
    Path(first.path).unlink()
    got = download(url, "file.parquet", cache, retries=0)
    assert Path(got.path).read_bytes() == payload and got.sha256 == first.sha256 and not part.exists()


def test_a_server_that_keeps_failing_is_a_transient_error_naming_the_url(tmp_path) -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{httpd.server_address[1]}/missing.parquet"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        with pytest.raises(TransientDataError, match=r"missing\.parquet.*after 2 attempts") as e:
            download(url, "missing.parquet", tmp_path, retries=1, backoff_s=0.01)
        assert e.value.exit_code == 1
    finally:
        httpd.shutdown()
        httpd.server_close()


_HF_CLIENT = """
import json, sys
from pathlib import Path
from dataprep.errors import TransientDataError
from dataprep.sources import download
out = {}
for name in ("good.parquet", "bad.parquet"):
    try:
        got = download(f"hf://datasets/org/ds/data/{name}", name, Path(sys.argv[1]), retries=1, backoff_s=0.01)
        out[name] = {"path": got.path, "sha256": got.sha256}
    except TransientDataError as e:
        out[name] = {"error": str(e), "exit_code": e.exit_code}
print(json.dumps(out))
"""


def test_hf_urls_resume_through_the_hub_redirect_and_check_the_listed_sha256(payload, tmp_path) -> None:
    """The ``hf://`` path end to end against a local stand-in for the Hub (HF_ENDPOINT), in a fresh
    interpreter because huggingface_hub reads HF_ENDPOINT when it is imported."""
    sha = hashlib.sha256(payload).hexdigest()
    wrong = hashlib.sha256(b"what the Hub lists for another revision").hexdigest()
    with FakeHub(payload, {"good.parquet": sha, "bad.parquet": wrong}) as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(HF_ENDPOINT=hub.root, HF_TOKEN="hf_test_token", HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(tmp_path / "hf"))
        proc = subprocess.run([sys.executable, "-c", _HF_CLIENT, str(tmp_path / "cache")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["good.parquet"]["path"]).read_bytes() == payload and out["good.parquet"]["sha256"] == sha
    good_ranges = [e["range"] for e in hub.log if e["path"] == "/cdn/good.parquet"]
    assert len(good_ranges) >= 4 and good_ranges[0] is None and all(r for r in good_ranges[1:])  # resumed at the CDN
    assert ("/datasets/org/ds/resolve/main/data/good.parquet", "Bearer hf_test_token") in hub.api_log
    bad = out["bad.parquet"]
    assert bad.get("exit_code") == 1 and "bad.parquet" in bad["error"] and wrong in bad["error"], bad
    assert _only_final_files(tmp_path / "cache") == ["good.parquet", "good.parquet.meta.json"]
