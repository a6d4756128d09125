"""The data stage at cases its other tests left open: an output directory inside the source
directory, a glob or file that names something that is not parquet/jsonl(.gz), and a damaged
manifest in the output directory.

Each test builds a tiny corpus in ``tmp_path`` and runs the real stage on the shared in-process
Ray (``ray_cluster``); MinHash is off (the tiny documents differ only in digits, which its
normaliser maps to 0) and there is no validation split, so a run takes about a second.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest

from dataprep.config import RayConfig
from dataprep.errors import DataError
from dataprep.pipeline import run_data_stage
from tests.test_data import data_cfg
from tests.test_data_inputs import shard_bytes, small_corpus

SMALL = dict(val_tokens=0, minhash_dedup=False, chunk_docs=10)


def mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"}


@pytest.mark.parametrize("where", ["inside", "same", "file-url"])
def test_an_output_dir_in_the_source_dir_is_not_read_as_input_on_a_resume_or_a_rerun(tmp_path, gpt2_ranks, ray_cluster, where):
    """Defect fixed: the stage's own removed.jsonl (and, after a kill, .work/tokens/*.removed.jsonl)
    was listed as a source on the next run: a killed run's work was discarded and the resume failed
    ("out/removed.jsonl: row 0 has no 'text' field"), and a rerun of the finished dataset was
    refused as "built from other inputs" instead of doing nothing."""
    src = tmp_path / "src"
    small_corpus(src, n=40)
    out = src if where == "same" else src / "out"
    source = f"file://{src}" if where == "file-url" else src
    kw = dict(SMALL, cache_dir=str(tmp_path / "cache"))
    fresh = tmp_path / "fresh"
    run_data_stage(data_cfg(source, fresh, gpt2_ranks, **kw), RayConfig())

    run_data_stage(data_cfg(source, out, gpt2_ranks, keep_work=True, **kw), RayConfig())
    (out / "manifest.json").unlink()  # what a kill just before the commit leaves: .work, shards, removed.jsonl
    work = sorted((out / ".work" / "tokens").glob("*.stats.json"))
    before = {p.name: p.stat().st_mtime_ns for p in work}
    m = run_data_stage(data_cfg(source, out, gpt2_ranks, keep_work=True, **kw), RayConfig())
    assert {p.name: p.stat().st_mtime_ns for p in work} == before, "the finished tokenize tasks were redone"
    assert [s["name"] for s in m["sources"]] == ["part_00.parquet", "part_01.jsonl"]
    assert shard_bytes(out) == shard_bytes(fresh)
    assert (out / "removed.jsonl").read_bytes() == (fresh / "removed.jsonl").read_bytes()

    finished = mtimes(out)
    again = run_data_stage(data_cfg(source, out, gpt2_ranks, **kw), RayConfig())  # nothing to do
    assert mtimes(out) == finished and again["plan_fingerprint"] == m["plan_fingerprint"]


def test_a_glob_or_a_file_of_an_unsupported_type_is_refused_naming_it(tmp_path, gpt2_ranks, ray_cluster):
    """Defect fixed: a glob (or a named file) matching ``b.jsonl.zst`` read it as plain jsonl: its
    compressed lines were counted as invalid UTF-8 and dropped, and the stage exited 0 with a
    dataset that silently lacked the file. A directory keeps skipping such files, as documented."""
    src = tmp_path / "src"
    src.mkdir()
    docs = [f"Document {w} is about the sea, the wind and the {w} rivers of the north." for w in ("one", "two", "three", "four")]
    (src / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:2]))
    packed = zlib.compress("".join(json.dumps({"text": t}) + "\n" for t in docs[2:]).encode(), 9)
    (src / "b.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + packed)  # zstd's magic, then bytes that are not UTF-8 text
    for source in (f"{src}/*", src / "b.jsonl.zst"):
        out = tmp_path / "out"
        with pytest.raises(DataError, match=r"b\.jsonl\.zst: not a supported file type") as e:
            run_data_stage(data_cfg(source, out, gpt2_ranks, **SMALL), RayConfig())
        assert e.value.exit_code == 2 and not (out / "manifest.json").exists()
    m = run_data_stage(data_cfg(src, tmp_path / "dir", gpt2_ranks, **SMALL), RayConfig())
    assert [s["name"] for s in m["sources"]] == ["a.jsonl"] and m["stats"]["docs_kept"] == 2


@pytest.mark.parametrize("content", [b'{"format": "pretrain-token-sh', b"[]", b'{"plan_fingerprint": "x", "config": [1]}', b"\xff\xfe"],
                         ids=["torn", "list", "config-list", "not-utf8"])
def test_an_unreadable_manifest_in_the_output_dir_is_refused_naming_it_and_touched_nowhere(tmp_path, gpt2_ranks, ray_cluster, content):
    """Defect fixed: a manifest.json that is not a JSON object (damaged outside the stage: it is
    written atomically) was a JSONDecodeError or AttributeError traceback, exit 1 ("a rerun may
    help"), though no rerun can; now exit 2 naming the file, and nothing in the directory changes."""
    src = tmp_path / "src"
    small_corpus(src, n=12)
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_bytes(content)
    (out / "train_000000.bin").write_bytes(b"someone's shard")
    with pytest.raises(DataError, match=r"manifest\.json: unreadable manifest \(.*\); restore it, or delete .* to rebuild the dataset") as e:
        run_data_stage(data_cfg(src, out, gpt2_ranks, **SMALL), RayConfig())
    assert e.value.exit_code == 2
    assert (out / "manifest.json").read_bytes() == content and (out / "train_000000.bin").read_bytes() == b"someone's shard"
    assert sorted(p.name for p in out.iterdir()) == [".lock", "manifest.json", "train_000000.bin"]


def test_a_ray_address_where_no_cluster_answers_is_a_clear_retryable_error_in_seconds(tmp_path):
    """It hung for minutes (Ray retries an address nothing answers), and `auto` with no cluster was a
    ConnectionError traceback: now exit 1 (the cluster may be up on a rerun) naming ray.address."""
    import socket
    import time

    from tests.test_data import REPO, run_cli

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    r = run_cli("data", str(REPO / "configs" / "smoke.yaml"), f"data.output_dir={tmp_path / 'out'}", f"ray.address=127.0.0.1:{port}")
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"ray.address 127.0.0.1:{port}: no Ray cluster answers there" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 60
