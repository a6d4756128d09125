"""Benchmark one optimizer step of the trainer on this device with synthetic tokens.

    python bench/train_step.py configs/gpt2-124m.yaml --steps 20 --warmup 5
    python bench/train_step.py configs/gpt2-124m.yaml train.compile=false train.dtype=float32
    python bench/train_step.py configs/smoke.yaml model.name=tiny --steps 5 --warmup 1   # CPU, seconds

It times the trainer's own step, :class:`trainer.step.TrainStep` (the code ``trainer.train``
runs: the learning-rate schedule, gradient accumulation of ``batch_tokens / (micro_batch_size *
seq_len)`` micro-steps, global-norm clipping, the non-finite check, the AdamW update), on the
model and optimizer built as the trainer builds them (``trainer.step.build_model``, same presets,
parameter groups, fused AdamW on CUDA, ``trainer.precision``'s dtype and TF32 choice, optional
torch.compile), but feeds random tokens, so no dataset, tokenizer, Ray or MLflow is needed: a
bare GPU machine with the package's dependencies is enough. The config loads through
``pipelines.config.load_config``, as with ``pretrain``. One process, one device, no process
group; multiply by the GPU count for a DDP estimate (DDP overlaps its all-reduce with the
backward pass).

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
import itertools
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipelines.config import ConfigError, PipelineConfig, load_config  # noqa: E402
from trainer import precision  # noqa: E402
from trainer.determinism import make_deterministic  # noqa: E402
from trainer.dist import DistEnv  # noqa: E402
from trainer.model import GPT, resolve_config  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.step import TrainStep, build_model, wrap_model  # noqa: E402
from trainer.train import RefusedError, grad_accum_steps, peak_flops  # noqa: E402


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="run config (e.g. configs/gpt2-124m.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value (e.g. train.compile=false model.name=tiny)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator, autotuning)")
    p.add_argument("--anchor", default="", help="path of build_nanogpt_step.py: run it side by side and print ratios")
    p.add_argument("--compile-settings", default="", help="with --anchor: comma-separated on/off (default: the config's train.compile)")
    return p.parse_args(argv)


def bench_device(device_setting: str) -> torch.device:
    """``train.device`` for one process: auto = the first GPU if there is one."""
    use_cuda = torch.cuda.is_available() if device_setting == "auto" else device_setting == "cuda"
    return torch.device("cuda", 0) if use_cuda else torch.device("cpu")


@dataclass
class Bench:
    """The trainer's step on synthetic batches, ready to time."""

    cfg: PipelineConfig
    model: GPT
    step: TrainStep
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    device: torch.device

    @classmethod
    def build(cls, config: str, overrides: list[str]) -> Bench:
        """Raises ConfigError, RefusedError or ValueError for what the trainer would refuse."""
        cfg = load_config(config, overrides)
        gpt_cfg, tc = resolve_config(cfg.model), cfg.train
        accum = grad_accum_steps(tc.batch_tokens, tc.micro_batch_size, tc.seq_len, 1)
        if tc.seq_len > gpt_cfg.block_size:
            raise ValueError(f"train.seq_len {tc.seq_len} > block_size {gpt_cfg.block_size}")
        device = bench_device(tc.device)
        env = DistEnv(0, 0, 1, device, None)
        precision.configure_matmul(device)
        if tc.deterministic:  # as the trainer does: its cost is part of what is timed
            make_deterministic()
        torch.manual_seed(tc.seed)
        model = build_model(gpt_cfg, tc, device)
        optimizer = build_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps, device.type)
        _, forward = wrap_model(model, tc, env)
        step = TrainStep(model, forward, optimizer, tc, env, accum)
        gen = torch.Generator(device=device).manual_seed(tc.seed)
        B, T = tc.micro_batch_size, tc.seq_len
        bufs = [torch.randint(0, 50257, (B, T + 1), device=device, generator=gen) for _ in range(min(accum, 4))]
        batches = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in bufs]
        return cls(cfg, model, step, batches, device)

    def run(self, warmup: int, steps: int) -> tuple[list[float], float]:
        """``warmup`` untimed steps, then the seconds of each of ``steps`` steps and the last loss.
        Each step ends with ``.item()`` on its loss, which waits for the device."""
        cycle = itertools.cycle(self.batches)
        index = itertools.count()
        t0 = time.time()
        for _ in range(warmup):
            self.step(next(index), lambda: next(cycle))
        print(f"bench: {warmup} warmup steps in {time.time() - t0:.1f}s", flush=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        times, loss = [], float("nan")
        for _ in range(steps):
            t = time.perf_counter()
            loss = self.step(next(index), lambda: next(cycle)).loss
            times.append(time.perf_counter() - t)
        return times, loss

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"

    def result_line(self, times: list[float], loss: float) -> str:
        """The ``RESULT`` line (median step time, tokens/s, MFU on known GPUs, peak memory on CUDA)."""
        tc, dtype = self.cfg.train, self.step.dtype
        step_s = statistics.median(times)
        tok_s = tc.batch_tokens / step_s
        peak = peak_flops(tc.peak_flops, self.device, dtype == torch.bfloat16)
        mfu = f"{self.model.flops_per_token(tc.seq_len) * tok_s / peak * 100:.1f}%" if peak else "n/a"
        mem = f" peak_mem={torch.cuda.max_memory_allocated(self.device) / 2**30:.1f}GiB" if self.device.type == "cuda" else ""
        return (
            f"RESULT device={self.device_name()!r} model={self.cfg.model.name} params={self.model.num_params() / 1e6:.1f}M "
            f"B={tc.micro_batch_size} T={tc.seq_len} accum={self.step.grad_accum} dtype={precision.short_name(dtype)} "
            f"compile={'on' if tc.compile else 'off'} loss_chunk={tc.loss_chunk_tokens} loss_kernel={tc.loss_kernel} sdpa={tc.sdpa_backend} fp8={'on' if tc.fp8 else 'off'} "
            f"deterministic={'on' if tc.deterministic else 'off'} "
            f"step_s={step_s:.4f} (mean {statistics.mean(times):.4f}, min {min(times):.4f}) tok_s={tok_s:,.0f} mfu={mfu}{mem} loss={loss:.4f}"
        )


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.anchor:
        return side_by_side(args)
    try:
        bench = Bench.build(args.config, args.overrides)
    except (ConfigError, RefusedError, ValueError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    tc = bench.cfg.train
    print(f"bench: {bench.device_name()}; {bench.model.summary()}; B={tc.micro_batch_size} T={tc.seq_len} "
          f"grad_accum={bench.step.grad_accum} ({tc.batch_tokens:,} tokens/step) "
          f"dtype={str(bench.step.dtype).removeprefix('torch.')} compile={tc.compile}", flush=True)
    times, loss = bench.run(args.warmup, args.steps)
    print(bench.result_line(times, loss), flush=True)
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
    device = bench_device(tc.device)
    if precision.compute_dtype(tc.dtype, device) != precision.compute_dtype("auto", device):
        print(f"bench: error: the anchor trains in {precision.short_name(precision.compute_dtype('auto', device))} here; "
              f"train.dtype={tc.dtype} would not compare like with like", file=sys.stderr)
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
