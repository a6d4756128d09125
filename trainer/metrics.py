"""``RUN_DIR/metrics.jsonl``: one JSON object per optimizer step, written by rank 0.

Each line has ``step, loss, lr, grad_norm, tokens, tokens_per_s, mfu, time, dt`` and, on the
steps where they ran, ``val_loss`` and ``sample`` (so validation lives in the same file, in the
line of the step after which it was measured; each step still has exactly one line). Floats are
written by ``json`` with ``repr``, so ``loss`` read back is bit-identical to the trained value.
The file is strict JSON: a non-finite value (the loss of a skipped step, ``"skipped": true``) is
written as ``null``, which every JSON reader accepts (``NaN`` is not JSON).

On resume from step S, lines of steps > S (written by the interrupted run after its last
checkpoint) are dropped with an atomic rewrite, so the file again holds every step once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from common.durable import atomic_output


def _raw_lines(path: Path) -> list[bytes]:
    """The file's lines as bytes: one line that is not UTF-8 must not make the whole file unreadable."""
    return path.read_bytes().splitlines()


NUMERIC_FIELDS = ("loss", "val_loss", "tokens", "tokens_per_s", "mfu", "time")  # what readers compute with


def is_number(value: Any) -> bool:
    """An int or float, not a bool (JSON's true is no loss value)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def with_numbers(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with each of NUMERIC_FIELDS that is not a number made null (unknown), so one
    hand-edited or damaged value costs only itself in `status` and `report`, not the whole view."""
    bad = [k for k in NUMERIC_FIELDS if k in record and not is_number(record[k])]
    return {**record, **dict.fromkeys(bad)}


def _record(line: bytes) -> dict[str, Any] | None:
    """The step record on ``line``, or None for one that is not whole: torn (a crash mid-write),
    not UTF-8, not an object, or without an integer ``step`` (every reader sorts and counts by it)."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    step = rec.get("step") if isinstance(rec, dict) else None
    return rec if is_number(step) and isinstance(step, int) else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Parse the file, leaving out lines that are not whole records (a torn last line after a crash
    mid-write, stray bytes), so a damaged line costs only itself, never a resume or a status."""
    path = Path(path)
    if not path.is_file():
        return []
    return [rec for rec in map(_record, _raw_lines(path)) if rec is not None]


def strict_json(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with non-finite floats replaced by None (JSON has no NaN or Infinity)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class MetricsLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = None

    def truncate_after(self, step: int) -> int:
        """Keep only lines with ``step <= step`` (rewritten atomically); returns how many were dropped."""
        if not self.path.exists():
            return 0
        records = read_metrics(self.path)
        kept = [r for r in records if r["step"] <= step]
        raw_lines = len(_raw_lines(self.path))
        with atomic_output(self.path, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        return raw_lines - len(kept)

    def append(self, record: dict[str, Any]) -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
