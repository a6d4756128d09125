"""Crash-safe checkpoints: write under a temporary name, fsync, rename, then commit.

Layout::

    RUN_DIR/checkpoints/step_00001000/
        model.pt            model state_dict (unwrapped, uncompiled names = HF GPT-2 names)
        optimizer.pt        AdamW state_dict
        trainer_state.pt    step, loader state and RNG state of every rank, MLflow run id, ...
                            (trainer.state.TrainState.state_dict)
        meta.json           human-readable: step, model shape, data fingerprint, run id, config
                            (TrainState.meta, a projection of the same state)
        COMMITTED.json      written LAST: sha256 of every other file

A checkpoint exists for readers only once ``COMMITTED.json`` is in place: a crash at any moment
leaves either a ``.tmp-*`` directory or a step directory without the marker, and both are
ignored (and reported, then removed, by the next training start). Resuming also re-hashes the
files so that bit rot or a truncated copy is caught and the previous checkpoint used instead; a
checkpoint that verifies but still cannot be loaded (its marker rewritten over bad files, keys of
another code version) is skipped the same way by the trainer. Once an older one has loaded, the
unusable newer ones are moved aside to ``checkpoints/unusable-step_XXXXXXXX-<ms>/`` (kept for
inspection, invisible to readers and to retention, which would otherwise count a broken "newest"
checkpoint and delete good ones). A non-directory entry named like a checkpoint (a stray file or
a dangling link) is moved aside to ``checkpoints/stray-<name>-<ms>`` rather than left to break
the next write of that step.

Disk full (ENOSPC/EDQUOT) while writing raises :class:`DiskFullError` after deleting the partial
write: a rerun cannot fix it until space is freed, so the trainer exits 2, and no committed
checkpoint is touched. Retention frees what it may *before* a write as well as after it: the
checkpoints it would delete once the new one is committed, except the newest committed one, which
stays until its successor is committed (so a rerun after a disk-full stop can succeed).

Everything is loaded with ``torch.load(weights_only=True)``: RNG states and loader positions are
stored as tensors and plain Python values, so no pickle code runs on load.

Public read API (used by the eval stage): :func:`list_committed`, :func:`latest_committed`,
:func:`read_meta`, :func:`verify`, :func:`load_model_for_eval`.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from common.durable import atomic_write_json, file_sha256, fsync_dir, publish
from common.rundir import RunDir, step_dirname
from trainer.model import GPT, GPTConfig

MARKER = "COMMITTED.json"
FORMAT_VERSION = 1
MODEL_FILE = "model.pt"
OPTIM_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
# Fault injection for tests of crash safety: "PHASE:STEP" kills this process's group with SIGKILL
# while checkpoint STEP is at PHASE ("tmp": files written, not renamed; "renamed": not committed).
FAULT_ENV = "PRETRAIN_FAULT_INJECT"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, partial, corrupt or incompatible with this run."""


class DiskFullError(CheckpointError):
    """No space (or quota) left while writing a checkpoint; the partial write has been deleted."""


def is_disk_full(exc: BaseException | None) -> bool:
    """True if ``exc`` or an exception it wraps is ENOSPC/EDQUOT (torch.save wraps the OSError)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def checkpoint_root(run_dir: str | Path) -> Path:
    return RunDir(run_dir).checkpoints


def _step_of(path: Path) -> int | None:
    name = path.name
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return None


def list_committed(run_dir: str | Path) -> list[Path]:
    """Committed checkpoint directories of ``run_dir``, oldest first (marker present; not re-hashed)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if (s := _step_of(p)) is not None and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def latest_committed(run_dir: str | Path) -> Path | None:
    found = list_committed(run_dir)
    return found[-1] if found else None


def list_partial(run_dir: str | Path) -> list[Path]:
    """Leftovers of interrupted writes: temporary directories and step directories without a marker."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(".tmp-") or (_step_of(p) is not None and not (p / MARKER).is_file()))


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's ``meta.json``; CheckpointError (a refusal: no rerun makes it readable) when
    it is not a JSON object with an integer ``step``."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / MARKER).is_file():
        raise CheckpointError(f"{ckpt_dir}: not a committed checkpoint (no {MARKER})")
    try:
        meta = json.loads((ckpt_dir / META_FILE).read_text())
    except (OSError, ValueError) as e:  # ValueError: torn JSON, or bytes that are not UTF-8
        raise CheckpointError(f"{ckpt_dir}: {META_FILE} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or type(meta.get("step")) is not int:
        raise CheckpointError(f"{ckpt_dir}: {META_FILE} is not a checkpoint's metadata (a JSON object with an integer 'step')")
    return meta


def verify(ckpt_dir: str | Path) -> None:
    """Raise CheckpointError unless the marker exists and every listed file has its recorded sha256."""
    ckpt_dir = Path(ckpt_dir)
    try:
        marker = json.loads((ckpt_dir / MARKER).read_text())
        files = marker["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt_dir}: missing or unreadable {MARKER}: {e}") from e
    for name in (MODEL_FILE, OPTIM_FILE, STATE_FILE, META_FILE):
        if name not in files:
            raise CheckpointError(f"{ckpt_dir}: {MARKER} does not list {name}")
    for name, digest in files.items():
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"{ckpt_dir}: {name} is missing")
        actual = file_sha256(path)
        if actual != digest:
            raise CheckpointError(f"{ckpt_dir}: {name} is corrupt (sha256 {actual[:12]}…, committed {digest[:12]}…)")


def find_resumable(run_dir: str | Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest committed checkpoint that verifies; corrupt newer ones are reported and skipped.

    None when there is no committed checkpoint (a new run). When checkpoints exist but none
    verifies, raise rather than silently start from scratch over them.
    """
    committed = list_committed(run_dir)
    for ckpt in reversed(committed):
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as e:
            log(f"checkpoint: skipping {ckpt.name}: {e}")
    if committed:
        raise CheckpointError(
            f"{checkpoint_root(run_dir)}: none of the {len(committed)} committed checkpoints verifies; "
            "refusing to start from scratch over them (move them away to really start anew)"
        )
    return None


def load_model_for_eval(ckpt_dir: str | Path, device: str | torch.device = "cpu", check: bool = True) -> tuple[GPT, dict[str, Any]]:
    """Rebuild the model of a committed checkpoint, in eval mode, for evaluation or sampling.

    Returns ``(model, meta)``; ``meta`` holds ``step``, ``model`` (the GPTConfig fields),
    ``config`` (the whole resolved run config as a dict), ``data_fingerprint``,
    ``mlflow_run_id`` and ``tokens_seen``. ``check`` re-hashes the files first.
    """
    meta, cfg, state = read_weights(ckpt_dir, check)
    model = model_from_weights(ckpt_dir, cfg, state)
    model.to(device)
    model.eval()
    return model, meta


def read_weights(ckpt_dir: str | Path, check: bool = True) -> tuple[dict[str, Any], GPTConfig, dict[str, torch.Tensor]]:
    """``(meta, model shape, weights)`` of a committed checkpoint (``check``: re-hashed first).

    Raises CheckpointError, a refusal, for anything that makes it unloadable: files that changed
    since the commit, a ``model`` entry that is no GPT shape, weights torch cannot read. A file
    of a run dir is never unpickled (``weights_only``); one that is not plain tensors is refused."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / MARKER).is_file():
        raise CheckpointError(f"{ckpt_dir}: not a committed checkpoint (no {MARKER})")
    if check:
        verify(ckpt_dir)
    meta = read_meta(ckpt_dir)
    try:
        cfg = GPTConfig(**meta["model"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt_dir}: {META_FILE} has no usable 'model' shape ({type(e).__name__}: {e})") from e
    try:
        state = torch.load(ckpt_dir / MODEL_FILE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt_dir}: {MODEL_FILE} cannot be loaded as weights ({type(e).__name__}: {_first_line(e)})") from e
    return meta, cfg, state


def model_from_weights(ckpt_dir: str | Path, cfg: GPTConfig, state: dict[str, torch.Tensor]) -> GPT:
    """The model of shape ``cfg`` holding ``state``; CheckpointError when they do not fit together
    (a ``meta.json`` edited, or weights of another model)."""
    try:
        model = GPT(cfg)
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{ckpt_dir}: the weights do not fit the model shape in {META_FILE}: {_first_line(e)}") from e
    return model


def _first_line(e: BaseException) -> str:
    """An exception's first line (torch's load errors run to a page of advice), or its type."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --------------------------------------------------------------------------------------------
# writing


def _write_torch(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fault(phase: str, step: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec == f"{phase}:{step}":
        print(f"checkpoint: fault injection {spec}: killing process group", flush=True)
        os.killpg(os.getpgid(0), signal.SIGKILL)


def to_cpu(obj: Any) -> Any:
    """A deep copy with every tensor on the CPU (so a background thread can write it while training goes on)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def set_aside(path: Path, prefix: str) -> Path:
    """Rename ``path`` (a checkpoint dir, a file or a link) to ``<prefix>-<name>-<ms>`` next to it:
    out of the readers' and the writer's way, nothing deleted."""
    target = path.with_name(f"{prefix}-{path.name}-{int(time.time() * 1000)}")
    publish(path, target)
    return target


def _remove_tree(path: Path) -> None:
    """Un-commit first (marker gone = invisible to readers), then delete."""
    if not _real_dir(path):
        path.unlink()  # a link to a checkpoint elsewhere: drop the link, never its target
        return
    marker = path / MARKER
    if marker.exists():
        marker.unlink()
        fsync_dir(path)
    shutil.rmtree(path, ignore_errors=True)


def write_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write one checkpoint atomically (see the module doc). Returns the committed directory."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dirname(step)
    tmp = root / f".tmp-{step_dirname(step)}-{os.getpid()}-{int(time.time() * 1000)}"
    try:
        return _write_and_commit(root, final, tmp, step, model_state, optim_state, trainer_state, meta)
    except BaseException as e:
        # never leave a half-written step behind (it holds the space a rerun needs); committed ones are untouched
        for leftover in (tmp, final):
            if leftover.exists() and not (leftover / MARKER).is_file() and _real_dir(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
        if is_disk_full(e):
            usage = shutil.disk_usage(root)
            raise DiskFullError(
                f"{root}: disk full while writing checkpoint step {step} ({e}); {usage.free / 2**20:.0f} MiB free. "
                f"The partial write was deleted and every committed checkpoint is intact: free space (or lower "
                f"train.keep_last / train.keep_every), then run the same command again: it resumes from the newest one"
            ) from e
        raise


def _write_and_commit(root: Path, final: Path, tmp: Path, step: int, model_state, optim_state, trainer_state, meta) -> Path:
    tmp.mkdir()
    _write_torch(tmp / MODEL_FILE, model_state)
    _write_torch(tmp / OPTIM_FILE, optim_state)
    _write_torch(tmp / STATE_FILE, trainer_state)
    _write_text(tmp / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    fsync_dir(tmp)
    _fault("tmp", step)
    if os.path.lexists(final):
        if _real_dir(final):
            # a partial or corrupt checkpoint of the same step (we resumed from an older one): replace it
            _remove_tree(final)
        else:
            set_aside(final, "stray")  # a file or link in the way: keep it, out of the way
    publish(tmp, final)
    _fault("renamed", step)
    files = {name: file_sha256(final / name) for name in (MODEL_FILE, OPTIM_FILE, STATE_FILE, META_FILE)}
    marker = {"format_version": FORMAT_VERSION, "step": step, "files": files, "time": time.time()}
    atomic_write_json(final / MARKER, marker)  # the commit point
    return final


def _kept_steps(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    ordered = sorted(steps)
    keep = set(ordered[-max(1, keep_last) :])
    if keep_every > 0:
        keep |= {s for s in ordered if s % keep_every == 0}
    return keep


def apply_retention(run_dir: str | Path, keep_last: int, keep_every: int, upcoming: int | None = None) -> list[Path]:
    """Delete committed checkpoints other than the newest ``keep_last`` and multiples of ``keep_every``.

    With ``upcoming`` (a step about to be written), delete now what that commit would make
    redundant, but never the newest committed checkpoint: until ``upcoming`` is committed it is
    the only way back.
    """
    committed = [p for p in list_committed(run_dir) if _step_of(p) != upcoming]
    steps = [_step_of(p) or 0 for p in committed]
    keep = _kept_steps(steps + ([upcoming] if upcoming is not None else []), keep_last, keep_every)
    if upcoming is not None and committed:
        keep.add(max(steps))
    removed = [p for p, s in zip(committed, steps) if s not in keep]
    for p in removed:
        _remove_tree(p)
    return removed


def remove_partials(run_dir: str | Path, log: Callable[[str], None] = print) -> None:
    """Delete interrupted writes; move aside (not delete) anything in their place that is not a directory."""
    for p in list_partial(run_dir):
        if _real_dir(p):
            log(f"checkpoint: removing partial checkpoint {p.name} (interrupted write, never committed)")
            _remove_tree(p)
        else:
            moved = set_aside(p, "stray")
            log(f"checkpoint: {p.name} is not a checkpoint directory; moved it aside to {moved.name}")


class CheckpointWriter:
    """Runs on the rank that writes (rank 0). Synchronous, or in one background thread.

    Async mode is meant for GPUs: the caller hands over a CPU copy of the state (``to_cpu``),
    which takes well under a step, and the thread does the slow serialisation, hashing and
    fsyncs. At most one write is in flight; the next save (and exit) waits for it.
    """

    def __init__(self, run_dir: str | Path, keep_last: int, keep_every: int, asynchronous: bool, log: Callable[[str], None] = print):
        self.run_dir = Path(run_dir)
        self.keep_last, self.keep_every = keep_last, keep_every
        self.asynchronous = asynchronous
        self.log = log
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_committed: Path | None = None

    def save(self, step: int, model_state, optim_state, trainer_state, meta) -> None:
        """Write checkpoint ``step`` (after the previous write, if any, has finished), then apply retention."""
        self.wait()

        def work() -> None:
            t0 = time.time()
            early = apply_retention(self.run_dir, self.keep_last, self.keep_every, upcoming=step)
            if early:
                self.log(f"checkpoint: removed {', '.join(p.name for p in early)} before writing step {step} (retention)")
            path = write_checkpoint(self.run_dir, step, model_state, optim_state, trainer_state, meta)
            removed = apply_retention(self.run_dir, self.keep_last, self.keep_every)
            self.last_committed = path
            gone = f"; removed {', '.join(p.name for p in removed)}" if removed else ""
            self.log(f"checkpoint: committed {path} in {time.time() - t0:.2f}s{gone}")

        if not self.asynchronous:
            work()
            return

        def run() -> None:
            try:
                work()
            except BaseException as e:  # noqa: BLE001 - re-raised in wait()
                self._error = e

        self._thread = threading.Thread(target=run, name=f"ckpt-{step}", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            kind = DiskFullError if isinstance(err, DiskFullError) else CheckpointError
            raise kind(f"background checkpoint write failed: {err}") from err
