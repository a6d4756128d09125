"""Finding and fetching source files: HF datasets, URLs, local paths, and the built-in corpus.

Local paths are read in place. Anything named by URL (``hf://``, ``https://``, ``file://``, or a
bare HF repo id) is first downloaded into a cache, one file at a time with retries, written
under a temporary name and renamed when complete; a sidecar records its size and sha256, so a
re-run skips what is already there and the manifest can name exactly what was read.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from dataprep.errors import DataError, TransientDataError
from common.durable import atomic_output, atomic_write_json, file_sha256

SUPPORTED_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")
URL_SCHEMES = ("hf://", "http://", "https://", "file://", "s3://", "gs://")
BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class SourceFile:
    """One input file, after download: what the rest of the pipeline reads."""

    name: str  # stable display name (relative to the source root): used in the manifest and removed ids
    uri: str  # where it came from
    path: str  # local path that is read
    bytes: int
    sha256: str



def is_remote(source: str) -> bool:
    return source.startswith(URL_SCHEMES) or _looks_like_hf_repo(source)


def _looks_like_hf_repo(source: str) -> bool:
    """An "org/name" that cannot be meant as a local path.

    A local path is an existing one, one starting with ``.``, ``/`` or ``~``, one naming a data
    file, or one whose first component is an existing local directory (``data/corpus`` where
    ``data/`` exists): a missing local path must be reported as missing, not looked up on the Hub.
    To name a Hub dataset whose org happens to be a local directory, use ``hf://datasets/org/name``.
    """
    return (
        source.count("/") == 1
        and not source.startswith((".", "/", "~"))
        and not any(c in source for c in "*?[")
        and not Path(source).exists()
        and not source.endswith(SUPPORTED_SUFFIXES)
        and not Path(source.split("/", 1)[0]).is_dir()
    )


def hf_config_glob(config: str) -> str:
    """Map an HF dataset config name to its file glob, following the FineWeb(-Edu) layout."""
    if config in ("", "default"):
        return "data/*/*.parquet"
    if config.startswith("sample-"):
        return f"sample/{config.removeprefix('sample-')}/*.parquet"
    return f"data/{config}/*.parquet"


def _has_supported_suffix(name: str) -> bool:
    return name.endswith(SUPPORTED_SUFFIXES)


def list_local(source: str) -> list[tuple[str, str]]:
    """(name, path) of the local files a directory or glob names, sorted by name."""
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        root = expanded
        paths = [
            os.path.join(d, f)
            for d, _, files in os.walk(expanded)
            for f in files
            if _has_supported_suffix(f) and not f.startswith(".")
        ]
    elif any(c in expanded for c in "*?["):
        root = os.path.dirname(expanded.split("*")[0].split("?")[0].split("[")[0]) or "."
        paths = [p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
    elif os.path.isfile(expanded):
        root = os.path.dirname(expanded) or "."
        paths = [expanded]
    else:
        raise DataError(f"data.source: local path {source} does not exist (relative to {os.getcwd()})")
    files = sorted((os.path.relpath(p, root), p) for p in paths)
    if not files:
        raise DataError(f"data.source: no parquet/jsonl files under {source}")
    return files


def list_remote(source: str, config: str) -> list[tuple[str, str]]:
    """(name, url) of the files a URL, URL glob or HF repo id names, sorted by name."""
    import fsspec

    url = f"hf://datasets/{source}/{hf_config_glob(config)}" if _looks_like_hf_repo(source) else source
    fs, path = fsspec.core.url_to_fs(url)
    protocol = url.split("://", 1)[0]
    try:
        if any(c in path for c in "*?["):
            found = fs.glob(path)
            root = path.split("*")[0].rsplit("/", 1)[0]
        elif fs.isdir(path):
            found = fs.find(path)
            root = path.rstrip("/")
        else:
            found = [path]
            root = path.rsplit("/", 1)[0]
    except Exception as e:  # noqa: BLE001 - network/auth errors all mean "cannot list"
        what = f"'{source}' is not a local path, read as a Hugging Face dataset id: " if _looks_like_hf_repo(source) else ""
        raise TransientDataError(f"data.source: {what}cannot list {url}: {type(e).__name__}: {e}") from e
    files = []
    for p in sorted(found):
        if not _has_supported_suffix(p):
            continue
        full = p if "://" in p else f"{protocol}://{p.lstrip('/') if protocol != 'file' else p}"
        name = p[len(root) :].lstrip("/") if p.startswith(root) else p.rsplit("/", 1)[-1]
        files.append((name, full))
    if not files:
        raise DataError(f"data.source: no parquet/jsonl files at {url}")
    return files


def download(url: str, name: str, cache_dir: Path, retries: int, backoff_s: float = 1.0) -> SourceFile:
    """Fetch ``url`` into the cache (skipping it when a complete copy is recorded); retry on failure."""
    import fsspec

    key = hashlib.sha1(url.encode()).hexdigest()[:16]
    dest = cache_dir / f"{key}-{Path(name).name}"
    meta_path = dest.with_name(dest.name + ".meta.json")
    if meta_path.is_file() and dest.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("url") == url and meta.get("bytes") == dest.stat().st_size:
            return SourceFile(name=name, uri=url, path=str(dest), bytes=meta["bytes"], sha256=meta["sha256"])
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part.{os.getpid()}")
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        try:
            fs, path = fsspec.core.url_to_fs(url)
            expected = fs.info(path).get("size")
            h = hashlib.sha256()
            n = 0
            with fs.open(path, "rb") as src, open(tmp, "wb") as out:
                while block := src.read(1 << 22):
                    out.write(block)
                    h.update(block)
                    n += len(block)
                out.flush()
                os.fsync(out.fileno())
            if expected is not None and n != expected:
                raise OSError(f"short read: got {n} of {expected} bytes")
            os.replace(tmp, dest)
            atomic_write_json(meta_path, {"url": url, "bytes": n, "sha256": h.hexdigest()})
            return SourceFile(name=name, uri=url, path=str(dest), bytes=n, sha256=h.hexdigest())
        except Exception as e:  # noqa: BLE001 - every failure of a fetch is retried the same way
            last_error = e
            tmp.unlink(missing_ok=True)
            if attempt < retries:
                time.sleep(backoff_s * 2**attempt)
    raise TransientDataError(f"{url}: download failed after {retries + 1} attempts: {type(last_error).__name__}: {last_error}")


def describe_local(name: str, path: str) -> SourceFile:
    return SourceFile(name=name, uri=os.path.abspath(path), path=path, bytes=os.path.getsize(path), sha256=file_sha256(Path(path)))


# ---------------------------------------------------------------------------------------------
# built-in corpus


def build_python_docs_corpus(dest: Path, min_chars: int = 200) -> Path:
    """Real English prose that ships with every CPython: the stdlib's docstrings and pydoc topics.

    Lets the smoke run (and newcomers) exercise the whole workflow with no network. Parsed with
    ``ast`` (nothing is imported), sorted, so the corpus is the same for the same Python version.
    Near-identical docstrings are common in the stdlib, which gives dedup real work too.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pydoc_data import topics

    if dest.is_file():
        return dest
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    ids, texts = [], []
    for key in sorted(topics.topics):
        ids.append(f"pydoc-topic/{key}")
        texts.append(topics.topics[key])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    ids.append(f"{rel.as_posix()}:{getattr(node, 'lineno', 0)}")
                    texts.append(doc)
    with atomic_output(dest, create_parents=True) as f:
        pq.write_table(pa.table({"id": ids, "text": texts}), f, row_group_size=1000)
    return dest


BUILTIN_CORPORA = {"python-docs": build_python_docs_corpus}


def resolve_sources(source: str, config: str, cache_dir: str, max_files: int, retries: int) -> list[tuple[str, str]]:
    """Turn `data.source` into an ordered list of (name, local path-or-url) still to be described."""
    cache = Path(cache_dir).expanduser()
    if source.startswith(BUILTIN_PREFIX):
        which = source.removeprefix(BUILTIN_PREFIX)
        if which not in BUILTIN_CORPORA:
            raise DataError(f"data.source: unknown built-in corpus '{which}' (known: {', '.join(BUILTIN_CORPORA)})")
        import sys

        tag = f"py{sys.version_info.major}{sys.version_info.minor}"
        path = BUILTIN_CORPORA[which](cache / "builtin" / f"{which}-{tag}.parquet")
        files = [(f"{which}.parquet", str(path))]
    elif is_remote(source):
        files = list_remote(source, config)
    else:
        files = list_local(source)
    return files[:max_files] if max_files > 0 else files
