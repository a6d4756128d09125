"""Ending a process as the interpreter would, without its teardown of every module.

Why: once a process has imported torch (and, on rank 0 or in the workflow driver, MLflow,
matplotlib or Ray), CPython's last act, clearing every module and collecting what they held,
takes 0.7-1.2 s of CPU (measured on 2 cores: 0.7 s after ``torch._dynamo``, which
``torch.optim`` imports, 1.2 s with MLflow as well). It comes after the outcome is written and the
checkpoint committed, on every finish, stop and requeue, in every rank, in torchrun's agent and
in the ``pretrain`` command that waits for them all: time a job near its SLURM deadline does not
have, spent on nothing the operating system would not do at once.

:func:`exit_now` does what the interpreter's exit does that matters, in the same order: it waits
for the threads that are not daemons (an asynchronous checkpoint write, say; idle thread-pool
workers are told to end first, as the interpreter tells them), runs the ``atexit``
callbacks (Ray's shutdown, ``logging``'s flush, ``weakref.finalize`` clean-ups, a compile worker
pool's shutdown) and flushes stdout/stderr, then ends the process with ``os._exit``. What it
skips are finalizers of objects still alive at that point: no code here relies on one (files that
matter are written with ``common.durable`` and closed; ``metrics.jsonl`` is flushed per line).
Only a command's top level calls it, with the code its ``main`` returned; an exception still
takes the normal way out, traceback and all.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_now(code: int | None) -> NoReturn:
    """Exit with ``code`` (None is 0) after what the interpreter's own exit would do but its teardown."""
    # The interpreter's own two calls, in its order: wake idle pool workers (concurrent.futures
    # registers that with threading, not atexit) and join every thread that is not a daemon,
    # then run the atexit callbacks.
    threading._shutdown()  # noqa: SLF001
    atexit._run_exitfuncs()  # noqa: SLF001
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a terminal that is gone, a stream already closed
            pass
    os._exit(code or 0)
