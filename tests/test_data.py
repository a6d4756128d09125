"""The data stage, end to end on real Ray: dedup, tokenization, sharding, determinism, restarts, bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dataprep.config import DataConfig, RayConfig
from dataprep.errors import DataError
from dataprep.pipeline import run_data_stage
from dataprep.shards import HEADER_BYTES, ShardError, TokenDataset
from dataprep.tokenizer import EOT_TOKEN, GPT2_RANKS_SHA256, get_gpt2
from tests.corpus import Corpus, make_corpus, write_files

REPO = Path(__file__).resolve().parents[1]


def data_cfg(source: Path | str, out: Path, ranks: str, **kw) -> DataConfig:
    base = dict(source=str(source), output_dir=str(out), tokenizer_file=ranks, cache_dir=str(out.parent / "cache"),
                chunk_docs=150, shard_tokens=60_000, val_tokens=20_000, minhash_buckets=14, minhash_hashes_per_bucket=8)
    base.update(kw)
    return DataConfig(**base)


def read_all_tokens(out: Path) -> np.ndarray:
    ds = TokenDataset(out)
    ds.verify()
    return np.concatenate([np.asarray(ds.tokens(s)) for s in ds.shards])


def tree_digest(out: Path) -> dict[str, str]:
    """sha256 of every file; the manifest's without its ``ray_cluster`` entry (nodes and CPUs of the
    cluster that built it: the one entry that differs between runs on different clusters, by design)."""
    def content(p: Path) -> bytes:
        if p.name != "manifest.json":
            return p.read_bytes()
        manifest = json.loads(p.read_text())
        assert set(manifest.pop("ray_cluster")) == {"nodes", "cpus"}
        return json.dumps(manifest, sort_keys=True).encode()

    return {p.name: hashlib.sha256(content(p)).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def identity(out: Path) -> dict[str, str]:
    """What must not depend on the cluster: every file's digest, and the dataset's fingerprint (the
    identity a checkpoint records; it leaves the manifest's ``ray_cluster`` out)."""
    return {**tree_digest(out), "fingerprint": TokenDataset(out).fingerprint}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Corpus]:
    d = tmp_path_factory.mktemp("corpus")
    return d, make_corpus(d, n_unique=1500, n_exact=100, n_near=100, n_files=3)


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory, gpt2_ranks, ray_cluster) -> tuple[Path, dict]:
    src, _ = corpus
    out = tmp_path_factory.mktemp("built") / "data"
    manifest = run_data_stage(data_cfg(src, out, gpt2_ranks), RayConfig())
    return out, manifest


def test_dedup_removes_planted_duplicates_and_keeps_the_rest(corpus, built):
    _, c = corpus
    out, manifest = built
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    by_reason: dict[str, set[str]] = {}
    for r in removed:
        by_reason.setdefault(r["reason"], set()).add(r["id"])
    assert by_reason.get("exact_duplicate") == c.exact_ids
    assert by_reason.get("near_duplicate") == c.near_ids
    stats = manifest["stats"]
    assert stats["docs_in"] == len(c.docs)
    assert stats["docs_kept"] == len(c.docs) - len(c.exact_ids) - len(c.near_ids)
    assert stats["removed"]["exact_duplicate"] == 100 and stats["removed"]["near_duplicate"] == 100
    # Every exact copy points at (file, row) of an original that was kept.
    per_file = -(-len(c.docs) // len(c.files))  # make_corpus splits the corpus evenly, in order
    first_row = {f.name: i * per_file for i, f in enumerate(c.files)}
    kept_ids = {d["id"] for d in c.docs} - c.exact_ids - c.near_ids
    exact = [r for r in removed if r["reason"] == "exact_duplicate"]
    origins = [c.docs[first_row[r["duplicate_of"]["file"]] + r["duplicate_of"]["row"]] for r in exact]
    assert all(o["id"] in kept_ids for o in origins)
    assert all(" ".join(o["text"].lower().split()) == " ".join(c.docs[first_row[r["file"]] + r["row"]]["text"].lower().split())
               for o, r in zip(origins, exact))


def test_shards_decode_to_kept_documents_joined_by_eot(corpus, built, gpt2_ranks):
    _, c = corpus
    out, manifest = built
    tokens = read_all_tokens(out)
    kept = [d["text"] for d in c.docs if d["id"] not in c.exact_ids | c.near_ids]
    enc = get_gpt2(gpt2_ranks)
    # Every kept document once, whole, after an EOT (their order is tests/test_shuffle.py's subject).
    assert sorted(enc.decode(tokens.tolist()).split("<|endoftext|>")[1:]) == sorted(kept)
    # Shard contract: header + uint16, each shard starts a document, sizes within limits.
    ds = TokenDataset(out)
    assert [s.split for s in ds.shards][:1] == ["val"] and ds.split("train")
    for s in ds.shards:
        toks = ds.tokens(s)
        assert toks[0] == EOT_TOKEN and len(toks) <= 60_000
        assert s.path.stat().st_size == HEADER_BYTES + 2 * s.tokens
        assert int((toks == EOT_TOKEN).sum()) == s.docs
    assert sum(s.tokens for s in ds.split("val")) >= 20_000
    assert manifest["tokenizer"]["ranks_sha256"] == GPT2_RANKS_SHA256
    assert [src["name"] for src in manifest["sources"]] == [f.name for f in c.files]
    assert all(len(src["sha256"]) == 64 for src in manifest["sources"])


def test_rerun_of_a_finished_dataset_does_nothing_and_keeps_it(corpus, built, gpt2_ranks):
    src, _ = corpus
    out, _ = built
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"}  # each run takes the lock
    run_data_stage(data_cfg(src, out, gpt2_ranks), RayConfig())
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"} == before


def test_finished_dataset_of_other_inputs_is_never_overwritten(corpus, built, gpt2_ranks, tmp_path):
    src, _ = corpus
    out, _ = built
    before = tree_digest(out)
    with pytest.raises(DataError, match="already holds a finished dataset"):
        run_data_stage(data_cfg(src, out, gpt2_ranks, shard_tokens=30_000), RayConfig())
    assert tree_digest(out) == before


HOLD_DATA_LOCK = """
import sys, time
from pathlib import Path
from dataprep.output_lock import lock_output_dir
lock_output_dir(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_data_stage_on_one_output_dir_is_refused_naming_the_holder(corpus, gpt2_ranks, tmp_path):
    """Two data stages on one data.output_dir: one with other settings would discard the other's
    work while it is being written. The second is refused (exit 2) and touches nothing."""
    src, _ = corpus
    out = tmp_path / "data"
    (out / ".work" / "scan").mkdir(parents=True)
    (out / ".work" / "fingerprint").write_text("the holder's")
    (out / ".work" / "scan" / "000000.npz").write_bytes(b"the holder's work")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_DATA_LOCK, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DataError) as e:
            run_data_stage(data_cfg(src, out, gpt2_ranks, shard_tokens=30_000), RayConfig())
    finally:
        holder.kill()
        holder.wait()
    assert e.value.exit_code == 2 and "is in use (data) by host" in str(e.value) and f"pid {holder.pid}" in str(e.value)
    assert "set data.output_dir to another directory" in str(e.value)
    assert (out / ".work" / "scan" / "000000.npz").read_bytes() == b"the holder's work"
    assert sorted(p.name for p in out.iterdir()) == [".lock", ".work"]


def test_a_finished_dataset_on_a_read_only_filesystem_needs_no_lock(tmp_path, monkeypatch):
    """A team's finished, read-only dataset is only read; an unwritable dir without one is an error.
    (Root writes through permissions, so the read-only filesystem is the one fake here.)"""
    import errno

    from common.locking import HolderLock
    from dataprep.output_lock import lock_output_dir

    def read_only(self, should_stop=None):
        raise OSError(errno.EROFS, "Read-only file system", str(self.path))

    monkeypatch.setattr(HolderLock, "acquire", read_only)
    (tmp_path / "manifest.json").write_text("{}")
    assert lock_output_dir(tmp_path) is None
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"data.output_dir .*: cannot write there \(Read-only file system\)") as e:
        lock_output_dir(tmp_path)
    assert e.value.exit_code == 2


# --- determinism and restarts (through the CLI, each with its own Ray) ------------------------


def write_config(path: Path, source: Path, out: Path, ranks: str, num_cpus: int, **data) -> Path:
    cfg = {"data": {**dict(source=str(source), output_dir=str(out), tokenizer_file=ranks, chunk_docs=100,
                            shard_tokens=60_000, val_tokens=20_000, cache_dir=str(path.parent / "cache")), **data},
           "ray": {"num_cpus": num_cpus}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def start_data_run(cfg: Path, ready: Callable[[int], bool], stderr: Path | None = None) -> subprocess.Popen:
    """Start `pretrain data CFG` in its own session and return once ``ready(pid)`` holds."""
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "data", str(cfg)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=open(stderr, "wb") if stderr else subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ready(proc.pid):
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before the signal could be sent"
    return proc


def work_records(out: Path, work_step: str, records: int) -> Callable[[int], bool]:
    """Ready once ``records`` work records exist under ``out/.work/<work_step>``: inside that wave."""
    marker_dir = out / ".work" / work_step
    return lambda pid: marker_dir.is_dir() and sum(1 for p in marker_dir.iterdir() if not p.name.startswith(".")) >= records


def ray_starting(pid: int) -> bool:
    """Ready once the local Ray instance's first daemon runs: ``ray.init`` is under way."""
    return any(p.endswith(" gcs_server") for p in session_processes(pid))


def sigkill_data_run(cfg: Path, out: Path, work_step: str, records: int) -> None:
    """SIGKILL the whole process group of `pretrain data CFG` inside a wave (see start_data_run);
    then check that it left no manifest and no partial shard under a final name (every ``*.bin``
    present has a complete header and size)."""
    from dataprep.shards import read_header

    proc = start_data_run(cfg, work_records(out, work_step, records))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    for shard in out.glob("*.bin"):
        read_header(shard)


def live_processes() -> Iterator[tuple[int, str, list[str]]]:
    """(pid, name, the /proc/PID/stat fields after the name: state ppid pgrp session ...) of every
    process that is not a zombie."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z":
                yield int(d), stat[stat.index("(") + 1 : stat.rindex(")")], fields


def session_processes(sid: int) -> list[str]:
    """``pid name`` of every live process of session ``sid`` (Ray's daemons and workers stay in it)."""
    return [f"{pid} {name}" for pid, name, fields in live_processes() if int(fields[3]) == sid]


@pytest.fixture(scope="module")
def cli_reference(corpus, tmp_path_factory, gpt2_ranks) -> dict[str, str]:
    """Digests of an uninterrupted `pretrain data` run with 2 Ray workers."""
    src, _ = corpus
    d = tmp_path_factory.mktemp("ref")
    r = run_cli("data", str(write_config(d / "ref.yaml", src, d / "out", gpt2_ranks, 2)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "docs in" in r.stdout and "shards" in r.stdout
    assert json.loads((d / "out" / "manifest.json").read_text())["order"]["shuffle_seed"] == 1234  # shuffled by default
    return identity(d / "out")


def test_same_bytes_with_one_or_two_workers(corpus, tmp_path, gpt2_ranks, cli_reference):
    src, _ = corpus
    out = tmp_path / "out1"
    r = run_cli("data", str(write_config(tmp_path / "w1.yaml", src, out, gpt2_ranks, 1)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["ray_cluster"]["cpus"] == 1  # the reference had 2
    # same data, same identity: a checkpoint trained on one resumes on the other
    assert identity(out) == cli_reference
    assert {"manifest.json", "removed.jsonl", "val_000000.bin", "train_000000.bin"} <= set(cli_reference)


@pytest.mark.parametrize("kill_when", ["scan", "tokens"])
def test_killed_run_resumes_to_identical_bytes(corpus, tmp_path, gpt2_ranks, kill_when, cli_reference):
    src, _ = corpus
    out = tmp_path / "killed"
    cfg = write_config(tmp_path / "k.yaml", src, out, gpt2_ranks, 2)
    sigkill_data_run(cfg, out, "scan" if kill_when == "scan" else "tokens", random.Random(kill_when).randint(1, 4))

    r = run_cli("data", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    assert identity(out) == cli_reference


@pytest.mark.parametrize(("sig", "when"), [("SIGTERM", "ray-start"), ("SIGTERM", "tokens"), ("SIGUSR2", "tokens")])
def test_stop_signal_to_the_whole_job_exits_3_at_once_and_a_rerun_makes_the_same_bytes(corpus, tmp_path, gpt2_ranks, sig, when, cli_reference):
    """A stop signal reaches every process of the job, Ray's own daemons included: a terminal or
    `kill -- -PGID` signals the process group, SLURM (preemption, the time-limit warning) every
    process of the step. `pretrain data` must still stop cleanly with exit 3, "requeue me" (the
    single-node SLURM data job requeues only on it), within seconds, not after Ray gives up on a GCS
    that died of the same signal (60 s, then exit 1); leave nothing running; and a rerun must
    finish with the bytes of an uninterrupted run. While Ray starts, too: there, Ray's own SIGTERM
    handlers would end the process (exit 15, or 134 from its C++ failure handler)."""
    src, _ = corpus
    out = tmp_path / "stopped"
    cfg = write_config(tmp_path / "s.yaml", src, out, gpt2_ranks, 2)
    log = tmp_path / "stderr.txt"
    proc = start_data_run(cfg, ray_starting if when == "ray-start" else work_records(out, when, 1), stderr=log)
    t0 = time.time()
    os.killpg(proc.pid, getattr(signal, sig))
    rc = proc.wait(timeout=120)
    took = time.time() - t0
    assert rc == 3, f"exit {rc} after {took:.0f} s: {log.read_text()[-3000:]}"
    assert took < 30, f"the stop took {took:.0f} s"
    assert f"stopped by {sig}; finished work is kept" in log.read_text()
    assert not (out / "manifest.json").exists()
    deadline = time.time() + 20  # Ray's agents notice their raylet is gone within a few seconds
    while session_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    assert not session_processes(proc.pid), "Ray processes left running after the stop"

    r = run_cli("data", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    assert identity(out) == cli_reference


# --- bad input -------------------------------------------------------------------------------


def test_row_level_problems_are_skipped_and_counted(tmp_path, gpt2_ranks, ray_cluster):
    src = tmp_path / "src"
    src.mkdir()
    good = [f"A perfectly ordinary document number {w} about rivers and hills." for w in ("one", "two", "three")]
    lines = [json.dumps({"id": "g0", "text": good[0]}).encode(),
             b'{"id": "bad-utf8", "text": "caf\xe9 au lait"}',  # latin-1 byte: not UTF-8
             json.dumps({"id": "empty", "text": "   \n\t "}).encode(),
             json.dumps({"id": "null", "text": None}).encode(),
             json.dumps({"id": "surrogate", "text": "x\ud800y"}).encode(),
             json.dumps({"id": "g1", "text": good[1]}).encode(),
             json.dumps({"id": "huge", "text": "lorem ipsum " * 400}).encode(),
             json.dumps({"id": "g2", "text": good[2]}).encode()]
    with gzip.open(src / "a.jsonl.gz", "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    m = run_data_stage(data_cfg(src, out, gpt2_ranks, shard_tokens=300, val_tokens=0, minhash_dedup=False, shuffle_seed=-1), RayConfig())
    assert m["stats"]["removed"] == {"empty": 2, "invalid_utf8": 2, "exact_duplicate": 0, "near_duplicate": 0, "too_long": 1}
    assert m["stats"]["docs_kept"] == 3
    reasons = {json.loads(l)["id"]: json.loads(l)["reason"] for l in (out / "removed.jsonl").read_text().splitlines()}
    assert reasons == {"bad-utf8": "invalid_utf8", "empty": "empty", "null": "empty", "surrogate": "invalid_utf8", "huge": "too_long"}
    assert get_gpt2(gpt2_ranks).decode(read_all_tokens(out).tolist()) == "".join("<|endoftext|>" + g for g in good)


def test_invalid_utf8_inside_parquet_is_counted(tmp_path, gpt2_ranks, ray_cluster):
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"text": pa.array([b"good text here", b"\xff\xfe broken", b"more good text"], pa.binary())}), src / "b.parquet")
    m = run_data_stage(data_cfg(src, tmp_path / "out", gpt2_ranks, val_tokens=0, minhash_dedup=False), RayConfig())
    assert m["stats"]["removed"]["invalid_utf8"] == 1 and m["stats"]["docs_kept"] == 2


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("corrupt.parquet", b"PAR1 this is not really parquet", r"corrupt\.parquet: unreadable parquet file"),
        ("notext.parquet", None, r"notext\.parquet: no 'text' column \(columns: body\)"),
        ("broken.jsonl", b'{"text": "fine"}\n{"text": "unterminated\n', r"broken\.jsonl: row 1 \(line 2\) is not valid JSON"),
        ("nokey.jsonl", b'{"text": "fine"}\n{"body": "x"}\n', r"nokey\.jsonl: row 1 \(line 2\) has no 'text' field"),
    ],
)
def test_bad_files_fail_clearly_and_keep_finished_work(tmp_path, gpt2_ranks, ray_cluster, name, content, message):
    src = tmp_path / "src"
    src.mkdir()
    make_corpus(src, n_unique=300, n_exact=0, n_near=0, n_files=2, seed=1)
    if content is None:
        pq.write_table(pa.table({"body": ["x"]}), src / name)
    else:
        (src / name).write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        run_data_stage(data_cfg(src, out, gpt2_ranks), RayConfig())
    assert not (out / "manifest.json").exists()


def test_cli_reports_bad_input_with_nonzero_exit(tmp_path, gpt2_ranks):
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.parquet").write_bytes(b"garbage")
    r = run_cli("data", str(write_config(tmp_path / "c.yaml", src, tmp_path / "out", gpt2_ranks, 1)))
    assert r.returncode == 2, r.stderr[-2000:]  # bad data: a rerun cannot fix it (never requeued)
    assert "x.parquet: unreadable parquet file" in r.stderr and "Traceback" not in r.stderr


def test_missing_local_source_is_refused_not_looked_up_on_the_hub(tmp_path, gpt2_ranks):
    """`dir/name` where `dir/` exists locally is a local path: missing means missing (exit 2, at
    once, before Ray starts), not an HF dataset id tried over the network."""
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "unused", tmp_path / "out", gpt2_ranks, 1)
    t0 = time.time()
    r = run_cli("data", str(cfg), "data.source=tests/no-such-corpus")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "data.source: local path tests/no-such-corpus does not exist" in r.stderr, r.stderr[-2000:]
    assert "hf://" not in r.stderr and "Traceback" not in r.stderr
    assert time.time() - t0 < 60 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.minhash_buckets=0", "data.minhash_buckets must be >= 1, got 0"),
        ("data.shard_tokens=0", "data.shard_tokens must be between 1 and"),
        ("data.chunk_docs=-1", "data.chunk_docs must be >= 1, got -1"),
        ("data.source=", "data.source must not be empty"),
        ("data.tokenizer=llama", "data.tokenizer must be one of gpt2, got 'llama'"),
        ("ray.num_cpus=-2", "ray.num_cpus must be >= 0"),
        ("ray.address=somewhere", "ray.address must be empty (a local instance), auto, HOST:PORT or ray://HOST:PORT"),
        ("eval.limit=-5", "eval.limit must be >= 0 (0 = all rows), got -5"),
        ("eval.device=cpux", "eval.device must be auto, cpu, cuda or cuda:N, got 'cpux'"),
        ("eval.dtype=fp16", "eval.dtype must be one of auto, float32, bfloat16, got 'fp16'"),
        ("eval.hellaswag_style=gpt3", "eval.hellaswag_style must be one of nanogpt, harness"),
        ("eval.data_source=web", "eval.data_source must be one of auto, download, local"),
        ("eval.order=random", "eval.order must be one of newest, oldest"),
        ("eval.batch_size=0", "eval.batch_size must be >= 1, got 0"),
        ("eval.max_parallel=0", "eval.max_parallel must be >= 1, got 0"),
        ("eval.poll_s=0", "eval.poll_s must be a positive number of seconds"),
        ("eval.harness_tasks=[arc_easy, 'a b']", "eval.harness_tasks[1] must be an lm-eval task name"),
    ],
)
def test_data_ray_and_eval_config_mistakes_are_refused_at_load(override, message):
    """Each was a traceback, a silent change of meaning or a Hub lookup; now a ConfigError naming the key."""
    from pipelines.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(REPO / "configs" / "smoke.yaml", [override])


def test_config_mistake_exits_2_from_the_cli_before_anything_runs(tmp_path):
    r = run_cli("data", str(REPO / "configs" / "smoke.yaml"), "data.minhash_buckets=0", f"data.output_dir={tmp_path / 'out'}")
    assert r.returncode == 2 and "data.minhash_buckets must be >= 1, got 0" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_cli_rejects_unknown_config_key_naming_it(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  shard_tokenz: 5\n")
    r = run_cli("data", str(cfg))
    assert r.returncode == 2
    assert f"{cfg}: unknown key 'data.shard_tokenz'" in r.stderr


# --- download stage -------------------------------------------------------------------------


def test_download_from_file_url_and_flaky_http_with_retry(tmp_path, gpt2_ranks, ray_cluster):
    import http.server
    import threading

    files = tmp_path / "remote"
    c = Corpus(docs=[{"id": f"d{i}", "text": f"Document {w} talks about the sea and the river." } for i, w in enumerate("abcdefghij")])
    write_files(files, c, 2)
    requests: list[str] = []
    failed: set[str] = set()

    class Flaky(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(files), **kw)

        def do_GET(self):  # noqa: N802
            requests.append(self.path)
            if self.path.endswith("part_01.jsonl") and self.path not in failed:
                failed.add(self.path)  # the first download of this file fails mid-way
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self.wfile.write(b'{"text": "trunc')
                return
            super().do_GET()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        cache = tmp_path / "cache"
        for source, out in ((f"{base}/*.*", tmp_path / "http"), (f"file://{files}", tmp_path / "file")):
            cfg = data_cfg(source, out, gpt2_ranks, val_tokens=0, cache_dir=str(cache), minhash_dedup=False)
            m = run_data_stage(cfg, RayConfig())
            assert m["stats"]["docs_kept"] == 10
            assert [s["name"] for s in m["sources"]] == ["part_00.parquet", "part_01.jsonl"]
            for s, f in zip(m["sources"], c.files):
                assert s["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
        assert failed, "the flaky file was never requested"
        # A second run finds complete copies in the cache and downloads nothing.
        gets = len([r for r in requests if r.endswith((".parquet", ".jsonl"))])
        run_data_stage(data_cfg(f"{base}/*.*", tmp_path / "http2", gpt2_ranks, val_tokens=0, cache_dir=str(cache),
                                minhash_dedup=False), RayConfig())
        assert len([r for r in requests if r.endswith((".parquet", ".jsonl"))]) == gets
    finally:
        server.shutdown()


# --- shard reader contract ------------------------------------------------------------------


def test_truncated_shard_and_unknown_manifest_version_are_detected(built, tmp_path):
    import shutil

    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = next(copy.glob("train_*.bin"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    with pytest.raises(ShardError, match=rf"{shard.name}: truncated shard"):
        TokenDataset(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="manifest version 99 is not supported"):
        TokenDataset(copy)


def test_joins_an_existing_ray_cluster(corpus, tmp_path, gpt2_ranks, cli_reference):
    """`ray.address`: the stage runs on a cluster someone else started (here `ray start --head`)."""
    import shutil
    import socket
    import tempfile

    from tests.conftest import skip_or_fail

    ray_exe = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    head_log = tmp_path / "head.log"
    head = subprocess.Popen([ray_exe, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--block", f"--temp-dir={temp}"],
                            stdout=open(head_log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})  # a cluster with token auth needs RAY_AUTH_MODE=token in clients
    try:
        deadline = time.time() + 90
        while "Ray runtime started" not in head_log.read_text(errors="replace"):
            if head.poll() is not None or time.time() > deadline:
                skip_or_fail(f"cannot start a Ray head node: {head_log.read_text()[-1500:]}")
            time.sleep(0.5)
        src, _ = corpus
        out = tmp_path / "out"
        cfg = write_config(tmp_path / "c.yaml", src, out, gpt2_ranks, 0)
        r = run_cli("data", str(cfg), f"ray.address=127.0.0.1:{port}")
        assert r.returncode == 0, r.stderr[-3000:]
        assert identity(out) == cli_reference
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


# --- shard contents are verified before their tokens are used --------------------------------


def _flip_byte(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))


def test_flipped_byte_in_a_shard_body_is_refused_before_training_uses_it(tmp_path):
    """Header and size stay valid, so opening succeeds; the first read of the shard must fail."""
    from tests.trainer_helpers import make_shard_dir
    from trainer.data import TrainLoader, ValBatches

    data = make_shard_dir(tmp_path / "data", seed=4, train_shards=4, shard_tokens=2000)
    ds = TokenDataset(data)
    bad_id = 2
    bad = ds.split("train")[bad_id].path
    _flip_byte(bad, HEADER_BYTES + 2 * 777)  # one token's low byte, mid-shard
    _flip_byte(data / "val_000000.bin", HEADER_BYTES + 2 * 5)

    ds = TokenDataset(data)  # a fresh process's view: header and size are fine
    loader = TrainLoader(ds, 2, 16, rank=0, world_size=1, seed=3)
    used: list[int] = []
    with pytest.raises(ShardError, match=rf"{bad.name}: corrupt shard: sha256 \w+ does not match the manifest's"):
        for _ in range(10_000):  # more than one epoch
            st = loader._normalise(loader.state)
            shard_id = loader.order(st.epoch)[st.shard_index]
            loader.next_batch()
            used.append(shard_id)
    assert bad_id not in used, "tokens of the corrupt shard were handed out"
    assert used, "the shards before the corrupt one in the epoch's order were usable"
    val = ValBatches(ds, 2, 16, rank=0, world_size=1, n_batches=4)
    with pytest.raises(ShardError, match=r"val_000000\.bin: corrupt shard"):
        next(iter(val))
    with pytest.raises(ShardError, match="corrupt shard"):
        ds.verify()


def test_token_id_outside_the_vocabulary_is_refused_at_shard_open(tmp_path):
    """A shard whose manifest hash is right but holds an id the model cannot embed (>= 50257)."""
    from dataprep.shards import write_shard
    from tests.trainer_helpers import make_shard_dir

    data = make_shard_dir(tmp_path / "data", seed=5, train_shards=2, shard_tokens=2000)
    manifest = json.loads((data / "manifest.json").read_text())
    tokens = np.asarray(TokenDataset(data).tokens(TokenDataset(data).split("train")[1])).copy()
    tokens[1234] = 50257
    n, sha = write_shard(data / "train_000001.bin", [tokens])
    manifest["shards"][1].update(tokens=n, sha256=sha)
    (data / "manifest.json").write_text(json.dumps(manifest))

    ds = TokenDataset(data)
    assert np.asarray(ds.tokens(ds.split("train")[0])).max() < 50257  # the good shard is served
    with pytest.raises(ShardError, match=r"train_000001\.bin: token id 50257 at token 1234 is outside the vocabulary \(ids must be < 50257\)"):
        ds.tokens(ds.split("train")[1])
    # the model's (smaller) vocabulary can only tighten the limit
    with pytest.raises(ShardError, match=r"train_000000\.bin: token id \d+ at token \d+ is outside the vocabulary \(ids must be < 1000\)"):
        TokenDataset(data, vocab_size=1000).tokens(ds.split("train")[0])


# --- a local Ray instance listens on loopback only -----------------------------------------

RAY_PROBE = r"""
import json, os, sys
import ray
from dataprep.config import RayConfig
from dataprep.local_ray import start_ray

assert start_ray(RayConfig(num_cpus=2)), "Ray was already running"

@ray.remote
def pid():
    return os.getpid()

print(json.dumps(sorted(set(ray.get([pid.remote() for _ in range(8)])))), flush=True)
sys.stdin.readline()  # the test looks at the sockets now
ray.shutdown()
"""


def _process_tree(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, _, fields in live_processes():
        children.setdefault(int(fields[1]), []).append(pid)
    tree, todo = set(), [root]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo.extend(children.get(p, []))
    return tree


def _listening_tcp(pids: set[int]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of ``pids``, from /proc."""
    import ipaddress

    owner: dict[str, str] = {}
    for pid in pids:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    owner[link[8:-1]] = comm
        except OSError:
            continue
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state != "0A" or inode not in owner:  # 0A = LISTEN
                continue
            hexaddr, hexport = local.split(":")
            raw = bytes.fromhex(hexaddr)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # kernel words are little-endian
            found.append((owner[inode], str(ipaddress.ip_address(raw)), int(hexport, 16)))
    return found


def _is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def test_local_ray_of_the_data_stage_listens_on_loopback_only(tmp_path):
    """The data stage's own Ray (GCS, raylet, workers, agents) must not be reachable from the network."""
    proc = subprocess.Popen([sys.executable, "-c", RAY_PROBE], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=open(tmp_path / "ray.err", "wb"), text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        if not line:
            from tests.conftest import skip_or_fail

            skip_or_fail(f"cannot start a local Ray instance: {(tmp_path / 'ray.err').read_text()[-2000:]}")
        workers = set(json.loads(line))
        tree = _process_tree(proc.pid)
        assert workers <= tree, "the probe must see the Ray processes it started"
        sockets = _listening_tcp(tree)
        names = {name for name, _, _ in sockets}
        assert {"gcs_server", "raylet"} <= names, sockets  # the servers are there: the check below is not vacuous
        assert any(name.startswith("ray::") for name in names), sockets  # and the workers' own servers
        exposed = [s for s in sockets if not _is_loopback(s[1])]
        assert not exposed, f"listening beyond loopback: {exposed}"
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0, (tmp_path / "ray.err").read_text()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
