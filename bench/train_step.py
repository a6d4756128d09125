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

Side by side with build-nanogpt (``--anchor PATH`` to ``build_nanogpt_step.py``, see
``../shared/anchors/README.md``; a GPU machine gets it in the ignored folder ``.anchors/``):

    python bench/train_step.py configs/gpt2-124m.yaml --anchor .anchors/build_nanogpt_step.py --compile-settings on,off

runs, for each compile setting, this benchmark and then the anchor with the same B, T, tokens
per step, model shape, step counts and seed, each in a fresh process (so peak memory is each
one's own), and prints one ``RATIO`` line per setting: project tokens/s over the anchor's (> 1:
faster) and peak memory over the anchor's (< 1: less). Throughput comparisons count only when
made like this, in one run on one machine. The anchor always trains in bf16 on CUDA and fp32 on
CPU; a config whose dtype differs from that is refused in this mode.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import subprocess
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
from trainer.model import GPT, resolve_config, sdpa_backend_problem  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.train import RefusedError, grad_accum_steps, peak_flops  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="run config (e.g. configs/gpt2-124m.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value (e.g. train.compile=false model.name=tiny)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator, autotuning)")
    p.add_argument("--anchor", default="", help="path of build_nanogpt_step.py: run it side by side and print ratios")
    p.add_argument("--compile-settings", default="", help="with --anchor: comma-separated on/off (default: the config's train.compile)")
    args = p.parse_args(argv)
    if args.anchor:
        return side_by_side(args)
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

    problem = sdpa_backend_problem(tc.sdpa_backend, device.type)
    if problem:
        print(f"bench: error: {problem}", file=sys.stderr)
        return 2
    model = GPT(gpt_cfg).to(device)
    model.set_runtime(loss_chunk_tokens=tc.loss_chunk_tokens, sdpa_backend=tc.sdpa_backend)
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps, device.type)
    fwd = torch.compile(model, mode=tc.compile_mode, fullgraph=tc.compile_fullgraph) if tc.compile else model
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
        f"dtype={'bf16' if bf16 else 'fp32'} compile={'on' if tc.compile else 'off'} loss_chunk={tc.loss_chunk_tokens} "
        f"sdpa={tc.sdpa_backend} "
        f"step_s={step_s:.4f} (mean {statistics.mean(times):.4f}, min {min(times):.4f}) tok_s={tok_s:,.0f} mfu={mfu}{mem} loss={loss:.4f}",
        flush=True,
    )
    return 0


# ------------------------------------------------------------------ side by side with build-nanogpt

_FIELD = re.compile(r"(\w+)=('[^']*'|\S+)")


def parse_result(output: str) -> dict[str, str] | None:
    """The ``key=value`` fields of the last ``RESULT`` line of a benchmark's output (None if none)."""
    lines = [ln for ln in output.splitlines() if ln.startswith("RESULT")]
    return dict(_FIELD.findall(lines[-1])) if lines else None


def _number(text: str | None) -> float | None:
    """``'512,425'`` -> 512425.0, ``'41.2GiB'`` -> 41.2, ``'44.3%'`` -> 44.3; None when absent."""
    if not text:
        return None
    m = re.match(r"[-\d.,]+", text)
    return float(m.group(0).replace(",", "")) if m else None


def _run(cmd: list[str]) -> tuple[int, str]:
    print("bench: $ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout.splitlines():
        print("  " + line, flush=True)
    return proc.returncode, proc.stdout


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a is not None and b else "n/a"


def side_by_side(args: argparse.Namespace) -> int:
    """Project bench and anchor, alternating, one fresh process each, per compile setting."""
    anchor = Path(args.anchor)
    if not anchor.is_file():
        print(f"bench: error: --anchor {anchor}: no such file", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        g = resolve_config(cfg.model)
        tc = cfg.train
        grad_accum_steps(tc.batch_tokens, tc.micro_batch_size, tc.seq_len, 1)
        settings = [s.strip() for s in (args.compile_settings or ("on" if tc.compile else "off")).split(",") if s.strip()]
        bad = [s for s in settings if s not in ("on", "off")]
        if bad or not settings:
            raise ValueError(f"--compile-settings takes on/off values, got {args.compile_settings!r}")
    except (ConfigError, RefusedError, ValueError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    use_cuda = torch.cuda.is_available() if tc.device == "auto" else tc.device == "cuda"
    bf16 = tc.dtype == "bfloat16" or (tc.dtype == "auto" and use_cuda)
    if bf16 != use_cuda:
        print(f"bench: error: the anchor trains in {'bf16' if use_cuda else 'fp32'} here; train.dtype={tc.dtype} "
              "would not compare like with like", file=sys.stderr)
        return 2
    status = 0
    for setting in settings:
        on = setting == "on"
        project_cmd = [sys.executable, str(Path(__file__).resolve()), args.config, *args.overrides,
                       f"train.compile={'true' if on else 'false'}", "--steps", str(args.steps), "--warmup", str(args.warmup)]
        anchor_cmd = [sys.executable, str(anchor), "--batch", str(tc.micro_batch_size), "--seq", str(tc.seq_len),
                      "--batch-tokens", str(tc.batch_tokens), "--compile" if on else "--no-compile",
                      "--steps", str(args.steps), "--warmup", str(args.warmup), "--n-layer", str(g.n_layer),
                      "--n-head", str(g.n_head), "--n-embd", str(g.n_embd), "--seed", str(tc.seed)]
        results = []
        for name, cmd in (("project", project_cmd), ("anchor", anchor_cmd)):
            rc, out = _run(cmd)
            res = parse_result(out)
            if rc != 0 or res is None:
                print(f"bench: {name} run (compile {setting}) failed with exit {rc}", file=sys.stderr, flush=True)
                status = 1
            results.append(res or {})
        mine, ref = results
        tok, ref_tok = _number(mine.get("tok_s")), _number(ref.get("tok_s"))
        mem, ref_mem = _number(mine.get("peak_mem")), _number(ref.get("peak_mem"))
        print(f"RATIO compile={setting} project_tok_s={mine.get('tok_s', 'n/a')} anchor_tok_s={ref.get('tok_s', 'n/a')} "
              f"tok_s_ratio={_ratio(tok, ref_tok)} project_mfu={mine.get('mfu', 'n/a')} anchor_mfu={ref.get('mfu', 'n/a')} "
              f"project_mem={mine.get('peak_mem', 'n/a')} anchor_mem={ref.get('peak_mem', 'n/a')} mem_ratio={_ratio(mem, ref_mem)}",
              flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
