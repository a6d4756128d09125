"""A process's start-up with Python's cyclic garbage collector paused.

Why: the imports an entry point makes before its real work (torch: ~1.1 s of CPU; torch._dynamo,
which ``torch.optim`` imports when an optimizer is built: ~0.9 s; MLflow: ~1.2 s) create some
700,000 objects that live until the process exits. While they are being created, the collector
keeps walking all of them: it adds about a third. Measured here (one core, CPU seconds):
``import torch, torch._dynamo`` 2.5-3.1 with the collector on, 2.0-2.2 paused; ``import mlflow``
1.87 and 1.24. Every training rank, torchrun agent and ``pretrain`` process pays this at each
start, requeue and resume (on a node with 8 ranks, 8 times over, on shared cores).

:func:`pause_collector` is called on an entry point's first lines (only when it runs as a
program, never when imported into someone else's process); :func:`resume_collector` at the end
of its set-up freezes what exists (``gc.freeze``: those objects move to a generation the
collector never walks again, which also keeps later collections short) and turns the collector
back on for the work itself, so garbage cycles made while training are collected as ever.
The cycles left over by the imports themselves (about 10,000 of a rank's 700,000 objects) are
frozen with the rest, a fixed few MB: collecting them first would cost a full pass (0.5 s).
"""

from __future__ import annotations

import atexit
import gc

_paused = False  # whether pause_collector() turned the collector off and resume_collector() has not run


def pause_collector() -> None:
    """Turn the cyclic collector off for this process's imports and set-up (a no-op when it is off
    already: somebody else owns that choice). Reference counting still frees everything else."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume_collector() -> None:
    """End of set-up: freeze the objects made so far and turn the collector back on. A no-op unless
    :func:`pause_collector` paused it, so library use (tests, benches calling a worker in-process)
    never has its objects frozen."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()
        # A process that ends through the interpreter's normal exit (a crash's traceback, sys.exit)
        # hands them back first: native extensions check at exit that their objects were freed
        # (Triton's, imported by torch._dynamo, prints "nanobind: leaked ..." for frozen ones).
        atexit.register(gc.unfreeze)
