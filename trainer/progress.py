"""How far a training is and when it will be done: the step line's ETA and `pretrain status`.

The ETA is the mean step time of a window of recent steps times the steps left. The first steps
of every process are left out: they include ``torch.compile``, the allocator's warm-up and the
first shard's check, and would make a fresh or resumed run look slower than it is. Checkpoint and
eval pauses are left in (they are part of what the remaining steps will cost). ``pretrain status``,
reading metrics.jsonl written by processes it cannot tell apart, takes the median step time instead.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from itertools import pairwise
from typing import Any

WARMUP_STEPS = 3  # steps of each process not counted in the ETA
WINDOW = 50  # recent steps the ETA averages over


def format_duration(seconds: float | None) -> str:
    """``42s``, ``17m05s``, ``3h12m``, ``2d04h``: short enough for a step line."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class StepTimer:
    """Wall time between step ends over a moving window, in the training loop (no I/O, O(1))."""

    def __init__(self, warmup: int = WARMUP_STEPS, window: int = WINDOW) -> None:
        self.warmup = warmup
        self._seen = 0
        self._last: float | None = None
        self._gaps: deque[float] = deque(maxlen=window)

    def tick(self, now: float | None = None) -> None:
        """Call once at the end of every step."""
        now = time.monotonic() if now is None else now
        self._seen += 1
        if self._last is not None and self._seen > self.warmup:
            self._gaps.append(now - self._last)
        self._last = now

    def eta_s(self, steps_left: int) -> float | None:
        """Seconds until ``steps_left`` more steps are done; None until the window has a step."""
        if not self._gaps:
            return None
        return sum(self._gaps) / len(self._gaps) * max(steps_left, 0)


def eta_from_records(records: Iterable[dict[str, Any]], max_steps: int, window: int = WINDOW) -> float | None:
    """The same estimate from metrics.jsonl (``pretrain status``), from recent steps' ``time`` stamps.

    The median gap between consecutive steps: a restart (hours between two steps, or a time going
    back) or a slow first step after a resume would dominate a mean of a file that spans processes.
    """
    recent = list(records)[-(window + 1):]
    gaps = sorted(
        float(b["time"]) - float(a["time"])
        for a, b in pairwise(recent)
        if a.get("time") and b.get("time") and int(b["step"]) == int(a["step"]) + 1 and b["time"] >= a["time"]
    )
    if not gaps:
        return None
    return gaps[len(gaps) // 2] * max(max_steps - int(recent[-1]["step"]), 0)
