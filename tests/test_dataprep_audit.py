"""The data stage as a user meets it after a kill or a change of mind: nothing another build wrote is
replaced or deleted, what a kill left beside a dataset does not stay there for good, and a jsonl
line no parser can take is bad data (exit 2), not a crash.

Each test builds a small corpus in ``tmp_path`` and runs the real stage (in-process Ray).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from common.durable import temp_name
from dataprep.config import RayConfig
from dataprep.errors import DataError
from dataprep.pipeline import run_data_stage
from tests.test_data import data_cfg
from tests.test_data_inputs import shard_bytes, small_corpus

SMALL = dict(val_tokens=0, minhash_dedup=False, chunk_docs=10)


def every_file(out: Path) -> dict[str, str]:
    """sha256 of every file under ``out``, hidden ones and the work dir's included."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*")) if p.is_file()}


def unfinished_build(tmp_path: Path, gpt2_ranks: str) -> tuple[Path, Path]:
    """A build killed just before its commit: work dir (every task done), shards, no manifest; plus a
    file of the user's beside it whose name looks like a shard's (``*_*.bin``)."""
    src, out = tmp_path / "src", tmp_path / "out"
    small_corpus(src)
    run_data_stage(data_cfg(src, out, gpt2_ranks, keep_work=True, **SMALL), RayConfig())
    (out / "manifest.json").unlink()
    (out / "training_args.bin").write_bytes(b"the user's own file")
    return src, out


def test_changed_settings_or_sources_on_an_unfinished_build_are_refused_and_its_work_kept(tmp_path, gpt2_ranks, ray_cluster):
    """Was: the other build's work dir discarded without a word (exit 0; every finished task of a
    preempted run lost to a forgotten override), and with it every ``*_*.bin`` in the output dir."""
    src, out = unfinished_build(tmp_path, gpt2_ranks)
    before = every_file(out)
    with pytest.raises(DataError, match=re.escape("unfinished work of a build with other inputs or settings (shard_tokens 60000 -> 50000)")) as e:
        run_data_stage(data_cfg(src, out, gpt2_ranks, keep_work=True, **{**SMALL, "shard_tokens": 50_000}), RayConfig())
    assert e.value.exit_code == 2 and f"delete {out / '.work'} to start over" in str(e.value)
    assert every_file(out) == before  # nothing touched
    jsonl = next(src.glob("*.jsonl"))
    jsonl.write_text(jsonl.read_text() + json.dumps({"id": "new", "text": "A document added after the kill."}) + "\n")
    with pytest.raises(DataError, match=re.escape(f"(source files: {jsonl.name} changed)")):
        run_data_stage(data_cfg(src, out, gpt2_ranks, keep_work=True, **SMALL), RayConfig())
    assert every_file(out) == before


def test_a_work_dir_without_its_fingerprint_is_discarded_with_its_shards_only(tmp_path, gpt2_ranks, ray_cluster):
    """What a discard killed half-way leaves is still cleared, but the files deleted with it are the
    stage's shards, not every ``*_*.bin`` (the user's ``training_args.bin`` went too)."""
    src, out = unfinished_build(tmp_path, gpt2_ranks)
    (out / ".work" / "fingerprint").unlink()
    m = run_data_stage(data_cfg(src, out, gpt2_ranks, **SMALL), RayConfig())
    assert (out / "training_args.bin").read_bytes() == b"the user's own file"
    assert sorted(shard_bytes(out)) == sorted(s["path"] for s in m["shards"]) + ["training_args.bin"]


def test_what_a_kill_left_beside_a_dataset_goes_with_the_next_run(tmp_path, gpt2_ranks, ray_cluster):
    """A SIGKILL while a shard, removed.jsonl or the manifest was written leaves its temp file (a
    shard's is up to 200 MB); one during the final discard, after the commit, leaves the renamed work
    dir (every chunk's tokens). The rerun found the dataset complete ("nothing to do") and kept them
    for good. It removes them, and only them."""
    src, out = tmp_path / "src", tmp_path / "out"
    small_corpus(src)
    cfg = data_cfg(src, out, gpt2_ranks, **SMALL)
    run_data_stage(cfg, RayConfig())
    finished = every_file(out)
    trash = out / ".work.trash.4242.1795811959555719427"
    (trash / "tokens").mkdir(parents=True)
    (trash / "tokens" / "000000.bin").write_bytes(b"\0" * 4096)
    temps = [temp_name(out / n).with_suffix(".31337") for n in ("train_000000.bin", "manifest.json", "removed.jsonl")]
    for t in temps:
        t.write_bytes(b"partial")
    kept = [out / ".train_000000.bin.tmp.notapid", out / ".notes.tmp.1"]  # not the stage's names: left alone
    for k in kept:
        k.write_bytes(b"x")
    run_data_stage(cfg, RayConfig())
    assert not trash.exists() and not any(t.exists() for t in temps)
    assert every_file(out) == {**finished, **{k.name: hashlib.sha256(b"x").hexdigest() for k in kept}}


def test_a_jsonl_line_nested_too_deeply_is_refused_naming_file_and_row(tmp_path, gpt2_ranks, ray_cluster):
    """Was a RecursionError traceback from the Ray task: exit 1, "a retry may help", which it never does."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "deep.jsonl").write_bytes(b'{"text": "A fine first document."}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n")
    with pytest.raises(DataError, match=re.escape("deep.jsonl: row 1 (line 2) is not a usable JSON object: nested too deeply")) as e:
        run_data_stage(data_cfg(src, tmp_path / "out", gpt2_ranks, **SMALL), RayConfig())
    assert e.value.exit_code == 2


def test_a_text_column_in_any_arrow_text_type_gives_the_plain_string_files_shards(tmp_path, gpt2_ranks, ray_cluster):
    """Was: a pandas ``category`` column (a dictionary of strings), ``string_view`` and every other
    dictionary were refused ("has type dictionary<...>, expected string", exit 2) though their values
    are text. Each gives the plain ``string`` file's shards and removed.jsonl, byte for byte (ids of
    the same type: pandas writes ``category`` columns in pairs); an integer column is still refused."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"Document {i} is about the river number {i * 7} and its {i} hills." for i in range(30)]
    texts += ["   ", None, texts[3]]  # empty, null, exact duplicate: the per-row statuses as well
    ids = [f"d{i}" for i in range(len(texts))]

    def build(name: str, write) -> dict[str, bytes]:
        src, out = tmp_path / name / "src", tmp_path / name / "out"
        src.mkdir(parents=True)
        write(src / "a.parquet")
        run_data_stage(data_cfg(src, out, gpt2_ranks, **SMALL), RayConfig())
        return {**shard_bytes(out), "removed.jsonl": (out / "removed.jsonl").read_bytes()}

    def typed(t: pa.DataType):
        table = pa.table({"id": pa.array(ids).cast(t), "text": pa.array(texts).cast(t)})
        return lambda path: pq.write_table(table, path, row_group_size=10)

    plain = build("string", typed(pa.string()))
    assert len(plain) > 1 and b'"empty"' in plain["removed.jsonl"]
    for t in (pa.large_string(), pa.string_view(), pa.dictionary(pa.int32(), pa.string()), pa.dictionary(pa.int32(), pa.large_string())):
        assert build(str(t).replace("<", "_").replace(">", "_"), typed(t)) == plain, t
    frame = pd.DataFrame({"id": pd.Categorical(ids), "text": pd.Categorical(texts)})
    assert build("pandas_category", lambda path: frame.to_parquet(path, row_group_size=10)) == plain
    numbers = pa.table({"id": ids, "text": list(range(len(texts)))})
    with pytest.raises(DataError, match=re.escape("a.parquet: column 'text' has type int64, expected string")) as e:
        build("int64", lambda path: pq.write_table(numbers, path))
    assert e.value.exit_code == 2


def test_nothing_of_a_local_ray_outlives_its_killed_driver(tmp_path, gpt2_ranks):
    """``kill -9`` of `pretrain data` alone (the OOM killer, a closed terminal) mid-wave: the GCS and
    raylet died with it, but ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent`` (200 MiB, a port,
    the session dir's files) lived on for 60 s and more, reporting the raylet's death to the dead
    GCS. Now every process of its session is gone within seconds."""
    from tests.test_data import session_processes, start_data_run, work_records, write_config

    small_corpus(tmp_path / "src")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "src", out, gpt2_ranks, 2, **SMALL)
    proc = start_data_run(cfg, work_records(out, "scan", 1))
    before = session_processes(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    try:
        assert {"ray::DashboardA", "ray::RuntimeEnv", "raylet"} <= {p.split(" ", 1)[1] for p in before}, before
        while (left := session_processes(proc.pid)) and time.monotonic() - t0 < 5:
            time.sleep(0.1)
        assert not left, f"still running {time.monotonic() - t0:.1f} s after the driver's death: {left}"
    finally:
        for pid in [int(p.split(" ", 1)[0]) for p in session_processes(proc.pid)]:
            os.kill(pid, signal.SIGKILL)  # what this test started: not left for the next ones
