"""Benchmark the batched HellaSwag scorer against build-nanogpt's one-example-per-forward loop.

    python bench/hellaswag.py                            # gpt2 (124M) shape, random init, CPU/GPU auto
    python bench/hellaswag.py --rows 2000 --device cuda  # a GPU wants many rows to fill batches
    python bench/hellaswag.py --model tiny --rows 24     # seconds on a laptop

Both paths score the same rows with the same model on the same device, in this one process:

* baseline: one example per forward (4 endings as 4 padded rows, logits at every position,
  full log-softmax), exactly build-nanogpt's ``hellaswag.py`` loop;
* batched: :func:`evals.scoring.score_groups` (one packed row per example with a block mask, the
  context encoded once, the LM head only where a scored token is predicted, ``--batch-size``
  examples per forward).

What to expect: the packed rows do ~2.25x fewer FLOPs than the baseline on HellaSwag's lengths
(context ~51 tokens encoded once instead of 4 times, no padding to the longest ending, LM head
and log-softmax only at the ~122 scored positions instead of ~360). On a CPU, matmul throughput
per token is flat in the batch size, so that FLOP ratio is the speedup (2.1x measured on 2 EPYC
cores). On a GPU, one example per forward (4 rows of ~90 tokens) leaves the device mostly idle,
and batching multiplies the FLOP saving.

Rows: real HellaSwag when a GPT-2 tokenizer and data are available (``--data PATH`` or the
eval stage's sources), else synthetic token rows with HellaSwag's length profile (context ~51,
endings ~31 GPT-2 tokens), so a bare GPU machine with torch (+numpy) is enough. Both paths must
pick the same endings; the script says so and exits 1 otherwise. Prints one ``RESULT`` line.

bf16 against fp32 (``--dtypes float32,bfloat16``; no one-example loop): the batched scorer on the
same rows once per dtype, plus, with ``--eval-sdpa both``, bf16 with PyTorch's own attention-kernel
choice instead of the scorer's pinned one (see ``evals.scoring``: on Hopper that choice is cuDNN,
which builds a graph per new shape), and with ``--eval-head both``, bf16 with the LM head in bf16
instead of the scorer's fp32 head (``evals.scoring.HEAD_FP32``). Prints examples/s for each, the ratio to the first dtype and
the share of rows whose chosen ending (sum log-prob and per-token) equals the first dtype's, in one
``RESULT_DTYPES`` line. Agreement means something only for a trained model: ``--checkpoint DIR``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evals import scoring  # noqa: E402
from evals.hellaswag import predictions, score_example_unbatched  # noqa: E402
from evals.scoring import Group, Score, resolve_device, score_groups  # noqa: E402
from trainer import precision  # noqa: E402
from trainer.model import GPT, PRESETS, GPTConfig  # noqa: E402


def synthetic_groups(n: int, seed: int = 0) -> list[Group]:
    """HellaSwag-shaped token rows: context 51 +- 25 tokens, four endings 31 +- 12 tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ctx = tuple(rng.randrange(50257) for _ in range(max(5, int(rng.gauss(51, 25)))))
        ends = tuple(tuple(rng.randrange(50257) for _ in range(max(2, int(rng.gauss(31, 12))))) for _ in range(4))
        out.append(Group(ctx, ends))
    return out


def real_groups(n: int, path: str) -> tuple[list[Group], str]:
    from dataprep.tokenizer import get_gpt2
    from evals.data import load_hellaswag
    from evals.hellaswag import tokenize

    enc = get_gpt2()
    rows, source = load_hellaswag(path, limit=n)
    return [tokenize(enc, r) for r in rows], source


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2", choices=sorted(PRESETS), help="model shape preset (random init)")
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32, help="examples per forward of the batched scorer")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16")
    ap.add_argument("--data", default="auto", help="auto | synthetic | a HellaSwag .jsonl / arrow path")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--rounds", type=int, default=3, help="alternate baseline/batched over this many chunks of rows")
    ap.add_argument("--checkpoint", default="", help="a committed checkpoint dir to score with (default: random init of --model)")
    ap.add_argument("--dtypes", default="", help="e.g. float32,bfloat16: compare the batched scorer across dtypes instead")
    ap.add_argument("--eval-sdpa", default="pinned", choices=("pinned", "auto", "both"),
                    help="attention kernel of the masked forward on CUDA: the scorer's pinned one, PyTorch's choice, or both (--dtypes)")
    ap.add_argument("--eval-head", default="fp32", choices=("fp32", "autocast", "both"),
                    help="LM head of the scorer: fp32 (the scorer's default), the autocast dtype, or both (--dtypes)")
    return ap.parse_args()


def load_groups(args: argparse.Namespace) -> tuple[list[Group], str]:
    """Real HellaSwag rows when available (or asked for), else synthetic ones of the same shape."""
    if args.data == "synthetic":
        return synthetic_groups(args.rows), "synthetic tokens"
    try:
        return real_groups(args.rows, "" if args.data == "auto" else args.data)
    except Exception as e:  # noqa: BLE001 - no tokenizer/data here: the length profile is what matters
        if args.data != "auto":
            raise
        return synthetic_groups(args.rows), f"synthetic tokens (real rows unavailable: {type(e).__name__})"


def load_model(args: argparse.Namespace, device: torch.device) -> GPT:
    """The checkpoint's model, or a random init of the preset (seeded), in eval mode."""
    torch.manual_seed(0)
    if args.checkpoint:
        from trainer.checkpoint import load_model_for_eval

        return load_model_for_eval(args.checkpoint, device)[0]
    n_layer, n_head, n_embd, block = PRESETS[args.model]
    return GPT(GPTConfig(n_layer, n_head, n_embd, block)).to(device).eval()


def time_both(model: GPT, groups: list[Group], device: torch.device, args: argparse.Namespace) -> tuple[list[list[Score]], list[list[Score]], float, float]:
    """Baseline and batched scores of every row and the seconds each path took.

    Interleaved rounds (baseline on a chunk of rows, then batched on the same chunk): on a shared
    machine, load that drifts during the run hits both paths alike."""
    dtype = precision.compute_dtype(args.dtype, device, key="--dtype")
    # warm-up both paths (allocator, kernels, autotuning)
    score_groups(model, groups[:4], batch_size=4, device=device, dtype=args.dtype)
    with torch.inference_mode(), precision.autocast(device, dtype):
        score_example_unbatched(model, groups[0], device)
    sync(device)
    base: list[list[Score]] = []
    batched: list[list[Score]] = []
    t_base = t_batched = 0.0
    rounds = max(1, min(args.rounds, len(groups)))
    bounds = [round(i * len(groups) / rounds) for i in range(rounds + 1)]
    for lo, hi in zip(bounds, bounds[1:]):
        chunk = groups[lo:hi]
        t0 = time.perf_counter()
        with torch.inference_mode(), precision.autocast(device, dtype):
            for g in chunk:
                base.append([Score(lp, n, False) for lp, n in score_example_unbatched(model, g, device)])
        sync(device)
        t_base += time.perf_counter() - t0
        t0 = time.perf_counter()
        batched.extend(score_groups(model, chunk, batch_size=args.batch_size, device=device, dtype=args.dtype))
        sync(device)
        t_batched += time.perf_counter() - t0
    return base, batched, t_base, t_batched


def main() -> int:
    args = _parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    groups, source = load_groups(args)
    model = load_model(args, device)
    if args.eval_sdpa == "auto":
        scoring.CUDA_MASKED_SDPA = None
    print(f"{model.summary()}\ndevice {device}, dtype {args.dtype}, {len(groups)} rows from {source}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    if args.dtypes:
        return compare_dtypes(model, groups, device, args)

    base, batched, t_base, t_batched = time_both(model, groups, device, args)
    same = predictions(base) == predictions(batched)
    diff = max(abs(a.logprob - b.logprob) for ra, rb in zip(base, batched) for a, b in zip(ra, rb))
    r_base, r_batched = len(groups) / t_base, len(groups) / t_batched
    print(f"one example per forward: {r_base:8.2f} examples/s ({t_base:.2f} s)")
    print(f"batched (packed, bs {args.batch_size}): {r_batched:8.2f} examples/s ({t_batched:.2f} s)")
    print(f"RESULT model={args.model} device={device} rows={len(groups)} baseline={r_base:.2f}/s "
          f"batched={r_batched:.2f}/s speedup={r_batched / r_base:.2f}x same_predictions={same} max_logprob_diff={diff:.2e}")
    return 0 if same else 1


def compare_dtypes(model: GPT, groups: list[Group], device: torch.device, args: argparse.Namespace) -> int:
    """Batched scorer per dtype on the same rows: speed and agreement with the first dtype."""
    sdpa0 = "pinned" if args.eval_sdpa == "both" else args.eval_sdpa
    head0 = "fp32" if args.eval_head == "both" else args.eval_head
    runs = [(d.strip(), sdpa0, head0) for d in args.dtypes.split(",") if d.strip()]
    if args.eval_sdpa == "both":
        runs += [(d, "auto", head0) for d, _, _ in runs if d == "bfloat16"]
    if args.eval_head == "both":
        runs += [(d, sdpa0, "autocast") for d, sdpa, _ in runs if d == "bfloat16" and sdpa == sdpa0]
    pinned = scoring.CUDA_MASKED_SDPA or [torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION, torch.nn.attention.SDPBackend.MATH]
    results = []
    for dtype, sdpa, head in runs:
        scoring.CUDA_MASKED_SDPA = pinned if sdpa == "pinned" else None
        scoring.HEAD_FP32 = head == "fp32"
        score_groups(model, groups[:8], batch_size=args.batch_size, device=device, dtype=dtype)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        scores = score_groups(model, groups, batch_size=args.batch_size, device=device, dtype=dtype)
        sync(device)
        results.append((f"{dtype}/{sdpa}/head-{head}", len(groups) / (time.perf_counter() - t0), predictions(scores)))
    ref_name, ref_rate, (ref_acc, ref_norm) = results[0]
    fields = []
    for name, rate, (acc, norm) in results:
        same_acc = sum(a == b for a, b in zip(acc, ref_acc)) / len(acc)
        same_norm = sum(a == b for a, b in zip(norm, ref_norm)) / len(norm)
        print(f"{name:>32}: {rate:8.2f} examples/s, {rate / ref_rate:.2f}x {ref_name}; same ending as {ref_name}: "
              f"{same_acc:.2%} (sum), {same_norm:.2%} (per token)", flush=True)
        fields.append(f"{name}={rate:.2f}/s,{rate / ref_rate:.2f}x,same={same_acc:.4f}/{same_norm:.4f}")
    print(f"RESULT_DTYPES model={args.checkpoint or args.model} device={device} rows={len(groups)} " + " ".join(fields), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
