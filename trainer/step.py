"""One optimizer step, and the model set-up it runs on, without a run dir.

:class:`TrainStep` is the step the trainer takes (``trainer.train``) and the one the bench times
(``bench/train_step.py``): ``grad_accum`` micro-steps of (B, T) tokens, gradients all-reduced
only on the last one (``no_sync`` before it), each micro-loss divided by ``grad_accum`` so the
accumulated gradient is the mean over the whole batch, global-norm clipping, and an AdamW update
unless the loss or gradient norm was non-finite on any rank (then no rank updates; see
``trainer.train``). It needs the model, its training wrapper, the optimizer, the ``train``
section and the process group, nothing else: no lock, tracking, metrics or checkpoints, so a
benchmark measures exactly the code that trains.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer import precision
from trainer.config import TrainConfig
from trainer.dist import DistEnv, all_reduce_sum
from trainer.fp8 import convert_to_fp8, fp8_problem
from trainer.loss_kernel import loss_kernel_problem
from trainer.model import GPT, GPTConfig, sdpa_backend_problem
from trainer.optim import lr_at, set_lr

Batch = tuple[torch.Tensor, torch.Tensor]


class StepResult(NamedTuple):
    loss: float  # mean loss over the global batch
    grad_norm: float  # before clipping
    lr: float
    skipped: bool  # non-finite loss or grad norm on some rank: no rank updated


def build_model(gpt_cfg: GPTConfig, tc: TrainConfig, device: torch.device) -> GPT:
    """The model on ``device`` with the configured runtime choices (loss chunking and kernel, SDPA backend)
    and, with ``train.fp8``, FP8 matmuls in its blocks (``trainer.fp8``).

    Seeding is the caller's (the trainer seeds identically on every rank first). Raises
    ValueError when ``train.sdpa_backend``, ``train.loss_kernel`` or ``train.fp8`` cannot run on this device."""
    problem = (sdpa_backend_problem(tc.sdpa_backend, device.type) or loss_kernel_problem(tc.loss_kernel, device.type)
               or (fp8_problem(device) if tc.fp8 else None))
    if problem:
        raise ValueError(problem)
    model = GPT(gpt_cfg).to(device)
    model.set_runtime(loss_chunk_tokens=tc.loss_chunk_tokens, sdpa_backend=tc.sdpa_backend, loss_kernel=tc.loss_kernel)
    if tc.fp8:
        convert_to_fp8(model.transformer.h)
    return model


def wrap_model(model: GPT, tc: TrainConfig, env: DistEnv) -> tuple[nn.Module, nn.Module]:
    """``(compiled, forward)``: the model under ``torch.compile`` when ``train.compile`` (else the
    model itself), and that wrapped in DDP when there is a process group (what a step calls)."""
    compiled = torch.compile(model, mode=tc.compile_mode, fullgraph=tc.compile_fullgraph) if tc.compile else model
    if not env.distributed:
        return compiled, compiled
    dev = env.device
    return compiled, DDP(compiled, device_ids=[dev.index] if dev.type == "cuda" else None)


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Batch:
    """A CPU batch onto ``device`` (pinned, asynchronous copies on CUDA; as is elsewhere)."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


class TrainStep:
    """Callable: ``step(index, next_batch)`` takes optimizer step ``index`` (0-based) on the
    batches ``next_batch()`` returns (on the device), and returns a :class:`StepResult`."""

    def __init__(self, model: GPT, forward: nn.Module, optimizer: torch.optim.Optimizer, tc: TrainConfig,
                 env: DistEnv, grad_accum: int, nan_steps: frozenset[int] | set[int] = frozenset()):
        self.model, self.forward, self.optimizer = model, forward, optimizer
        self.tc, self.env, self.grad_accum = tc, env, grad_accum
        self.dtype = precision.compute_dtype(tc.dtype, env.device, key="train.dtype")
        self.nan_steps = nan_steps  # test-only fault injection (trainer.train.FAULT_NAN_ENV), 1-based steps

    def autocast(self) -> contextlib.AbstractContextManager:
        return precision.autocast(self.env.device, self.dtype)

    def __call__(self, index: int, next_batch: Callable[[], Batch]) -> StepResult:
        tc = self.tc
        lr = lr_at(index, tc.lr, tc.min_lr, tc.warmup_steps, tc.max_steps)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = self._accumulate(next_batch)
        if index + 1 in self.nan_steps:
            loss_sum = loss_sum * float("nan")  # test-only fault: this rank's loss only
        clip = tc.grad_clip if tc.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        # one collective: [loss, "not finite here"], summed; every rank then decides alike
        bad = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm.to(loss_sum.device)))
        packed = torch.stack([loss_sum, bad.to(loss_sum.dtype)])
        all_reduce_sum(self.env, packed)
        skipped = bool(packed[1].item() > 0)
        if not skipped:
            self.optimizer.step()
        loss_value = (packed[0] / self.env.world_size).item()
        return StepResult(loss_value, float(grad_norm.item()), lr, skipped)

    def _accumulate(self, next_batch: Callable[[], Batch]) -> torch.Tensor:
        """Forward and backward of every micro-batch; returns this rank's mean loss (detached)."""
        loss_sum = torch.zeros((), device=self.env.device)
        for micro in range(self.grad_accum):
            x, y = next_batch()
            last = micro == self.grad_accum - 1
            sync_ctx = self.forward.no_sync() if (self.env.distributed and not last) else contextlib.nullcontext()
            with sync_ctx:
                with self.autocast():
                    _, loss = self.forward(x, y)
                loss = loss / self.grad_accum
                loss_sum += loss.detach()
                loss.backward()
        return loss_sum
