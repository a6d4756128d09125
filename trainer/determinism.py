"""Repeatable arithmetic for a compiled run that must resume bit for bit (``train.deterministic``).

Eager training already repeats itself bit for bit: on CPU (once MKL's vector math is set up on one
thread, :func:`reproducible_cpu_math`, which every training process calls) and on one H100 (0 of 40
losses differed after a stop and resume, twice). Under ``torch.compile`` on the H100 it did not (33
of 40 steps differed, by up to 8e-5), and inductor's own code names two ways a compiled step can
differ from one process to the next:

* it lowers scatter-adds, such as the backward of the token and position embeddings, to atomic
  adds, whose order (and so their fp32 rounding) changes from run to run; with deterministic
  algorithms on it calls ATen's sorted, deterministic ``index_put_`` instead (``tests/test_determinism.py``
  sees both in the code inductor generates on CPU);
* it picks some reduction kernels' block sizes, and whether to pad a matmul, by timing them on the
  device; ``torch._inductor.config.deterministic`` makes those choices without timing.

Strict mode (not ``warn_only``) is what also switches PyTorch's flash-attention backward to its
deterministic path, and it needs ``CUBLAS_WORKSPACE_CONFIG`` set before the first cuBLAS call; an op
with no deterministic implementation then raises, naming itself, instead of silently differing.
``torch.empty`` is not filled with NaN (deterministic mode's default): nothing here reads memory it
did not write, and the fill would cost a pass over every new tensor.

Its cost in tokens/s on a GPU is not measured yet (``bench/device_run.sh`` part ``deterministic``),
so it is off by default.
"""

from __future__ import annotations

import os
import sys

import torch

# one of the two settings cuBLAS documents as deterministic (workspaces per stream: 8 of 4 MiB)
CUBLAS_WORKSPACE = ":4096:8"


def reproducible_cpu_math() -> None:
    """Make this process's CPU math give the same bits from one run to the next.

    PyTorch's CPU build computes elementwise functions such as ``exp`` (the chunked loss's softmax)
    with MKL's vector math library (VML). VML's first call in a process, made from several threads at
    once, sometimes gave other bits than every later call: 2 to 5 of 8 processes, never once VML had
    been called on one thread first, never with one thread. A 1-rank CPU run with 2 intra-op threads
    therefore differed in its last bits from one run to the next (4 runs of 8 steps: 3 distinct
    histories; step 8's gradient norm 1.0390753746 or 1.0390754938), and its resume was not exact.
    Ranks with one thread each (torchrun's default for several ranks, and every multi-rank test)
    were not affected. Called here once, on one thread, before any other op: 8 runs of 30 steps on
    2 threads then gave the same bits.

    (MKL's strict reproducible mode, ``MKL_CBWR=AUTO,STRICT``, is not needed for this: it makes a
    matmul's bits independent of the thread count, but other reductions still depend on it, so a
    run on 1 and on 2 threads differs either way.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.ones(4096).exp_()  # VML's one-time set-up, on one thread
    finally:
        torch.set_num_threads(threads)


def make_deterministic() -> None:
    """Switch this process to deterministic kernels, eager and compiled (process-wide, for good).

    Call it before the first CUDA matmul and before ``torch.compile`` traces the model: cuBLAS reads
    its workspace setting once, and inductor bakes these choices into the code it generates."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    # inductor reads this as its config module is imported (by the first torch.compile); importing it
    # here for an eager run would load inductor for nothing (under TRITON_INTERPRET=1, the tests'
    # setting, that import alone changed an eager CPU loss in its last bits)
    os.environ["TORCHINDUCTOR_DETERMINISTIC"] = "1"
    inductor_config = sys.modules.get("torch._inductor.config")
    if inductor_config is not None:
        inductor_config.deterministic = True
