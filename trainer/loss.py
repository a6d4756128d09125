"""LM head + cross-entropy computed chunk by chunk, never holding the (B·T × vocab) logits.

Why: in training, ``F.cross_entropy(lm_head(x).float(), y)`` materialises the logits of every
token at once, in fp32 for the loss and again for its gradient: for GPT-2 124M at B=64, T=1024
that is 65,536 × 50,304 × 4 B ≈ 13 GB written and read several times per micro-step, the
largest activation of the model. Here the rows are processed ``chunk`` at a time: for each chunk
the logits are computed, reduced to the loss (the target's negative log-probability) and, while
they are still in cache/HBM, turned into that chunk's gradient ``softmax − one_hot`` and pushed through
the head's two backward matmuls. Only the gradients wrt the hidden states (N × C) and the head
weight (V × C) survive to the backward pass, which merely scales them by the incoming gradient.
(The same idea as Liger-Kernel's fused linear cross-entropy and torchtitan's chunked loss, written
here in plain PyTorch so that it runs on CPU, under bf16 autocast and inside torch.compile.)

Numerics: the head matmuls run in ``compute_dtype`` (bf16 under autocast, as ``nn.Linear``
would), the log-softmax and softmax in fp32, as the plain path's ``logits.float()``. The hidden
and weight gradients are kept in fp32 (the weight's summed over chunks). In fp32 the loss and
gradients equal the plain path's to rounding (tests/test_loss.py: 1e-5 relative); in bf16 they
differ from it by bf16 rounding only, as two bf16 runs with different kernels would.

Memory traffic per chunk (eager): the compute-dtype logits, one fp32 log-prob buffer turned in
place into the gradient, and its compute-dtype copy for the two backward matmuls: about 6
fp32-sized passes where the plain path makes ~10 over the whole (B·T × vocab) and keeps them
alive until the backward. Under torch.compile, inductor fuses the per-chunk element-wise work;
eager, ``kernel="triton"`` (``train.loss_kernel``) does it in one Triton kernel that writes the
gradient over the logits in place, with no fp32 buffer (:mod:`trainer.loss_kernel`).

Targets equal to ``ignore_index`` (the model uses -1) contribute neither loss nor gradient, and
the mean is over the remaining targets, as ``F.cross_entropy(..., ignore_index=-1)``. No host
sync: the count of valid targets stays a tensor, so the training loop's micro-steps never wait.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits of one chunk of rows (the matmul itself in the inputs' dtype)."""
    return F.linear(h, weight).float()


def _loss_only(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy without gradients (validation under no_grad): chunked, no backward work."""
    valid = targets != ignore_index
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        logits = _chunk_logits(hidden[s : s + chunk], weight)
        t = targets[s : s + chunk]
        total = total + F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum")
    return total / valid.sum()


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``mean CE(hidden @ weight.T, targets)`` whose gradients are computed in the forward pass.

    Inputs: ``hidden`` (N, C), ``weight`` (V, C) (both any float dtype; they are cast to
    ``compute_dtype`` for the matmuls), ``targets`` (N,) int64. Returns a 0-dim fp32 loss.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, ignore_index: int, compute_dtype: torch.dtype,  # type: ignore[override]
                kernel: str = "torch"):
        n_rows = hidden.shape[0]
        h_all = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        valid = targets != ignore_index
        # a 0/0 (every target ignored) gives NaN, as F.cross_entropy does
        inv_count = 1.0 / valid.sum().to(torch.float32)
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, n_rows, chunk):
            h = h_all[s : s + chunk]
            keep = valid[s : s + chunk, None]
            # d(CE)/d logits = softmax - one_hot, in the compute dtype, and each row's loss; the
            # per-row factor (1 / n_valid, or 0 for an ignored target) is applied to the small
            # (n, C) operands instead of this (n, V) one: the products are the same
            g, row_loss = _grad_and_loss(F.linear(h, w), safe_targets[s : s + chunk], kernel)
            loss_sum += torch.where(keep, row_loss, 0.0).sum()
            scale = keep.to(torch.float32) * inv_count
            grad_hidden[s : s + chunk] = (g @ w).float() * scale
            grad_weight += (g.t() @ (h.float() * scale).to(compute_dtype)).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return loss_sum * inv_count

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = (grad_hidden * grad_loss).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_weight * grad_loss).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None


def _grad_and_loss(logits: torch.Tensor, targets: torch.Tensor, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(``softmax(logits) − one_hot(targets)`` in the logits' dtype, each row's loss (n, 1) fp32)
    of one chunk: one fused pass in place (``kernel="triton"``, :mod:`trainer.loss_kernel`), or
    PyTorch ops through one fp32 (n, V) buffer, the log-probabilities turned into the gradient in place."""
    if kernel == "triton":
        from trainer.loss_kernel import softmax_minus_one_hot_

        return logits, softmax_minus_one_hot_(logits, targets)[:, None]
    t = targets[:, None]
    logp = F.log_softmax(logits, dim=-1, dtype=torch.float32)  # upcasts as it reads
    row_loss = -logp.gather(1, t)
    g = logp.exp_()
    g.scatter_add_(1, t, torch.full_like(row_loss, -1.0))
    return g.to(logits.dtype), row_loss


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    ignore_index: int = IGNORE_INDEX,
    kernel: str = "torch",
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, ``chunk`` rows at a time.

    ``hidden`` (..., C) and ``targets`` (...) are flattened. The matmul runs in the autocast dtype
    when autocast is on for this device (as ``nn.Linear`` would), else in ``weight``'s dtype.
    Without gradients (``torch.no_grad``, or nothing requires grad) only the loss is computed.
    ``kernel``: how each chunk's softmax gradient is formed, "torch" or "triton" (:mod:`trainer.loss_kernel`).
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = weight.dtype
    if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
        return _loss_only(h.to(compute_dtype), weight.to(compute_dtype), t, chunk, ignore_index)
    return ChunkedLinearCrossEntropy.apply(h, weight, t, chunk, ignore_index, compute_dtype, kernel)


__all__ = ["ChunkedLinearCrossEntropy", "IGNORE_INDEX", "linear_cross_entropy"]
