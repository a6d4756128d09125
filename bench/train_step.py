"""Benchmark one optimizer step of the trainer on this device with synthetic tokens.

    python bench/train_step.py configs/gpt2-124m.yaml --steps 20 --warmup 5
    python bench/train_step.py configs/gpt2-124m.yaml train.compile=false train.dtype=float32
    python bench/train_step.py configs/smoke.yaml model.name=tiny --steps 5 --warmup 1   # CPU, seconds

It builds the model, AdamW and the step exactly as the trainer configures them (same presets,
parameter groups, fused AdamW on CUDA, bf16 autocast, TF32, optional torch.compile, gradient
accumulation of ``batch_tokens / (micro_batch_size * seq_len)`` micro-steps, global-norm
clipping), but feeds random tokens, so no dataset, tokenizer, Ray or MLflow is needed: a bare
GPU machine with torch and numpy is enough (PyYAML is used when present; a minimal reader for
our flat config files is used otherwise). One process, one device; multiply by the GPU count
for a DDP estimate (DDP overlaps its all-reduce with the backward pass).

Prints one line starting with ``RESULT`` (time per optimizer step, tokens/s, MFU on GPUs).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _install_minimal_yaml() -> None:
    """A stand-in for PyYAML good enough for configs/*.yaml (mappings, scalars, [a, b] lists)."""
    import json

    class YAMLError(ValueError):
        pass

    def scalar(text: str):
        text = text.strip()
        if text == "" or text in ("~", "null"):
            return None
        if text[0] in "'\"" and text[-1] == text[0]:
            return text[1:-1]
        if text.startswith("[") and text.endswith("]"):
            return [scalar(t) for t in text[1:-1].split(",") if t.strip()]
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        for cast in (int, float):
            try:
                return cast(text.replace("_", ""))
            except ValueError:
                pass
        return text

    def strip_comment(line: str) -> str:
        quote = None
        for i, ch in enumerate(line):
            if ch in "'\"":
                quote = None if quote == ch else (quote or ch)
            elif ch == "#" and quote is None and (i == 0 or line[i - 1] in " \t"):
                return line[:i]
        return line

    def safe_load(text: str):
        root: dict = {}
        stack = [(-1, root)]
        for raw in text.splitlines():
            line = strip_comment(raw).rstrip()
            if not line.strip():
                continue
            indent = len(line) - len(line.lstrip())
            key, sep, value = line.strip().partition(":")
            if not sep:
                raise YAMLError(f"unsupported YAML line: {raw!r}")
            while stack[-1][0] >= indent:
                stack.pop()
            parent = stack[-1][1]
            if value.strip() == "":
                parent[key.strip()] = {}
                stack.append((indent, parent[key.strip()]))
            else:
                parent[key.strip()] = scalar(value)
        return root

    mod = types.ModuleType("yaml")
    mod.YAMLError = YAMLError  # type: ignore[attr-defined]
    mod.safe_load = safe_load  # type: ignore[attr-defined]
    mod.safe_dump = lambda obj, sort_keys=False: json.dumps(obj, indent=2, sort_keys=sort_keys)  # type: ignore[attr-defined]
    sys.modules["yaml"] = mod


try:
    import yaml  # noqa: F401
except ImportError:
    _install_minimal_yaml()

import torch  # noqa: E402

from pipelines.config import ConfigError, load_config  # noqa: E402
from trainer.model import GPT, resolve_config  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.train import RefusedError, grad_accum_steps, peak_flops  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="run config (e.g. configs/gpt2-124m.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value (e.g. train.compile=false model.name=tiny)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator, autotuning)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        gpt_cfg = resolve_config(cfg.model)
        tc = cfg.train
        accum = grad_accum_steps(tc.batch_tokens, tc.micro_batch_size, tc.seq_len, 1)
    except (ConfigError, RefusedError, ValueError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    if tc.seq_len > gpt_cfg.block_size:
        print(f"bench: error: train.seq_len {tc.seq_len} > block_size {gpt_cfg.block_size}", file=sys.stderr)
        return 2

    use_cuda = torch.cuda.is_available() if tc.device == "auto" else tc.device == "cuda"
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    bf16 = tc.dtype == "bfloat16" or (tc.dtype == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(tc.seed)

    model = GPT(gpt_cfg).to(device)
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps, device.type)
    fwd = torch.compile(model) if tc.compile else model
    B, T = tc.micro_batch_size, tc.seq_len
    gen = torch.Generator(device=device).manual_seed(tc.seed)
    bufs = [torch.randint(0, 50257, (B, T + 1), device=device, generator=gen) for _ in range(min(accum, 4))]
    batches = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in bufs]
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for i in range(accum):
            x, y = batches[i % len(batches)]
            with autocast():
                _, loss = fwd(x, y)
            loss = loss / accum
            total += loss.detach()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        optimizer.step()
        return total.item()  # syncs the device

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"bench: {name}; {model.summary()}; B={B} T={T} grad_accum={accum} ({tc.batch_tokens:,} tokens/step) "
          f"dtype={'bfloat16' if bf16 else 'float32'} compile={tc.compile}", flush=True)
    t0 = time.time()
    for _ in range(args.warmup):
        step()
    print(f"bench: {args.warmup} warmup steps in {time.time() - t0:.1f}s", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = [], float("nan")
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tok_s = tc.batch_tokens / step_s
    peak = peak_flops(tc.peak_flops, device, bf16)
    mfu = f"{model.flops_per_token(T) * tok_s / peak * 100:.1f}%" if peak else "n/a"
    mem = f" peak_mem={torch.cuda.max_memory_allocated(device) / 2**30:.1f}GiB" if device.type == "cuda" else ""
    print(
        f"RESULT device={name!r} model={cfg.model.name} params={model.num_params() / 1e6:.1f}M B={B} T={T} accum={accum} "
        f"dtype={'bf16' if bf16 else 'fp32'} compile={'on' if tc.compile else 'off'} "
        f"step_s={step_s:.4f} (mean {statistics.mean(times):.4f}, min {min(times):.4f}) tok_s={tok_s:,.0f} mfu={mfu}{mem} loss={loss:.4f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
