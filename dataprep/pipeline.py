"""`pretrain data`: the data stage as a sequence of Ray task waves over fixed chunks.

    sources ─► plan (row counts → chunks) ─► scan (validate, exact-dedup keys) ─► exact dedup (driver)
      ─► MinHash signatures ─► buckets ─► cluster ─► tokenize (filter + GPT-2, streamed to chunk token files)
      ─► pack (driver: validation sample, seeded document order; dataprep/packing.py) ─► shards
      ─► removed.jsonl ─► manifest.json (commit marker)

One writer per dataset: `OUTPUT_DIR/.lock` is held throughout (dataprep/output_lock.py).

Restartability: every task writes its result under `OUTPUT_DIR/.work/` atomically and is skipped
when that result exists, so a killed run resumes where it was. The work directory is tied to a
fingerprint of the inputs and config; the manifest, written last, is the only thing that makes a
shard directory valid. Determinism: work units and their order depend only on the input and the
config, results are combined in chunk order, the shuffle is a function of `data.shuffle_seed` and
the documents' corpus positions, and the manifest holds no timestamps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from common.durable import atomic_output, atomic_write_bytes, atomic_write_json, fsync_dir
from dataprep import dedup
from dataprep.config import DataConfig, RayConfig
from dataprep.documents import REASONS, Chunk, Row, RowStatus, plan_file, read_chunk
from dataprep.errors import DataError, TransientDataError
from dataprep.local_ray import start_ray, stop_ray
from dataprep.output_lock import lock_output_dir
from dataprep.packing import ShardPlan, pack_documents
from dataprep.shards import (
    HEADER_BYTES,
    MAGIC,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    MAX_SHARD_TOKENS,
    SHARD_VERSION,
    read_header,
    write_shard,
)
from dataprep.sources import (
    CacheMeter,
    Listed,
    SourceFile,
    describe_local,
    download,
    is_remote,
    resolve_sources,
)
from dataprep.tokenize import TokenFileWriter, batched_by_chars
from dataprep.tokenizer import TokenizerUnavailable, check_gpt2, get_gpt2

__all__ = ["DataError", "TransientDataError", "run_data_stage", "settings_differences"]

WORK_DIR = ".work"
# Config keys that change the bytes of the output (and so the fingerprint).
OUTPUT_KEYS = (
    "text_column", "id_column", "chunk_docs", "exact_dedup", "minhash_dedup", "minhash_ngrams",
    "minhash_buckets", "minhash_hashes_per_bucket", "minhash_seed", "tokenizer", "shard_tokens", "val_tokens",
    "shuffle_seed",
)  # fmt: skip
REMOVED_NAME = "removed.jsonl"
REMOVAL_REASONS = ("empty", "invalid_utf8", "exact_duplicate", "near_duplicate", "too_long")


# ---------------------------------------------------------------------------------------------
# task bodies (run inside Ray workers; plain functions so they are easy to test and read)


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_output(path) as f:
        np.savez(f, **arrays)


def task_fetch(name: str, location: str, remote: bool, cache_dir: str, retries: int) -> SourceFile:
    if remote:
        return download(location, name, Path(cache_dir).expanduser(), retries)
    return describe_local(name, location)


def task_plan(index: int, src: SourceFile, chunk_docs: int, text_column: str) -> tuple[int, list[tuple[int, int, int]]]:
    return plan_file(index, src, chunk_docs, text_column)


def task_scan(src: SourceFile, chunk: Chunk, cfg: DataConfig, out: Path) -> int:
    """Validate every row of a chunk; store its status and the exact-dedup key of valid rows."""
    if not out.exists():
        status, keys = [], []
        for row in read_chunk(src, chunk, cfg.text_column, cfg.id_column):
            status.append(row.status)
            keys.append(dedup.exact_key(row.text) if row.status == RowStatus.OK else 0)
        _atomic_save_npz(out, status=np.array(status, np.uint8), keys=np.array(keys, np.uint64))
    return chunk.row_end - chunk.row_start


def _dedup_stream(src: SourceFile, chunk: Chunk, cfg: DataConfig, exact_dup_rows: np.ndarray):
    """Rows that reach MinHash: valid and not an exact copy. Signature ids are positions in this stream."""
    dup = set(exact_dup_rows.tolist())
    for row in read_chunk(src, chunk, cfg.text_column, cfg.id_column):
        if row.status == RowStatus.OK and row.row not in dup:
            yield row


def task_signatures(src: SourceFile, chunk: Chunk, n_chunks: int, cfg: DataConfig, exact_dup_rows: np.ndarray, work: Path) -> None:
    done = work / "minhash" / "sigs.done" / f"{chunk.index:06d}"
    if done.exists():
        return
    texts = (r.text for r in _dedup_stream(src, chunk, cfg, exact_dup_rows))
    dedup.write_signatures(texts, chunk.index, n_chunks, work / "minhash" / "sigs", cfg)
    atomic_write_bytes(done, b"")


def task_buckets(bucket: int, cfg: DataConfig, work: Path) -> None:
    done = work / "minhash" / "buckets.done" / f"{bucket:05d}"
    if done.exists():
        return
    dedup.find_bucket_matches(bucket, work / "minhash" / "sigs", work / "minhash" / "dups", cfg)
    atomic_write_bytes(done, b"")


def task_cluster(cfg: DataConfig, work: Path) -> None:
    done = work / "minhash" / "cluster.done"
    if done.exists():
        return
    cluster_dir = work / "minhash" / "clusters"
    shutil.rmtree(cluster_dir, ignore_errors=True)  # a killed run may have left part of it
    dedup.cluster_duplicates(work / "minhash" / "dups", cluster_dir, cfg)
    atomic_write_bytes(done, b"")


def _kept_rows(src: SourceFile, chunk: Chunk, cfg: DataConfig, exact: dict[int, tuple[int, int]], near: set[int],
               stats: dict[str, int], removed: list[dict[str, Any]]) -> Iterator[Row]:
    """The rows of a chunk that survive validation and dedup; the others are counted and listed."""
    stream_pos = 0  # position among rows that reached MinHash (valid, not exact copies)
    for row in read_chunk(src, chunk, cfg.text_column, cfg.id_column):
        stats["docs_in"] += 1
        record = {"file": src.name, "row": row.row, "id": row.doc_id}
        if row.status != RowStatus.OK:
            reason = REASONS[row.status]
        elif row.row in exact:
            reason = "exact_duplicate"
            record["duplicate_of"] = exact[row.row]
        else:
            pos, stream_pos = stream_pos, stream_pos + 1
            if pos not in near:
                yield row
                continue
            reason = "near_duplicate"
        stats[reason] += 1
        removed.append({**record, "reason": reason})


def task_tokenize(
    src: SourceFile,
    chunk: Chunk,
    cfg: DataConfig,
    exact_dup_rows: np.ndarray,
    exact_origins: np.ndarray,
    near_dup_positions: np.ndarray,
    work: Path,
) -> dict[str, int]:
    """Drop invalid/duplicate rows, tokenize the rest, write the chunk's tokens, lengths and removals.

    Tokens are streamed to the chunk's token file batch by batch (see dataprep.tokenize), so the
    worker's memory does not grow with the chunk's token count.
    """
    base = work / "tokens" / f"{chunk.index:06d}"
    stats_path = base.with_suffix(".stats.json")
    if stats_path.exists():
        return json.loads(stats_path.read_text())
    exact = {int(r): (int(c), int(o)) for r, (c, o) in zip(exact_dup_rows, exact_origins)}
    removed: list[dict[str, Any]] = []
    stats = {"docs_in": 0, "kept": 0, "tokens": 0, **dict.fromkeys(REMOVAL_REASONS, 0)}
    rows = _kept_rows(src, chunk, cfg, exact, set(near_dup_positions.tolist()), stats, removed)
    with TokenFileWriter(base.with_suffix(".bin"), get_gpt2(cfg.tokenizer_file), cfg.shard_tokens) as writer:
        for batch in batched_by_chars(rows, lambda r: r.text):
            for i, n in writer.add([r.text for r in batch]):  # too long to fit any shard: dropped, reported
                removed.append({"file": src.name, "row": batch[i].row, "id": batch[i].doc_id, "reason": "too_long", "tokens": n})
                stats["too_long"] += 1
        lengths = writer.lengths
        writer.commit()
    removed.sort(key=lambda r: r["row"])
    stats["kept"] = len(lengths)
    stats["tokens"] = int(lengths.sum())
    _atomic_save_npz(base.with_suffix(".lens.npz"), lengths=lengths)
    atomic_write_bytes(base.with_suffix(".removed.jsonl"), "".join(json.dumps(r, sort_keys=True) + "\n" for r in removed).encode())
    atomic_write_json(stats_path, stats)  # the task's commit marker
    return stats


class _ChunkFiles:
    """Positioned reads from the chunks' token files, with at most ``limit`` of them open at once."""

    def __init__(self, work: Path, limit: int = 128):
        self.work, self.limit = work, limit
        self.fds: OrderedDict[int, int] = OrderedDict()

    def read(self, chunk: int, start: int, end: int, block: int = 1 << 23) -> Iterator[bytes]:
        """Tokens [start, end) of a chunk's token file, as little-endian bytes, in blocks of ``block`` tokens."""
        fd = self.fds.pop(chunk, None)
        if fd is None:
            fd = os.open(self.work / "tokens" / f"{chunk:06d}.bin", os.O_RDONLY)
            if len(self.fds) >= self.limit:
                os.close(self.fds.popitem(last=False)[1])
        self.fds[chunk] = fd
        for pos in range(start, end, block):
            n = 2 * (min(end, pos + block) - pos)
            data = os.pread(fd, n, 2 * pos)
            while len(data) < n:  # a short read is legal; an early end of file is a damaged work dir
                more = os.pread(fd, n - len(data), 2 * pos + len(data))
                if not more:
                    raise DataError(f"{self.work}/tokens/{chunk:06d}.bin: ends before token {end}; delete {self.work} and rerun")
                data += more
            yield data

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.popitem()[1])


def task_write_shard(plan: ShardPlan, output_dir: Path, work: Path) -> dict[str, Any]:
    """Stream the plan's token ranges into one shard (the writer holds one range at a time)."""
    record_path = work / "shards" / f"{plan.name}.json"
    target = output_dir / plan.name
    if record_path.exists() and target.exists():
        record = json.loads(record_path.read_text())
        if record.pop("plan", None) == _plan_digest(plan) and read_header(target) == record["tokens"]:
            return record
    files = _ChunkFiles(work)
    try:
        pieces = (data for chunk, start, end in plan.pieces.tolist() for data in files.read(chunk, start, end))
        tokens, digest = write_shard(target, pieces, plan.tokens)
    finally:
        files.close()
    record = {"path": plan.name, "split": plan.split, "tokens": tokens, "docs": plan.docs, "sha256": digest}
    atomic_write_json(record_path, {**record, "plan": _plan_digest(plan)})
    return record


def _plan_digest(plan: ShardPlan) -> str:
    """What a shard was written from: a record is reused only for the very same plan (not, say,
    a shard of the same name and size cut with another shuffle seed)."""
    h = hashlib.sha256(json.dumps([plan.name, plan.split, plan.tokens, plan.docs]).encode())
    h.update(np.ascontiguousarray(plan.pieces, dtype="<i8").tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# driver


class _WaveBar:
    """A wave's progress bar on stderr: its finished tasks (weighted), or, for a download wave given
    a :class:`CacheMeter`, the bytes received so far with the rate, an ETA once every file's size is
    known, and the files finished. A 2 GB file takes minutes: counting files only showed ``0/N``
    all that while, a slow download looking like a hung one. Where the driver cannot see the
    download cache (a node-local one on a multi-node cluster) it goes back to counting files."""

    def __init__(self, desc: str, unit: str, weights: list[int], meter: CacheMeter | None) -> None:
        self.desc, self.unit, self.weights, self.done, self.polled = f"data: {desc}", unit, weights, 0, time.monotonic()
        first = meter.poll() if meter is not None else None
        self.meter = meter if first is not None else None
        if first is None:
            self.bar = self._count_bar(0)
            return
        # smoothing=0: the rate is the average since the start (less resumed bytes), so it falls
        # while nothing arrives; miniters=0: a stalled download is still redrawn every second
        self.bar = tqdm(total=first[1], initial=first[0], desc=self.desc, unit="B", unit_scale=True, unit_divisor=1024,
                        smoothing=0, miniters=0, mininterval=1.0, file=sys.stderr, postfix=f"0/{len(weights)} files")

    def _count_bar(self, initial: int) -> tqdm:
        return tqdm(total=sum(self.weights), initial=initial, desc=self.desc, unit=self.unit, unit_scale=True,
                    file=sys.stderr, mininterval=1.0)

    def tick(self, force: bool = False) -> None:
        """The bytes in the cache now: once a turn of the wave loop, at most twice a second unless
        ``force`` (a rerun's cached files finish by the thousand, and each poll lists the cache dir)."""
        if self.meter is None or (time.monotonic() - self.polled < 0.5 and not force):
            return
        self.polled = time.monotonic()
        now = self.meter.poll()
        if now is None:
            return
        if now[1] != self.bar.total:
            self.bar.total = now[1]
        self.bar.update(now[0] - self.bar.n)  # negative when a partial starts again from byte 0

    def finished(self, i: int, result: Any) -> None:
        self.done += self.weights[i]
        if self.meter is None:
            self.bar.update(self.weights[i])
        elif self.meter.finished(i, result):
            self.bar.set_postfix_str(f"{self.done}/{len(self.weights)} files", refresh=False)
            self.tick()
        else:  # the driver cannot see what the tasks write: count files
            self.meter = None
            self.bar.close()
            self.bar = self._count_bar(self.done)

    def close(self) -> None:
        self.bar.close()


class _Waves:
    """Runs one wave of Ray tasks with a progress bar; turns a task's DataError into ours."""

    def __init__(self) -> None:
        import ray

        self.ray = ray
        self.seconds: dict[str, float] = {}  # wall time per wave, for the summary and benchmarks

    def run(self, desc: str, fn: Callable, calls: list[tuple], unit: str = "task", weights: list[int] | None = None,
            meter: CacheMeter | None = None) -> list:
        """Run ``fn`` over ``calls``, one Ray task each; their results in order. ``meter``: a download
        wave's progress in bytes (see :class:`_WaveBar`)."""
        ray = self.ray
        remote = ray.remote(num_cpus=1, max_retries=0)(fn)
        t0 = time.perf_counter()
        refs = [remote.remote(*args) for args in calls]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        bar = _WaveBar(desc, unit, weights or [1] * len(refs), meter)
        try:
            while pending:
                # bounded, so that a stop signal is handled within a second, not when a task ends
                ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                if not ready:
                    bar.tick()
                    continue
                i = index[ready[0]]
                try:
                    results[i] = ray.get(ready[0])
                except ray.exceptions.RayTaskError as e:
                    for ref in pending:
                        ray.cancel(ref, force=True)
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, DataError):
                        raise type(cause)(str(cause)) from None  # keeps its kind (exit code)
                    raise
                bar.finished(i, results[i])
            bar.tick(force=True)  # the final count
        finally:
            bar.close()
        self.seconds[desc] = time.perf_counter() - t0
        return results


def _output_config(cfg: DataConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in OUTPUT_KEYS}


def _plan_inputs(cfg: DataConfig, sources: list[SourceFile], ranks_sha256: str) -> dict[str, Any]:
    """Everything the output's bytes depend on: what the fingerprint hashes, and what ``.work/inputs.json``
    records so that a refusal can say what changed."""
    config = _output_config(cfg)
    if cfg.shuffle_seed < 0:
        # Corpus order is what every dataset built before shuffling existed holds: leaving the key
        # out keeps their fingerprint, so they still count as complete with data.shuffle_seed=-1.
        del config["shuffle_seed"]
    return {
        "config": config,
        "sources": [[s.name, s.bytes, s.sha256] for s in sources],
        "tokenizer": ranks_sha256,
        "format": [MANIFEST_FORMAT, MANIFEST_VERSION, SHARD_VERSION],
    }


def _fingerprint(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _changed_settings(recorded: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The output-shaping settings that differ, in words (``shuffle_seed 1234 -> 99``)."""
    return [f"{k} {recorded[k]!r} -> {v!r}" if k in recorded else f"{k} (not recorded) -> {v!r}"
            for k, v in config.items() if recorded.get(k) != v and not (k == "shuffle_seed" and k not in recorded and v < 0)]


def settings_differences(manifest: dict[str, Any], cfg: DataConfig) -> list[str]:
    """How a finished dataset's recorded settings differ from what ``cfg`` would build; empty when
    they agree. All that can be checked without reading every source file again (the plan
    fingerprint also covers their sha256): what a SLURM job's waiter uses."""
    return _changed_settings(manifest.get("config") or {}, _output_config(cfg))


def _differences(manifest: dict[str, Any], config: dict[str, Any]) -> str:
    """What differs between a finished dataset and this run's settings, in words, for the refusal."""
    recorded = manifest.get("config") or {}
    changed = _changed_settings(recorded, config)
    if not changed:
        return "its source files or tokenizer differ"
    hint = ""
    if "shuffle_seed" not in recorded and config.get("shuffle_seed", -1) >= 0:
        hint = "; it was built before shuffled shards, in corpus order: data.shuffle_seed=-1 uses it as it is"
    return "settings differ: " + ", ".join(changed) + hint


def _discard_work(output_dir: Path) -> None:
    """Delete the work dir as a whole or not at all: renamed away first (one atomic step), then deleted.

    ``rmtree`` alone deletes ``fingerprint`` among the first files; a kill after that left
    intermediates with no stamp, which the next run would have taken for its own.
    """
    trash = output_dir / f"{WORK_DIR}.trash.{os.getpid()}.{time.time_ns()}"
    os.replace(output_dir / WORK_DIR, trash)
    fsync_dir(output_dir)
    shutil.rmtree(trash, ignore_errors=True)


def _read_manifest(path: Path) -> dict[str, Any]:
    """A finished dataset's manifest; a DataError (exit 2, nothing touched) for one that is not JSON
    or not an object, which was a JSONDecodeError/AttributeError traceback (exit 1: "rerun")."""
    try:
        manifest = json.loads(path.read_bytes())
        ok = isinstance(manifest, dict) and isinstance(manifest.get("config", {}), dict)
        why = "" if ok else "not a JSON object with a config object"
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        manifest, why = None, f"{type(e).__name__}: {e}"
    if why:
        raise DataError(f"{path}: unreadable manifest ({why}); restore it, or delete {path.parent} to rebuild the dataset")
    return manifest


_SHARD_NAME = re.compile(r"(train|val)_\d{6,}\.bin")  # what dataprep/packing.py names shards, and nothing else
# What a SIGKILL in the middle of a durable write leaves in the output dir (common.durable.temp_name):
# a shard's may be gigabytes, and no later run would ever look at it again.
_OUTPUT_TEMP = re.compile(r"\.((train|val)_\d{6,}\.bin|manifest\.json|removed\.jsonl)\.tmp\.\d+")
INPUTS_NAME = "inputs.json"  # in the work dir: what its fingerprint was computed from


def _clear_leftovers(output_dir: Path) -> None:
    """Remove what killed runs left outside the work dir: the trash of a discard killed half-way (a
    whole work dir: every chunk's tokens) and temp files of durable writes. They hold nothing a run
    can use, on a finished dataset too (the kill may have come after the manifest's commit). Only
    the stage's own names are touched; errors are ignored (a finished dataset may be read-only)."""
    for trash in output_dir.glob(f"{WORK_DIR}.trash.*"):
        shutil.rmtree(trash, ignore_errors=True)
    for temp in output_dir.iterdir():
        if _OUTPUT_TEMP.fullmatch(temp.name):
            try:
                temp.unlink()
            except OSError:
                pass


def _work_differences(work: Path, inputs: dict[str, Any], config: dict[str, Any]) -> str:
    """What differs between the build a work dir belongs to and this one, in words."""
    try:
        recorded = json.loads((work / INPUTS_NAME).read_text())
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict):
        return "its inputs were not recorded"
    changed = _changed_settings(recorded.get("full_config") or {}, config)
    old = {n: (b, h) for n, b, h in recorded.get("sources") or []}
    new = {n: (b, h) for n, b, h in inputs["sources"]}
    files = [f"{n} {'gone' if n not in new else 'added' if n not in old else 'changed'}"
             for n in sorted(old.keys() | new.keys()) if old.get(n) != new.get(n)]
    if files:
        changed.append("source files: " + ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else ""))
    if recorded.get("tokenizer") != inputs["tokenizer"]:
        changed.append("tokenizer ranks")
    if recorded.get("format") != inputs["format"]:
        changed.append(f"format {recorded.get('format')} -> {inputs['format']}")
    return ", ".join(changed) or "its inputs differ"


def _refuse_other_work(output_dir: Path, work: Path, inputs: dict[str, Any], config: dict[str, Any]) -> None:
    """A DataError (exit 2, nothing touched) for the unfinished work of a build with other inputs or
    settings: discarding it silently lost hours of finished tasks to a forgotten override."""
    raise DataError(
        f"{output_dir}: holds the unfinished work of a build with other inputs or settings "
        f"({_work_differences(work, inputs, config)}); rerun with those to finish it, set data.output_dir "
        f"to a new directory, or delete {work} to start over with these (its finished tasks are lost)"
    )


def _prepare_output(output_dir: Path, inputs: dict[str, Any], config: dict[str, Any]) -> tuple[Path, dict | None]:
    """Return the work dir; or the existing manifest if this exact dataset is already complete.

    Nothing of another build is replaced: a finished dataset built from other inputs is refused, and
    so is the work dir of an unfinished one (it resumes with its own settings). Only leftovers that
    no run can use are cleared: what a killed run left beside the dataset, and a work dir without a
    fingerprint (a discard killed half-way) with the shards it wrote, never another file.
    """
    _clear_leftovers(output_dir)
    fingerprint = _fingerprint(inputs)
    manifest_path = output_dir / MANIFEST_NAME
    if manifest_path.exists():
        manifest = _read_manifest(manifest_path)
        if manifest.get("plan_fingerprint") == fingerprint:
            return output_dir / WORK_DIR, manifest
        raise DataError(
            f"{output_dir}: already holds a finished dataset built from other inputs or settings "
            f"({_differences(manifest, config)}); set data.output_dir to a new directory, or delete this one to rebuild it"
        )
    work = output_dir / WORK_DIR
    stamp = work / "fingerprint"
    if work.exists() and stamp.exists() and stamp.read_text() != fingerprint:
        _refuse_other_work(output_dir, work, inputs, config)
    if work.exists() and not stamp.exists():
        for stale in output_dir.glob("*_*.bin"):  # first: while the stamp-less work dir is there, a rerun comes back here
            if _SHARD_NAME.fullmatch(stale.name):
                stale.unlink()
        _discard_work(output_dir)
    for sub in ("scan", "tokens", "shards", "minhash/sigs.done", "minhash/buckets.done"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / INPUTS_NAME, {**inputs, "full_config": config})  # before the stamp: read only with it
    atomic_write_bytes(stamp, fingerprint.encode())
    return work, None


def run_data_stage(cfg: DataConfig, ray_cfg: RayConfig) -> dict[str, Any]:
    """Build (or finish building) the shard directory `cfg.output_dir`; return its manifest."""
    if not 0 < cfg.shard_tokens <= MAX_SHARD_TOKENS:
        raise DataError(f"data.shard_tokens must be between 1 and {MAX_SHARD_TOKENS}, got {cfg.shard_tokens}")
    if cfg.chunk_docs < 1:
        raise DataError(f"data.chunk_docs must be positive, got {cfg.chunk_docs}")
    t0 = time.time()
    try:
        ranks_sha256 = check_gpt2(get_gpt2(cfg.tokenizer_file))
    except TokenizerUnavailable as e:
        # a named ranks file that is missing or wrong needs fixing; a failed download may pass later
        raise (DataError if cfg.tokenizer_file else TransientDataError)(str(e)) from e
    # before Ray starts: a missing path or an unlistable source fails in seconds, not after a cluster start
    listed = _list_sources(cfg)
    lock = lock_output_dir(Path(cfg.output_dir).expanduser())
    try:
        started = start_ray(ray_cfg)
        try:
            manifest = _build(cfg, ranks_sha256, _Waves(), listed)
        finally:
            if started:
                stop_ray()
    finally:
        if lock is not None:
            lock.release()
    _print_summary(manifest, cfg.output_dir, time.time() - t0)
    return manifest


def _build(cfg: DataConfig, ranks_sha256: str, waves: _Waves, listed: list[Listed] | None = None) -> dict[str, Any]:
    """Every wave of the stage, in order; each wave skips the tasks a previous (killed) run finished."""
    output_dir = Path(cfg.output_dir).expanduser()
    output_dir.mkdir(parents=True, exist_ok=True)
    sources = _fetch_sources(cfg, waves, listed)
    inputs = _plan_inputs(cfg, sources, ranks_sha256)
    fingerprint = _fingerprint(inputs)
    work, finished = _prepare_output(output_dir, inputs, _output_config(cfg))
    if finished is not None:
        print(f"pretrain data: {output_dir} is already complete for these inputs; nothing to do", file=sys.stderr)
        return finished

    chunks, rows_per_source = _plan_chunks(cfg, sources, waves)
    n_rows = [c.row_end - c.row_start for c in chunks]
    src_of = [sources[c.source] for c in chunks]
    waves.run("scan", task_scan, [(src_of[c.index], c, cfg, work / "scan" / f"{c.index:06d}.npz") for c in chunks], unit="doc", weights=n_rows)
    exact_rows, exact_origin_rows = _exact_dedup(cfg, chunks, work)
    near = _near_dedup(cfg, chunks, src_of, n_rows, exact_rows, work, waves)
    stats = waves.run(
        "tokenize",
        task_tokenize,
        [(src_of[c.index], c, cfg, exact_rows[c.index], exact_origin_rows[c.index], near[c.index], work) for c in chunks],
        unit="doc",
        weights=n_rows,
    )
    _check_survivors(cfg, stats)
    shards = _pack_and_write(cfg, chunks, output_dir, work, waves)
    removed = _write_removed(output_dir, work, chunks, sources)
    manifest = _manifest(cfg, fingerprint, ranks_sha256, sources, rows_per_source, stats, shards, removed)
    atomic_write_json(output_dir / MANIFEST_NAME, manifest)  # commit point
    if not cfg.keep_work:
        _discard_work(output_dir)
    return manifest


def _list_sources(cfg: DataConfig) -> list[Listed]:
    """The source files, never the stage's own outputs: with data.output_dir in the source tree, its
    removed.jsonl (and, hidden, its .work) would be inputs of the next run, which then took a
    finished dataset for one of other inputs and discarded a killed run's work."""
    own = [str(Path(cfg.output_dir).expanduser() / REMOVED_NAME)]
    return resolve_sources(cfg.source, cfg.source_config, cfg.cache_dir, cfg.max_files, cfg.download_retries, exclude=own)


def _fetch_sources(cfg: DataConfig, waves: _Waves, listed: list[Listed] | None) -> list[SourceFile]:
    """Download remote files into the cache (or checksum local ones): the inputs of the fingerprint.
    A download's progress is shown in bytes where the driver can read the cache (see :class:`_WaveBar`)."""
    if listed is None:
        listed = _list_sources(cfg)
    remote = is_remote(cfg.source)
    calls = [(f.name, f.location, remote, cfg.cache_dir, cfg.download_retries) for f in listed]
    if not remote:
        return waves.run("checksum", task_fetch, calls, unit="file")
    cache = Path(cfg.cache_dir).expanduser()
    with contextlib.suppress(OSError):  # the tasks make it too; one the driver cannot make is not watched
        cache.mkdir(parents=True, exist_ok=True)
    return waves.run("download", task_fetch, calls, unit="file", meter=CacheMeter(listed, cache))


def _plan_chunks(cfg: DataConfig, sources: list[SourceFile], waves: _Waves) -> tuple[list[Chunk], list[int]]:
    """Cut every file into chunks (the work units of every later wave); return them and each file's row count."""
    planned = waves.run("plan", task_plan, [(i, s, cfg.chunk_docs, cfg.text_column) for i, s in enumerate(sources)], unit="file")
    cuts = [(si, a, b, off) for si, (_, file_cuts) in enumerate(planned) for a, b, off in file_cuts]
    chunks = [Chunk(i, si, a, b, off) for i, (si, a, b, off) in enumerate(cuts)]
    if not chunks:
        raise DataError(f"data.source: {cfg.source} holds no rows")
    return chunks, [rows for rows, _ in planned]


def _exact_dedup(cfg: DataConfig, chunks: list[Chunk], work: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Exact dedup over the whole corpus, in the driver (8 bytes per document).

    Returns, per chunk, the rows that are exact copies and the (file, row) of each one's first copy.
    """
    scans = [np.load(work / "scan" / f"{c.index:06d}.npz") for c in chunks]
    valid_rows = [np.flatnonzero(s["status"] == RowStatus.OK) for s in scans]
    keys = [s["keys"][v] for s, v in zip(scans, valid_rows)]
    if cfg.exact_dedup:
        dup_masks, origins = dedup.find_exact_duplicates(keys)
    else:
        dup_masks = [np.zeros(len(k), bool) for k in keys]
        origins = [np.zeros((0, 2), np.int64) for _ in keys]
    exact_rows = [c.row_start + v[m] for c, v, m in zip(chunks, valid_rows, dup_masks)]
    exact_origin_rows = [
        np.array([[chunks[oc].source, chunks[oc].row_start + valid_rows[oc][oi]] for oc, oi in o], np.int64).reshape(-1, 2)
        for o in origins
    ]
    return exact_rows, exact_origin_rows


def _near_dedup(cfg: DataConfig, chunks: list[Chunk], src_of: list[SourceFile], n_rows: list[int],
                exact_rows: list[np.ndarray], work: Path, waves: _Waves) -> list[np.ndarray]:
    """MinHash waves; per chunk, the positions (in its dedup stream) of near duplicates to drop."""
    if not cfg.minhash_dedup:
        return [np.zeros(0, np.int64) for _ in chunks]
    n = len(chunks)
    waves.run("minhash signatures", task_signatures, [(src_of[c.index], c, n, cfg, exact_rows[c.index], work) for c in chunks], unit="doc", weights=n_rows)
    waves.run("minhash buckets", task_buckets, [(b, cfg, work) for b in range(cfg.minhash_buckets)], unit="bucket")
    waves.run("minhash clusters", task_cluster, [(cfg, work)])
    return dedup.near_duplicates(work / "minhash" / "clusters", n)


def _check_survivors(cfg: DataConfig, stats: list[dict[str, int]]) -> None:
    """A DataError when cleaning removed every document, saying why, per reason (not a
    validation-size problem: no data.val_tokens would leave anything to shard)."""
    if sum(s["kept"] for s in stats):
        return
    removed = {k: sum(s[k] for s in stats) for k in REMOVAL_REASONS}
    why = ", ".join(f"{k} {n}" for k, n in removed.items() if n)
    raise DataError(f"{cfg.source}: every document was removed by cleaning ({sum(s['docs_in'] for s in stats)} in: {why}); nothing to shard")


def _pack_and_write(cfg: DataConfig, chunks: list[Chunk], output_dir: Path, work: Path, waves: _Waves) -> list[dict[str, Any]]:
    """Plan the shards from every kept document's length (validation sample, shuffled order), write them."""
    lengths = [np.load(work / "tokens" / f"{c.index:06d}.lens.npz")["lengths"] for c in chunks]
    plans = pack_documents(lengths, cfg.shard_tokens, cfg.val_tokens, cfg.shuffle_seed)
    if not any(p.split == "train" for p in plans):
        total = sum(int(l.sum()) for l in lengths)
        raise DataError(f"{cfg.source}: only {total} tokens survive cleaning, all taken by validation (data.val_tokens={cfg.val_tokens}); lower data.val_tokens")
    del lengths
    return waves.run("shards", task_write_shard, [(p, output_dir, work) for p in plans], unit="shard")


def _manifest(cfg: DataConfig, fingerprint: str, ranks_sha256: str, sources: list[SourceFile], rows_per_source: list[int],
              stats: list[dict[str, int]], shards: list[dict[str, Any]], removed: tuple[int, str]) -> dict[str, Any]:
    totals = {k: sum(s[k] for s in stats) for k in stats[0]}
    shuffled = cfg.shuffle_seed >= 0
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "plan_fingerprint": fingerprint,
        "tokenizer": {"name": cfg.tokenizer, "ranks_sha256": ranks_sha256, "eot_token": 50256, "n_vocab": 50257},
        "dtype": "uint16",
        "shard_header": {"magic": MAGIC, "version": SHARD_VERSION, "bytes": HEADER_BYTES},
        "config": _output_config(cfg),
        "order": {  # how documents were placed (dataprep/packing.py)
            "shuffle_seed": cfg.shuffle_seed if shuffled else None,
            "val": "seeded sample of whole documents, in draw order" if shuffled else "first documents in corpus order",
            "train": "the other documents in a seeded permutation" if shuffled else "the other documents in corpus order",
        },
        "sources": [{**{k: v for k, v in asdict(s).items() if k != "path"}, "rows": r} for s, r in zip(sources, rows_per_source)],
        "stats": {
            "docs_in": totals["docs_in"],
            "docs_kept": totals["kept"],
            "removed": {k: totals[k] for k in REMOVAL_REASONS},
            "tokens": {split: sum(s["tokens"] for s in shards if s["split"] == split) for split in ("train", "val")},
            "shards": {split: sum(1 for s in shards if s["split"] == split) for split in ("train", "val")},
        },
        "removed_ids": {"path": REMOVED_NAME, "count": removed[0], "sha256": removed[1]},
        "shards": shards,
        "ray_cluster": _ray_cluster(),  # where it was built; the only entry that depends on the cluster
    }


def _ray_cluster() -> dict[str, int]:
    """The Ray cluster this run used: alive nodes and their CPUs (empty without Ray)."""
    import ray

    if not ray.is_initialized():
        return {}
    return {"nodes": sum(1 for n in ray.nodes() if n["Alive"]), "cpus": int(ray.cluster_resources().get("CPU", 0))}


def _write_removed(output_dir: Path, work: Path, chunks: list[Chunk], sources: list[SourceFile]) -> tuple[int, str]:
    """removed.jsonl: every dropped document with its reason, in corpus order."""
    lines = []
    for c in chunks:
        for line in (work / "tokens" / f"{c.index:06d}.removed.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "duplicate_of" in record:
                src, row = record["duplicate_of"]
                record["duplicate_of"] = {"file": sources[src].name, "row": row}
            lines.append(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
    data = "".join(lines).encode()
    atomic_write_bytes(output_dir / REMOVED_NAME, data)
    return len(lines), hashlib.sha256(data).hexdigest()


def _print_summary(manifest: dict[str, Any], output_dir: str, seconds: float) -> None:
    st = manifest["stats"]
    removed = ", ".join(f"{k} {v}" for k, v in st["removed"].items() if v)
    print(
        f"pretrain data: {st['docs_in']} docs in, {st['docs_kept']} kept ({removed or 'none removed'}); "
        f"{st['tokens']['train']} train + {st['tokens']['val']} val tokens in "
        f"{st['shards']['train']} train + {st['shards']['val']} val shards; {seconds:.1f} s → {output_dir}"
    )
