"""Benchmark the training loss alone: LM head + cross-entropy, forward and backward, three ways.

    python bench/loss_kernel.py                      # GPT-2 124M's shapes on CUDA: 65,536 rows (B=64, T=1024)
    TRITON_INTERPRET=1 python bench/loss_kernel.py --rows 256 --vocab 1000 --dim 32 --device cpu   # a CPU check

On the same hidden states, head weight and targets, in this one process, each timed over
``--iters`` calls after one warm-up (bf16 autocast on CUDA, fp32 on CPU):

* plain: ``F.cross_entropy`` over the full logits, as build-nanogpt and ``train.loss_chunk_tokens: 0``;
* chunked: ``trainer.loss`` in chunks of ``--chunk`` rows, its gradient formed by PyTorch ops
  (``train.loss_kernel: torch``);
* kernel: the same chunks, the gradient formed by the Triton kernel (``train.loss_kernel: triton``).

Prints one ``RESULT`` line per way (ms per call, rows/s, peak memory on CUDA, loss), a ``RATIO``
line: rows/s of chunked and kernel over plain, and of kernel over chunked, and a ``GRADS`` line: the
share of the kernel's gradient elements (hidden states, head weight) equal bit for bit to the
PyTorch ops' (on a GPU both round to nearest even: 1.0 expected; Triton's CPU interpreter truncates). Why a separate
benchmark: the kernel changes one part of the step; the whole-step bench (``bench/train_step.py``)
dilutes that part's change by everything else, and takes a minute per setting on a GPU where this
takes seconds. Exit 1 when the three losses disagree beyond rounding (1e-3 relative in bf16).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer.loss import linear_cross_entropy  # noqa: E402
from trainer.loss_kernel import loss_kernel_problem  # noqa: E402


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=65536, help="tokens per micro-step (B*T)")
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--chunk", type=int, default=8192, help="rows per loss chunk (train.loss_chunk_tokens)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def _ways(chunk: int) -> dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
    return {
        "plain": lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-1),
        "chunked": lambda h, w, t: linear_cross_entropy(h, w, t, chunk, kernel="torch"),
        "kernel": lambda h, w, t: linear_cross_entropy(h, w, t, chunk, kernel="triton"),
    }


def _time(fn: Callable, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, iters: int, device: torch.device) -> dict:
    """Median seconds of forward + backward, the peak memory above what was allocated before, the loss."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times, loss = [], None
    h.grad = w.grad = None  # the previous way's, not this one's
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    for i in range(iters + 1):  # the first call warms up (allocator, kernel compilation)
        h.grad = w.grad = None
        sync()
        t0 = time.perf_counter()
        with autocast:
            loss = fn(h, w, t)
        loss.backward()
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
    return {"s": statistics.median(times), "peak_gib": peak, "loss": float(loss.detach()), "grads": (h.grad.clone(), w.grad.clone())}


def _same(a: torch.Tensor, b: torch.Tensor) -> str:
    """The share of elements equal bit for bit, and the largest difference relative to the tensor's scale."""
    return f"{(a == b).float().mean().item():.6f} (max diff {((a - b).abs().max() / b.abs().max()).item():.1e})"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = torch.device(args.device)
    problem = loss_kernel_problem("triton", device.type)
    if problem:
        print(f"bench/loss_kernel.py: {problem}", file=sys.stderr)
        return 2
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(args.rows, args.dim, generator=g).to(device).requires_grad_()
    w = (torch.randn(args.vocab, args.dim, generator=g) * 0.02).to(device).requires_grad_()
    t = torch.randint(0, args.vocab, (args.rows,), generator=g).to(device)
    got = {name: _time(fn, h, w, t, args.iters, device) for name, fn in _ways(args.chunk).items()}
    for name, r in got.items():
        mem = f" peak_mem={r['peak_gib']:.2f}GiB" if r["peak_gib"] is not None else ""
        print(f"RESULT way={name} rows={args.rows} vocab={args.vocab} dim={args.dim} chunk={args.chunk} device={device.type} "
              f"ms={r['s'] * 1e3:.2f} rows_s={args.rows / r['s']:,.0f}{mem} loss={r['loss']:.6f}")
    rate = {name: args.rows / r["s"] for name, r in got.items()}
    print(f"RATIO chunked_over_plain={rate['chunked'] / rate['plain']:.3f} kernel_over_plain={rate['kernel'] / rate['plain']:.3f} "
          f"kernel_over_chunked={rate['kernel'] / rate['chunked']:.3f}")
    # same rows, same matmuls: if the kernel's gradient equals the ops' bit for bit, so do these
    (kh, kw), (ch, cw) = got["kernel"]["grads"], got["chunked"]["grads"]
    print(f"GRADS kernel_vs_chunked hidden_equal={_same(kh, ch)} weight_equal={_same(kw, cw)}")
    losses = [r["loss"] for r in got.values()]
    spread = (max(losses) - min(losses)) / abs(losses[0])
    if spread > 1e-3:
        print(f"bench/loss_kernel.py: the losses disagree ({losses}, relative spread {spread:.2e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
