"""One Triton kernel for the chunked loss's element-wise work (``train.loss_kernel: triton``).

Why: per chunk of rows, :mod:`trainer.loss` turns the (n × vocab) logits into the row losses and
the gradient ``softmax − one_hot`` with PyTorch ops: ``log_softmax`` (reads the compute-dtype
logits, writes fp32), ``exp_`` in place (reads and writes fp32), then a cast back to the compute
dtype (reads fp32, writes it). Eager, each op is its own pass over the largest tensor of the step:
about 20 bytes moved per logit in bf16, some 66 GB per micro-step of GPT-2 124M at B=64, T=1024.
This kernel reads each row of logits twice (an online max / sum of exponentials, then the
gradient) and writes the gradient once, in place over the logits: 6 bytes per logit, and no
fp32 buffer of the chunk at all. Under ``torch.compile`` inductor already fuses the PyTorch ops,
so the kernel matters for eager mode, where the issue's goal is ≥ 1.0× build-nanogpt.

Numerics are the PyTorch path's: logits read in their dtype and computed in fp32, loss
``logsumexp(x) − x[target]`` in fp32, the gradient rounded once to the logits' dtype. Only the
order of the fp32 sums differs (tests/test_loss_kernel.py: equal to the PyTorch path to 1e-5 in
fp32, under Triton's interpreter on CPU). The row's loss and gradient are for every row;
ignored targets are masked by the caller (:mod:`trainer.loss` scales their rows by 0).

The kernel runs wherever Triton does: CUDA GPUs, and CPU tensors under ``TRITON_INTERPRET=1``
(slow, for tests). It is reached through a ``torch.library`` custom op, so ``torch.compile`` treats
it as one opaque call instead of tracing into it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import torch

from trainer.config import LOSS_KERNELS

tl: Any = None  # triton.language, imported with the kernel's first use (importing Triton costs ~0.3 s)

MAX_BLOCK = 32768  # columns a program holds at once (Liger-Kernel's choice for its cross-entropy)


def loss_kernel_problem(name: str, device_type: str) -> str | None:
    """Why ``train.loss_kernel=name`` cannot run on ``device_type`` (None when it can)."""
    if name not in LOSS_KERNELS:
        return f"train.loss_kernel must be one of {', '.join(LOSS_KERNELS)}, got '{name}'"
    if name == "triton" and importlib.util.find_spec("triton") is None:  # the CPU wheel of torch lacks it
        return "train.loss_kernel 'triton' needs the triton package (CUDA builds of torch bring it): pip install triton"
    if name == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"train.loss_kernel 'triton' runs on CUDA, not {device_type} (set it to 'torch', or TRITON_INTERPRET=1 to emulate)"
    return None


def _softmax_minus_one_hot(logits_ptr, stride, targets_ptr, loss_ptr, n_cols, BLOCK: tl.constexpr):
    """One row per program: ``loss[row] = logsumexp(x) - x[t]``, then ``x <- softmax(x) - one_hot(t)``."""
    row = tl.program_id(0).to(tl.int64)
    x_ptr = logits_ptr + row * stride
    target = tl.load(targets_ptr + row)
    running_max = -float("inf")
    running_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, 0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    tl.store(loss_ptr + row, lse - tl.load(x_ptr + target).to(tl.float32))
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
        tl.store(x_ptr + cols, grad.to(x_ptr.dtype.element_ty), mask=cols < n_cols)


@functools.cache
def _kernel() -> Any:
    """The kernel, jitted on first use: a process that never uses it never imports Triton."""
    global tl
    problem = loss_kernel_problem("triton", "cuda")
    if problem:
        raise RuntimeError(problem)
    import triton
    import triton.language

    tl = triton.language  # the kernel's body reads it from this module's globals when Triton compiles it
    return triton.jit(_softmax_minus_one_hot)


@torch.library.custom_op("pretrain::softmax_minus_one_hot_", mutates_args=("logits",))
def softmax_minus_one_hot_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """In place: ``logits`` (n, V), rows contiguous, becomes ``softmax − one_hot(targets)`` in its
    own dtype; returns each row's cross-entropy (n,) in fp32. ``targets`` (n,) int64 in [0, V)."""
    n_rows, n_cols = logits.shape
    if logits.stride(1) != 1 or targets.stride(0) != 1:
        raise ValueError("softmax_minus_one_hot_ needs rows of contiguous logits and contiguous targets")
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return losses
    block = min(MAX_BLOCK, 1 << (n_cols - 1).bit_length())  # the next power of 2 (a Triton block's size)
    _kernel()[(n_rows,)](logits, logits.stride(0), targets, losses, n_cols, BLOCK=block,
                         num_warps=32 if block >= 32768 else 16 if block >= 8192 else 8)
    return losses


@softmax_minus_one_hot_.register_fake
def _(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.new_empty(logits.shape[0], dtype=torch.float32)
