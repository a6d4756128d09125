"""Finding and fetching source files: HF datasets, URLs, local paths, and the built-in corpus.

Local paths are read in place. Anything named by URL (``hf://``, ``https://``, ``file://``, or a
bare HF repo id) is first downloaded into a cache, one file at a time with retries that continue
the partial file (HTTP Range, :mod:`dataprep.downloads`); only a file whose size and sha256 verify
is renamed into place. A sidecar records its size and sha256, so a re-run skips what is already
there and the manifest can name exactly what was read.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from dataprep.downloads import SIZE_SUFFIX, Expected, Mismatch, Partial, fetch_fsspec, fetch_http, hub_target, verify
from dataprep.errors import DataError, TransientDataError
from common.durable import atomic_output, atomic_write_json, file_sha256, publish

SUPPORTED_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")
URL_SCHEMES = ("hf://", "http://", "https://", "file://", "s3://", "gs://")
BUILTIN_PREFIX = "builtin:"
FSSPEC_PACKAGES = {"s3": "s3fs", "gs": "gcsfs"}  # not dependencies of this project: installed by who needs them


@dataclass(frozen=True)
class SourceFile:
    """One input file, after download: what the rest of the pipeline reads."""

    name: str  # stable display name (relative to the source root): used in the manifest and removed ids
    uri: str  # where it came from
    path: str  # local path that is read
    bytes: int
    sha256: str


class Listed(NamedTuple):
    """One file a source names, before it is fetched or described."""

    name: str  # its display name (SourceFile.name)
    location: str  # local path or URL
    size: int | None = None  # bytes, where the listing says (the Hub's, a filesystem's; not an HTTP index)


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


def _hidden(name: str) -> bool:
    """A name with a hidden component (``.git/``, a data stage's ``.work/``, ``.lock``): never a source."""
    return any(part.startswith(".") and part not in (".", "..") for part in name.split("/"))


def _check_suffixes(paths: list[str], source: str) -> None:
    """Files a glob or a file name picks out must be ones the readers know: any other (``.jsonl.zst``,
    ``.txt``) was read as plain jsonl, its undecodable lines dropped as invalid UTF-8, exit 0."""
    other = [os.path.basename(p) for p in paths if not _has_supported_suffix(p)]
    if other:
        raise DataError(f"data.source {source}: {', '.join(other[:5])}{' ...' if len(other) > 5 else ''}: not a supported "
                        f"file type (supported: {', '.join(SUPPORTED_SUFFIXES)}); narrow the glob or convert the file")


def list_local(source: str) -> list[Listed]:
    """The (name, path) of the local files a directory or glob names, sorted by name. A directory's
    files of other types and hidden ones are skipped; a glob or file of another type is an error."""
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        root = expanded
        paths = [os.path.join(d, f) for d, _, files in os.walk(expanded) for f in files
                 if _has_supported_suffix(f) and not _hidden(os.path.relpath(os.path.join(d, f), root))]
    elif any(c in expanded for c in "*?["):
        root = os.path.dirname(expanded.split("*")[0].split("?")[0].split("[")[0]) or "."
        paths = [p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
    elif os.path.isfile(expanded):
        root = os.path.dirname(expanded) or "."
        paths = [expanded]
    else:
        raise DataError(f"data.source: local path {source} does not exist (relative to {os.getcwd()})")
    _check_suffixes(paths, source)
    files = sorted(Listed(os.path.relpath(p, root), p) for p in paths)
    if not files:
        raise DataError(f"data.source: no parquet/jsonl files under {source}")
    return files


def list_remote(source: str, config: str) -> list[Listed]:
    """The files a URL, URL glob or HF repo id names, sorted by name, with the sizes the listing gives."""
    import fsspec

    url = f"hf://datasets/{source}/{hf_config_glob(config)}" if _looks_like_hf_repo(source) else source
    protocol = url.split("://", 1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as e:  # fsspec reaches s3:// and gs:// through packages of their own
        package = FSSPEC_PACKAGES.get(protocol)
        how = f"pip install {package}" if package else "install the fsspec implementation it names"
        raise DataError(f"data.source: reading {protocol}:// needs a package that is not installed ({e}): {how}") from e
    if protocol == "file" and not any(c in path for c in "*?[") and not os.path.exists(path):
        raise DataError(f"data.source: local path {path} (from {source}) does not exist")  # no retry brings it
    try:
        if any(c in path for c in "*?["):
            found = fs.glob(path, detail=True)
            root = path.split("*")[0].rsplit("/", 1)[0]
        elif fs.isdir(path):
            found = fs.find(path, detail=True)
            root = path.rstrip("/")
        else:
            found = {path: {}}
            root = path.rsplit("/", 1)[0]
    except Exception as e:  # noqa: BLE001 - network/auth errors all mean "cannot list"
        what = f"'{source}' is not a local path, read as a Hugging Face dataset id: " if _looks_like_hf_repo(source) else ""
        raise TransientDataError(f"data.source: {what}cannot list {url}: {type(e).__name__}: {e}") from e
    files = []
    for p in sorted(found):
        name = p[len(root) :].lstrip("/") if p.startswith(root) else p.rsplit("/", 1)[-1]
        if not _has_supported_suffix(p) or _hidden(name):
            continue
        full = p if "://" in p else f"{protocol}://{p.lstrip('/') if protocol != 'file' else p}"
        size = (found[p] or {}).get("size")
        files.append(Listed(name, full, size if isinstance(size, int) else None))
    if not files:
        raise DataError(f"data.source: no parquet/jsonl files at {url}")
    return files


def download(
    url: str,
    name: str,
    cache_dir: Path,
    retries: int,
    backoff_s: float = 1.0,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
) -> SourceFile:
    """Fetch ``url`` into the cache, resuming a partial file; skip it when a complete copy is recorded.

    The bytes go to ``<file>.part`` next to the final name and each attempt continues it (see
    :mod:`dataprep.downloads`); only a file of the expected size and sha256 (given here, listed by the
    Hub for ``hf://`` files, or stated by the server) is renamed into place. An attempt cut short after
    progress resumes at once and does not use up one of the ``retries``; a failed one waits
    ``backoff_s * 2**k``; a finished file that does not verify is thrown away and fetched again.
    A lock file serialises processes fetching the same file into the same cache.
    """
    dest = cache_path(url, name, cache_dir)
    if (done := _cached(url, name, dest)) is not None:
        return done
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.with_name(dest.name + ".lock")):
        if (done := _cached(url, name, dest)) is not None:  # another process fetched it while we waited
            return done
        stamp = _local_stamp(url)  # before the copy: an edit during it shows as a change next time
        part = Partial(dest.with_name(dest.name + ".part"))
        if part.n:
            print(f"pretrain data: {name}: continuing the partial download at byte {part.n}", file=sys.stderr)
        try:
            _fetch_verified(url, part, Expected(expected_size, expected_sha256 and expected_sha256.lower()), retries, backoff_s)
        except BaseException:
            part.close()  # kept: a rerun resumes it (one that failed to verify is already gone)
            part.forget_size()
            raise
        part.close()
        part.forget_size()
        publish(part.path, dest)
        sha = part.sha.hexdigest()
        meta = {"url": url, "bytes": part.n, "sha256": sha, **({"source": stamp} if stamp else {})}
        atomic_write_json(_meta_path(dest), meta)  # under the lock: a waiter reads it
    return SourceFile(name=name, uri=url, path=str(dest), bytes=part.n, sha256=sha)


def cache_path(url: str, name: str, cache_dir: Path) -> Path:
    """Where :func:`download` puts ``url`` in ``cache_dir`` (its partial: the same name + ``.part``)."""
    return cache_dir / f"{hashlib.sha1(url.encode()).hexdigest()[:16]}-{Path(name).name}"


class CacheMeter:
    """The bytes of a download wave's files in the cache so far, and the total where it is known.

    The driver polls it about once a second while the download tasks run, so that a user fetching a
    few 2 GB files sees bytes, a rate and an ETA rather than ``0/4 files`` for many minutes. A file
    counts its ``.part`` while one exists (a resumed one included), else its finished copy; its
    size is the listing's, else the one its task noted beside the partial (an HTTP Content-Length),
    else the total is unknown. One directory listing per poll, and a stat only of the files present
    and not yet finished. It needs the driver to see the cache (a shared filesystem, as every later
    wave does): :meth:`poll` returns None where it cannot list it and :meth:`finished` False for a
    finished file it cannot see, and the caller then counts files instead.
    """

    def __init__(self, files: list[Listed], cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.names = [cache_path(f.location, f.name, cache_dir).name for f in files]
        self.sizes: list[int | None] = [f.size for f in files]
        self.final: dict[int, int] = {}  # file index -> bytes, once its task has returned

    def finished(self, i: int, result: SourceFile) -> bool:
        """Record file ``i`` as complete; False when the driver cannot see it (a node-local cache)."""
        self.final[i] = self.sizes[i] = result.bytes
        return os.path.exists(result.path)

    def poll(self) -> tuple[int, int | None] | None:
        """(bytes received, total bytes or None), or None when the cache dir cannot be listed."""
        try:
            with os.scandir(self.cache_dir) as it:
                entries = {e.name: e for e in it}
        except OSError:
            return None
        got = 0
        for i, name in enumerate(self.names):
            got += self.final[i] if i in self.final else self._received(i, name, entries)
        return got, None if None in self.sizes else sum(s for s in self.sizes if s is not None)

    def _received(self, i: int, name: str, entries: dict[str, os.DirEntry]) -> int:
        noted = entries.get(name + ".part" + SIZE_SUFFIX)
        if self.sizes[i] is None and noted is not None:
            with contextlib.suppress(OSError, ValueError):
                self.sizes[i] = int(Path(noted.path).read_text())
        entry = entries.get(name + ".part") or entries.get(name)
        try:
            return entry.stat().st_size if entry is not None else 0
        except OSError:  # renamed into place (or removed) since the listing
            return 0


def _meta_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".meta.json")


def _cached(url: str, name: str, dest: Path) -> SourceFile | None:
    """The recorded complete copy of ``url``, if its sidecar matches the file."""
    meta_path = _meta_path(dest)
    if not (meta_path.is_file() and dest.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("url") != url or meta.get("bytes") != dest.stat().st_size:
        return None
    if url.startswith("file://") and meta.get("source") != _local_stamp(url):
        return None  # the local file was edited (or replaced) since it was copied: copy it again
    return SourceFile(name=name, uri=url, path=str(dest), bytes=meta["bytes"], sha256=meta["sha256"])


def _local_stamp(url: str) -> list[int] | None:
    """[mtime_ns, size] of a ``file://`` source (None for other URLs, or a file that is gone).

    A remote file's URL stands for fixed bytes (the Hub's are content-addressed); a local file can be
    edited in place, keeping its size, so its copy is trusted only while this stamp is unchanged.
    """
    if not url.startswith("file://"):
        return None
    try:
        st = os.stat(url.removeprefix("file://"))
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (left in place: deleting a lock file races with its next holder).

    A filesystem without flock (Lustre mounted without ``-o flock``) gets a warning and no lock: two
    runs sharing that cache must not fetch the same file at the same moment.
    """
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"pretrain data: waiting for another process downloading {path.name.removesuffix('.lock')}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            print(f"pretrain data: warning: cannot lock {path} ({e}); downloading without a lock", file=sys.stderr)
        yield


def _fetch_verified(url: str, part: Partial, listed: Expected, retries: int, backoff_s: float) -> None:
    """Attempts until ``part`` holds the verified file; TransientDataError after ``retries`` failed ones."""
    target: tuple[str | None, dict[str, str], Expected] | None = None
    failures = 0
    while True:
        before = part.n
        try:
            if target is None:
                target = _target(url, listed)
            http_url, headers, expected = target
            if http_url is None:
                served = fetch_fsspec(url, part, expected)
            else:
                served = fetch_http(http_url, headers, part, expected)
            verify(part, served, url)
            return
        except Mismatch as e:
            part.restart()
            error: Exception = e
        except FileNotFoundError as e:
            if url.startswith("file://"):  # a local file that went away after the listing
                raise DataError(f"{url}: no such file: {e}") from e
            error = e
        except Exception as e:  # noqa: BLE001 - network errors of every library mean "try again"
            if part.n > before:
                continue  # cut short after progress: resume at once
            error = e
        failures += 1
        if failures > retries:
            if isinstance(error, Mismatch):
                part.discard()
            raise TransientDataError(f"{url}: download failed after {failures} attempts: {type(error).__name__}: {error}") from error
        print(f"pretrain data: {url}: attempt {failures} failed ({type(error).__name__}: {error}); retrying", file=sys.stderr)
        time.sleep(backoff_s * 2 ** (failures - 1))


def _target(url: str, listed: Expected) -> tuple[str | None, dict[str, str], Expected]:
    """Where to fetch ``url`` over HTTP (None: through fsspec), with which headers, expecting what."""
    if url.startswith(("http://", "https://")):
        return url, {}, listed
    if url.startswith("hf://"):
        http_url, headers, hub = hub_target(url)
        return http_url, headers, listed.filled_from(hub)
    return None, {}, listed


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


def _local_path(location: str) -> str | None:
    """The local file a listed location is (a path, or a ``file://`` URL); None for other URLs."""
    if location.startswith("file://"):
        return location.removeprefix("file://")
    return None if "://" in location else location


def _without(files: list[Listed], exclude: Iterable[str]) -> list[Listed]:
    """``files`` less the local files named in ``exclude`` (the stage's own outputs when the output
    dir lies in the source tree: they must not become inputs of the next run)."""
    skip = {os.path.realpath(os.path.expanduser(p)) for p in exclude}
    return [f for f in files if (p := _local_path(f.location)) is None or os.path.realpath(p) not in skip]


def resolve_sources(source: str, config: str, cache_dir: str, max_files: int, retries: int,
                    exclude: Iterable[str] = ()) -> list[Listed]:
    """Turn `data.source` into an ordered list of files (name, local path-or-url, listed size) still to
    be described, leaving out the local files named in ``exclude``."""
    cache = Path(cache_dir).expanduser()
    if source.startswith(BUILTIN_PREFIX):
        which = source.removeprefix(BUILTIN_PREFIX)
        if which not in BUILTIN_CORPORA:
            raise DataError(f"data.source: unknown built-in corpus '{which}' (known: {', '.join(BUILTIN_CORPORA)})")
        tag = f"py{sys.version_info.major}{sys.version_info.minor}"
        path = BUILTIN_CORPORA[which](cache / "builtin" / f"{which}-{tag}.parquet")
        files = [Listed(f"{which}.parquet", str(path))]
    elif is_remote(source):
        files = list_remote(source, config)
    else:
        files = list_local(source)
    files = _without(files, exclude)
    if not files:
        raise DataError(f"data.source: no parquet/jsonl files under {source} besides the data stage's own outputs")
    return files[:max_files] if max_files > 0 else files
