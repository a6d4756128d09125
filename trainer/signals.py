"""Stop signals become a flag; the training loop decides when it is safe to act on it.

A signal handler must not checkpoint (it can fire inside a collective or a CUDA call), so it
only records the signal. Ranks agree on the flag with one all-reduce per step boundary, because
SLURM/torchrun may signal ranks at slightly different times and every rank must stop after the
same step for the checkpoint to be consistent.

A stop signal must neither be lost nor kill a worker at either end of its life, because SLURM
signals every process of a job step whenever the time limit or a preemption comes:

* Before the handlers exist (interpreter start, ``import torch``, rendezvous), the launcher keeps
  SIGUSR1/SIGUSR2 *blocked* for torchrun and so for the workers it spawns (:func:`block_user_signals`):
  a signal sent then waits, pending, and :meth:`StopFlag.install` receives it as soon as it
  unblocks them. Ignoring them instead, as torchrun itself must, would discard the signal.
  SIGTERM cannot be blocked that way (torchrun needs it), so ``python -m trainer.train`` *holds*
  the stop signals from its first line (:func:`common.stop_signals.hold_stop_signals`) and
  :meth:`StopFlag.install` replays a held one: a worker signalled while importing torch (1-3 s)
  stops with exit 3 before training, instead of dying of the signal.
* After the outcome is decided (:meth:`StopFlag.settle`), the signals are ignored: Python puts
  its handlers back to the default action while the interpreter exits, and a SIGUSR2 then would
  kill a worker that has finished, which torchrun reports as a failure.

A stop must not fail on the way out either. The terminal a run was started from can go away (a
closed window, a dropped ssh session): its hangup stops `pretrain train` and so, through torchrun,
the workers, which still write to that terminal, where every write now fails (EIO; EPIPE for a
pipe whose reader is gone). An exception from a progress line or from "received SIGTERM" would kill
the rank before it checkpoints; :func:`survive_lost_output` makes such a stream a quiet one instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from common.stop_signals import replay_held_stop_signals

USER_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
LOST_OUTPUT = (errno.EIO, errno.EPIPE)  # a write to a terminal that hung up / a pipe nobody reads


def block_user_signals() -> None:
    """For torchrun's process, before exec (``preexec_fn``): SIGUSR1/2 would kill torchrun, so they
    are ignored there, and blocked, so that the workers it spawns inherit them pending, not lost."""
    for s in USER_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, USER_SIGNALS)


class StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._signals: list[int] = []

    def install(self, include_usr1: bool) -> None:
        """Record stop signals from now on, including one that arrived, blocked or held, before this."""
        # SIGINT too: Ctrl-C in a terminal reaches every rank, and should save, not crash mid-step.
        self._signals = [signal.SIGTERM, signal.SIGUSR2, signal.SIGINT]
        if include_usr1:
            # NCCL builds use SIGUSR1 for their own purposes (e.g. flight-recorder dumps); on CPU it is ours.
            self._signals.append(signal.SIGUSR1)
        for s in self._signals:
            signal.signal(s, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, USER_SIGNALS)  # a pending one is handled here
        replay_held_stop_signals()  # and one that came while the worker started

    def settle(self) -> None:
        """The exit code is decided and written: a stop signal from now on has nothing to stop,
        and must not turn a finished (or checkpointed) worker into a killed one."""
        for s in self._signals:
            signal.signal(s, signal.SIG_IGN)

    def _handle(self, signum: int, frame) -> None:  # noqa: ANN001 - signal API
        if self.signum is None:  # os.write: a print here could interrupt one of the main thread's
            say = f"received {signal.Signals(signum).name}: will checkpoint at the next step boundary and exit\n"
            try:
                os.write(2, say.encode())
            except OSError as e:  # stderr is a terminal that has gone: the stop goes on without the message
                if e.errno not in LOST_OUTPUT:
                    raise
                silence_fd(2)
        self.signum = signum

    @property
    def is_set(self) -> bool:
        return self.signum is not None


def silence_fd(fd: int) -> None:
    """Point ``fd`` (a standard stream whose terminal or reader is gone) at /dev/null, so that what
    is still buffered for it, and every later write, by Python or by a library, succeeds unseen."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(null, fd)
    except OSError:
        pass
    finally:
        os.close(null)


class SurvivingStream:
    """``sys.stdout``/``sys.stderr`` of a worker: a write or flush that fails (the terminal hung up,
    the pipe's reader exited) silences the stream (:func:`silence_fd`) instead of raising."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def _fd(self) -> int | None:
        try:
            return self._stream.fileno()
        except (OSError, ValueError, AttributeError):
            return None

    def _retry_silenced(self, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except OSError as e:
            fd = self._fd()
            if e.errno not in LOST_OUTPUT or fd is None:
                raise  # e.g. a full disk under a redirected log: the run's own error handling decides
            silence_fd(fd)  # then once more: the buffered text goes to /dev/null, not to the next write
        try:
            return call(*args)
        except OSError:
            return None

    def write(self, text: str) -> int:
        self._retry_silenced(self._stream.write, text)
        return len(text)

    def flush(self) -> None:
        self._retry_silenced(self._stream.flush)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def survive_lost_output() -> Iterator[None]:
    """For the block, a lost stdout/stderr is silenced rather than fatal (see the module docstring).
    The originals are put back after: one that was silenced writes to /dev/null from then on, so the
    interpreter's last flush at exit cannot fail either (which would turn exit 3 into 120)."""
    saved = sys.stdout, sys.stderr
    if sys.stdout is not None:
        sys.stdout = SurvivingStream(sys.stdout)  # type: ignore[assignment]
    if sys.stderr is not None:
        sys.stderr = SurvivingStream(sys.stderr)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
