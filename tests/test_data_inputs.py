"""The data stage against leftovers and awkward inputs: a work dir a kill left half-deleted, an
edited local source, ids that are not encodable text, corrupt compressed files, missing paths.

Each test builds its own small corpus in ``tmp_path`` and runs the real stage (in-process Ray).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dataprep.config import RayConfig
from dataprep.packing import ShardPlan
from dataprep.pipeline import run_data_stage, task_write_shard
from tests.corpus import Corpus, write_files
from tests.test_data import data_cfg, tree_digest


def small_corpus(directory: Path, n: int = 40, n_files: int = 2) -> Corpus:
    """``n`` short distinct documents in ``n_files`` files (parquet, jsonl)."""
    c = Corpus(docs=[{"id": f"d{i}", "text": f"Document {i} is about the river number {i * 7} and its {i} hills."} for i in range(n)])
    write_files(directory, c, n_files)
    return c


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*_*.bin"))}


# --- 1. a work dir that lost its fingerprint ----------------------------------------------------


def test_a_work_dir_without_its_fingerprint_is_not_reused_for_other_settings(tmp_path, gpt2_ranks, ray_cluster):
    """What a kill during the old ``rmtree(.work)`` left: intermediates and shard records with no
    ``fingerprint``. The rerun with another shuffle seed must not take them for its own (it kept
    the old seed's shards while the manifest said seed 7)."""
    src = tmp_path / "src"
    small_corpus(src)
    kw = dict(val_tokens=0, minhash_dedup=False)  # one train shard holding every document, in either order
    out = tmp_path / "out"
    run_data_stage(data_cfg(src, out, gpt2_ranks, keep_work=True, **kw), RayConfig())
    (out / "manifest.json").unlink()
    (out / ".work" / "fingerprint").unlink()
    (out / ".work.trash.1.2" / "scan").mkdir(parents=True)  # a discard killed after its rename
    m = run_data_stage(data_cfg(src, out, gpt2_ranks, shuffle_seed=7, **kw), RayConfig())
    fresh = tmp_path / "fresh"
    run_data_stage(data_cfg(src, fresh, gpt2_ranks, shuffle_seed=7, **kw), RayConfig())
    assert m["config"]["shuffle_seed"] == 7
    assert shard_bytes(out) == shard_bytes(fresh) and tree_digest(out) == tree_digest(fresh)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lock"]  # no work or trash left


def _token_work(work: Path, tokens: np.ndarray) -> None:
    (work / "tokens").mkdir(parents=True)
    (work / "shards").mkdir()
    tokens.astype("<u2").tofile(work / "tokens" / "000000.bin")


def test_a_shard_record_of_another_plan_is_not_reused(tmp_path):
    """Same name, split, size and document count, other order: the shard is written again."""
    work, out = tmp_path / ".work", tmp_path
    _token_work(work, np.arange(100, 130))
    first = ShardPlan("train_000000.bin", "train", np.array([[0, 0, 10], [0, 10, 30]], np.int64), 30, 2)
    other = ShardPlan("train_000000.bin", "train", np.array([[0, 10, 30], [0, 0, 10]], np.int64), 30, 2)
    task_write_shard(first, out, work)
    record = task_write_shard(other, out, work)
    body = np.fromfile(out / "train_000000.bin", "<u2")[-30:]
    assert body.tolist() == list(range(110, 130)) + list(range(100, 110))
    assert "plan" not in record and json.loads((work / "shards" / "train_000000.bin.json").read_text())["sha256"] == record["sha256"]
    assert task_write_shard(other, out, work) == record  # the same plan: skipped, same record


# --- 2. an edited file:// source ---------------------------------------------------------------


def test_an_edited_file_url_source_is_copied_again(tmp_path, gpt2_ranks, ray_cluster):
    """Same size, new bytes: the cache's copy (checked by URL and size only) was reused, and the
    manifest named the old sha256."""
    import hashlib
    import os

    src = tmp_path / "src"
    small_corpus(src, n_files=2)
    jsonl = src / "part_01.jsonl"
    kw = dict(val_tokens=0, minhash_dedup=False, cache_dir=str(tmp_path / "cache"))
    first = run_data_stage(data_cfg(f"file://{src}", tmp_path / "out1", gpt2_ranks, **kw), RayConfig())
    edited = jsonl.read_bytes().replace(b"river", b"ocean")
    assert len(edited) == jsonl.stat().st_size
    jsonl.write_bytes(edited)
    st = jsonl.stat()
    os.utime(jsonl, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a coarse clock may not have moved
    second = run_data_stage(data_cfg(f"file://{src}", tmp_path / "out2", gpt2_ranks, **kw), RayConfig())
    sha = {s["name"]: s["sha256"] for s in second["sources"]}
    assert sha["part_01.jsonl"] == hashlib.sha256(edited).hexdigest() != {s["name"]: s["sha256"] for s in first["sources"]}["part_01.jsonl"]
    assert sha["part_00.parquet"] == hashlib.sha256((src / "part_00.parquet").read_bytes()).hexdigest()
    assert second["stats"]["docs_kept"] == first["stats"]["docs_kept"]


# --- 3, 4. ids that are not encodable text -------------------------------------------------------


def removed_ids(out: Path) -> dict[str, str]:
    return {json.loads(l)["id"]: json.loads(l)["reason"] for l in (out / "removed.jsonl").read_bytes().decode("utf-8").splitlines()}


def test_a_lone_surrogate_id_in_jsonl_is_written_as_a_replacement_character(tmp_path, gpt2_ranks, ray_cluster):
    """``\\ud800`` is valid JSON but not encodable text: removed.jsonl crashed with UnicodeEncodeError
    after all the work (exit 1, on every rerun)."""
    src = tmp_path / "src"
    src.mkdir()
    good = [json.dumps({"id": f"g{i}", "text": f"An ordinary document {i} about rivers."}) for i in range(3)]
    (src / "a.jsonl").write_text("\n".join([good[0], '{"id": "bad\\ud800id", "text": "  "}', *good[1:]]) + "\n")
    out = tmp_path / "out"
    m = run_data_stage(data_cfg(src, out, gpt2_ranks, val_tokens=0, minhash_dedup=False), RayConfig())
    assert m["stats"]["docs_kept"] == 3 and m["stats"]["removed"]["empty"] == 1
    assert removed_ids(out) == {"bad\ufffdid": "empty"}


def test_a_parquet_id_that_is_not_utf8_is_decoded_with_replacement_characters(tmp_path, gpt2_ranks, ray_cluster):
    """Arrow reads such a file without complaint; turning the id into Python raised UnicodeDecodeError (exit 1)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    ids = pa.array([b"p0", b"\xff\xfe", b"p2"], pa.binary()).view(pa.string())
    texts = ["An ordinary document about rivers.", "   ", "Another document about hills."]
    pq.write_table(pa.table({"id": ids, "text": texts}), src / "b.parquet")
    out = tmp_path / "out"
    m = run_data_stage(data_cfg(src, out, gpt2_ranks, val_tokens=0, minhash_dedup=False), RayConfig())
    assert m["stats"]["docs_kept"] == 2 and removed_ids(out) == {"\ufffd\ufffd": "empty"}


# --- 5. a corrupt gzip body --------------------------------------------------------------------


def corrupt_gzip(path: Path, rows: int = 200) -> None:
    """A jsonl.gz whose deflate stream is damaged (bytes 200-260 flipped): zlib.error, not OSError."""
    import gzip

    lines = [json.dumps({"id": f"z{i}", "text": f"Row {i}: a document about the {i}th river and hill."}) for i in range(rows)]
    data = bytearray(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
    data[200:260] = bytes(b ^ 0xFF for b in data[200:260])
    path.write_bytes(bytes(data))


def test_a_corrupt_gzip_body_is_refused_naming_the_file(tmp_path, gpt2_ranks, ray_cluster):
    from dataprep.errors import DataError

    src = tmp_path / "src"
    src.mkdir()
    corrupt_gzip(src / "a.jsonl.gz")
    with pytest.raises(DataError, match=r"a\.jsonl\.gz: unreadable file after row \d+: error: Error -3") as e:
        run_data_stage(data_cfg(src, tmp_path / "out", gpt2_ranks), RayConfig())
    assert e.value.exit_code == 2


def test_a_gzip_that_turns_corrupt_after_planning_is_refused_naming_the_row(tmp_path):
    """The reader of a chunk (not only the planner) turns a damaged stream into a DataError."""
    from dataprep.documents import Chunk, read_chunk
    from dataprep.errors import DataError
    from dataprep.sources import describe_local

    path = tmp_path / "a.jsonl.gz"
    corrupt_gzip(path)
    with pytest.raises(DataError, match=r"a\.jsonl\.gz: unreadable file at row (\d+): error: ") as e:
        list(read_chunk(describe_local("a.jsonl.gz", str(path)), Chunk(0, 0, 0, 200), "text", "id"))
    assert 0 <= int(e.value.args[0].split("at row ")[1].split(":")[0]) < 200


# --- 7. a missing file:// path -------------------------------------------------------------------


def test_a_missing_file_url_is_refused_at_once(tmp_path, gpt2_ranks):
    """It was retried 5 times with backoff (~15 s), then exit 1, as if a rerun could find it."""
    import time

    from dataprep.errors import DataError
    from dataprep.sources import download

    missing = tmp_path / "missing" / "a.parquet"
    t0 = time.monotonic()
    with pytest.raises(DataError, match=rf"data.source: local path {missing} \(from file://{missing}\) does not exist") as e:
        run_data_stage(data_cfg(f"file://{missing}", tmp_path / "out", gpt2_ranks, download_retries=5), RayConfig())
    assert e.value.exit_code == 2 and not (tmp_path / "out").exists()
    # gone between the listing and the copy: refused too, not retried
    with pytest.raises(DataError, match=rf"file://{missing}: no such file") as e:
        download(f"file://{missing}", "a.parquet", tmp_path / "cache", retries=5, backoff_s=1.0)
    assert e.value.exit_code == 2 and time.monotonic() - t0 < 5


# --- 6. what a finished SLURM data job came to --------------------------------------------------


def finished_job(tmp_path: Path, stderr: str):
    """A finished job as pipelines.data_job reads it: its two log files (no SLURM needed to read them)."""
    from types import SimpleNamespace

    out, err = tmp_path / "1234_0_log.out", tmp_path / "1234_0_log.err"
    out.write_text("[node_command] job 1234 node 0/1 restart 0: python -m pipelines.cli data c.yaml\n")
    err.write_text(stderr)
    return SimpleNamespace(paths=SimpleNamespace(stdout=out, stderr=err), done=lambda: True)


def test_a_refused_data_job_is_not_reported_finished_over_a_dataset_of_other_settings(tmp_path, gpt2_ranks, ray_cluster):
    """The job exited 2 (output_dir holds a dataset of shuffle_seed 1234, the config says 7): --wait
    said "finished" (exit 0) because a manifest loaded."""
    from pipelines.config import load_config
    from pipelines.data_job import data_job_outcome, wait_for_data

    src = tmp_path / "src"
    small_corpus(src)
    keys = [f"data.source={src}", f"data.output_dir={tmp_path / 'out'}", f"data.tokenizer_file={gpt2_ranks}",
            f"data.cache_dir={tmp_path / 'cache'}", "data.val_tokens=0", "data.minhash_dedup=false"]  # fmt: skip
    built = load_config(None, keys)
    run_data_stage(built.data, RayConfig())
    other = load_config(None, [*keys, "data.shuffle_seed=7"])
    refused = finished_job(tmp_path, "Traceback ...\nRuntimeError: python exited with code 2 (refused: fix the config or the data; not requeued)\n")
    code, what = wait_for_data(refused, other, poll_s=0)
    assert (code, "the data stage exited 2") == (2, what[what.index("(") + 1 : what.index(")")])
    silent = finished_job(tmp_path, "")  # no exit line (a log that was lost): the manifest must record this config
    code, what = data_job_outcome(silent, other)
    assert code == 2 and "other settings (shuffle_seed 1234 -> 7)" in what
    assert data_job_outcome(silent, built)[0] == 0
    assert data_job_outcome(finished_job(tmp_path, "RuntimeError: python exited with code 1 (failed; ...)\n"), built)[0] == 1


# --- 8. nothing survives cleaning ------------------------------------------------------------------


def test_a_corpus_that_cleaning_empties_says_so_with_the_reasons(tmp_path, gpt2_ranks, ray_cluster):
    """It said "only 0 tokens survive cleaning, all taken by validation (data.val_tokens=0); lower data.val_tokens"."""
    from dataprep.errors import DataError

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(b'{"text": "  "}\n{"text": null}\n{"text": "caf\xe9"}\n{"text": "\\t"}\n')
    with pytest.raises(DataError, match=r"every document was removed by cleaning \(4 in: empty 3, invalid_utf8 1\); nothing to shard") as e:
        run_data_stage(data_cfg(src, tmp_path / "out", gpt2_ranks, val_tokens=0), RayConfig())
    assert e.value.exit_code == 2 and "val_tokens" not in str(e.value)


# --- 9. s3:// and gs:// without their fsspec package ---------------------------------------------


@pytest.mark.parametrize("url, package", [("s3://bucket/corpus/*.parquet", "s3fs"), ("gs://bucket/a.parquet", "gcsfs")])
def test_a_cloud_source_without_its_package_names_what_to_install(tmp_path, gpt2_ranks, url, package):
    """It was an ImportError traceback (exit 1)."""
    import importlib.util

    from dataprep.errors import DataError

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(DataError, match=rf"data.source: reading {url[:2]}:// needs a package that is not installed \(.+\): pip install {package}$") as e:
        run_data_stage(data_cfg(url, tmp_path / "out", gpt2_ranks), RayConfig())
    assert e.value.exit_code == 2
