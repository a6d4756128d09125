"""The data stage's download progress: bytes, a rate and an ETA while a file is still arriving.

A FineWeb-Edu file is ~2 GB. Counting finished files only showed ``0/N files`` for minutes, with no
rate, so a slow download looked like a hung one. Served here: two ~2 MB jsonl files from a local
HTTP server that sends them slowly (and honours Range, so a partial left in the cache resumes).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import time
from pathlib import Path

import pytest

from dataprep.config import DataConfig, RayConfig
from dataprep.pipeline import _WaveBar, run_data_stage
from dataprep.sources import CacheMeter, Listed, SourceFile, cache_path

PIECE = 64 * 1024
RATE = 500_000  # bytes/s per file: ~3 s per file, several progress lines before the first is done
RESUMED = 512 * 1024  # of the first file, already in the cache as a partial
# "  7%|▋    | 512k/3.91M [00:01<00:04, 700kB/s, 0/2 files]", or without a total "512kB [00:01, ?B/s]"
LINE = re.compile(r"data: download:(?:\s+\d+%\|[^|]*\|)?\s+([\d.]+)([kMG]?)B?(?:/([\d.]+)([kMG]?))?\s\[([^\]]*)\]")


def _docs(k: int, size: int) -> bytes:
    lines, n, i = [], 0, 0
    while n < size:
        line = json.dumps({"id": f"{k}-{i}", "text": f"Document {k}-{i}: " + " ".join(f"w{(i * 31 + j) % 997}" for j in range(60))}) + "\n"
        lines.append(line)
        n, i = n + len(line), i + 1
    return "".join(lines).encode()


def _serve(root: Path) -> http.server.ThreadingHTTPServer:
    """Directory listing and HEAD as usual; a data file sent in 64 KB pieces at RATE, from its Range start."""

    class Slow(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def do_GET(self):  # noqa: N802
            if not self.path.endswith(".jsonl"):
                return super().do_GET()
            data = (root / self.path.lstrip("/")).read_bytes()
            m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            start = int(m.group(1)) if m else 0
            self.send_response(206 if m else 200)
            if m:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            for pos in range(start, len(data), PIECE):
                self.wfile.write(data[pos : pos + PIECE])
                time.sleep(PIECE / RATE)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def _bytes(number: str, prefix: str) -> float:
    return float(number) * 1024 ** " kMG".index(prefix or " ")


def test_download_progress_shows_bytes_rate_and_eta_before_a_file_finishes(tmp_path, gpt2_ranks, ray_cluster, capsys) -> None:
    root = tmp_path / "remote"
    root.mkdir()
    files = {f"part_0{k}.jsonl": _docs(k, 2_000_000) for k in range(2)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    server = _serve(root)
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        cache = tmp_path / "cache"
        cache.mkdir()
        part = cache_path(f"{base}/part_00.jsonl", "part_00.jsonl", cache)
        part.with_name(part.name + ".part").write_bytes(files["part_00.jsonl"][:RESUMED])  # a killed run's partial
        cfg = DataConfig(source=f"{base}/*.jsonl", output_dir=str(tmp_path / "out"), cache_dir=str(cache), tokenizer_file=gpt2_ranks,
                         minhash_dedup=False, val_tokens=0, shard_tokens=2_000_000)
        m = run_data_stage(cfg, RayConfig())
    finally:
        server.shutdown()
    assert [s["sha256"] for s in m["sources"]] == [hashlib.sha256(d).hexdigest() for d in files.values()]

    lines = [LINE.match(s.strip()) for s in re.split(r"[\r\n]", capsys.readouterr().err) if "data: download:" in s]
    assert lines and all(lines), "unexpected download progress lines"
    # While no file has finished yet, the bar moves: bytes (the resumed partial included) and, once
    # both sizes are known from the server's Content-Length, the total with a rate and an ETA.
    before = [l for l in lines if l.group(5).endswith("0/2 files")]
    got = [_bytes(l.group(1), l.group(2)) for l in before]
    assert got and got[0] >= RESUMED * 0.99, f"the resumed partial is not counted: {got}"
    assert len(set(got)) >= 2 and got == sorted(got), f"no bytes growing before the first file finished: {got}"
    total = sum(len(d) for d in files.values())
    with_eta = [l for l in before if l.group(3) and re.search(r"<\d\d:\d\d, [\d.]+[kM]?B/s", l.group(5))]
    assert with_eta, f"no total, rate and ETA before the first file finished: {[l.group(0) for l in before]}"
    assert abs(_bytes(with_eta[-1].group(3), with_eta[-1].group(4)) - total) < 0.01 * total
    last = lines[-1]  # the end: every byte, both files
    assert last.group(5).endswith("2/2 files") and abs(_bytes(last.group(1), last.group(2)) - total) < 0.01 * total


def test_download_progress_counts_files_where_the_driver_cannot_see_the_cache(tmp_path, capsys) -> None:
    """A multi-node cluster with a node-local cache: no bytes to watch, so files are counted, no error."""
    files = [Listed(n, f"http://127.0.0.1:9/{n}", 10) for n in ("a.parquet", "b.parquet")]

    def done(i: int) -> SourceFile:  # what a task on another node returns: a path the driver cannot see
        return SourceFile(files[i].name, files[i].location, str(tmp_path / "other-node" / files[i].name), 10, "0" * 64)

    unlisted = _WaveBar("download", "file", [1, 1], CacheMeter(files, tmp_path / "missing"))
    unlisted.finished(0, done(0))
    unlisted.close()
    err = capsys.readouterr().err
    assert "1.00/2.00" in err and "B/s" not in err, err
    (tmp_path / "cache").mkdir()
    unseen = _WaveBar("download", "file", [1, 1], CacheMeter(files, tmp_path / "cache"))  # listed, but not where tasks wrote
    assert "B/s" in capsys.readouterr().err  # bytes, until the first finished file is not there
    unseen.finished(0, done(0))
    unseen.finished(1, done(1))
    unseen.close()
    err = capsys.readouterr().err
    assert re.search(r"2\.00/2\.00 \[[^\]]*file/s\]\s*$", err), err  # the byte bar was closed, files counted on
