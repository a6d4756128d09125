"""Stop signals become a flag; the training loop decides when it is safe to act on it.

A signal handler must not checkpoint (it can fire inside a collective or a CUDA call), so it
only records the signal. Ranks agree on the flag with one all-reduce per step boundary, because
SLURM/torchrun may signal ranks at slightly different times and every rank must stop after the
same step for the checkpoint to be consistent.
"""

from __future__ import annotations

import signal
import sys


class StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self, include_usr1: bool) -> None:
        # SIGINT too: Ctrl-C in a terminal reaches every rank, and should save, not crash mid-step.
        sigs = [signal.SIGTERM, signal.SIGUSR2, signal.SIGINT]
        if include_usr1:
            # NCCL builds use SIGUSR1 for their own purposes (e.g. flight-recorder dumps); on CPU it is ours.
            sigs.append(signal.SIGUSR1)
        for s in sigs:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame) -> None:  # noqa: ANN001 - signal API
        if self.signum is None:
            print(f"received {signal.Signals(signum).name}: will checkpoint at the next step boundary and exit", file=sys.stderr, flush=True)
        self.signum = signum

    @property
    def is_set(self) -> bool:
        return self.signum is not None
