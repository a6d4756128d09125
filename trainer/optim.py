"""AdamW parameter groups and the learning-rate schedule (linear warmup, cosine decay to min_lr)."""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    device_type: str,
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices/embeddings only (≥2-D), none on biases and LayerNorm gains.

    Decaying gains and biases only hurts (they set scales, not features). The fused CUDA kernel
    saves a launch per parameter; it is used when available and the model is on CUDA.
    """
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    extra = {}
    if device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        extra["fused"] = True
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **extra)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): GPT-3's warmup + cosine to ``min_lr``.

    A pure function of the step, so the "LR-schedule position" of a checkpoint is its step, and a
    resumed run (even with a longer max_steps) recomputes the schedule rather than storing it.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    decay_steps = max(1, max_steps - warmup_steps)
    ratio = (step - warmup_steps) / decay_steps
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return min_lr + coeff * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
