"""Where a training step's device time goes, kernel by kernel, for this project's bench and for the anchor.

    python bench/profile_step.py run --json ours.json -- bench/train_step.py configs/gpt2-124m.yaml \\
        train.nproc_per_node=1 train.compile=false --steps 2 --warmup 1
    python bench/profile_step.py run --json anchor.json -- .anchors/build_nanogpt_step.py --no-compile --steps 2 --warmup 1
    python bench/profile_step.py diff ours.json anchor.json

Why: the side-by-side bench (``bench/train_step.py --anchor``) says *how much* slower or faster a
step is than build-nanogpt's, not *where*. On a GPU that answer needs a profile of both, taken the
same way in the same session, and GPU time is scarce, so this script does the whole job in one
pass per side: ``run`` executes a step script unchanged (``runpy``, its own ``sys.argv``, its own
exit code) under ``torch.profiler`` and saves the time of every device kernel (CUDA) or, with no
GPU, every CPU operator's self time, summed by name; ``diff`` lines two such files up by a coarse
category (matmul, attention, optimizer, copy/cast, other) and by kernel name, largest difference
first. A difference in busy time explains a throughput gap; equal busy time with a gap points at
host-side stalls (syncs, launch overhead) instead.

The profile covers the whole script, warm-up and start-up included, so give both scripts the same
``--steps``/``--warmup`` and keep them small (eager: 1 + 2 steps is enough; profiling a
``torch.compile`` warm-up is slow). The anchor's code is run, never copied.
"""

from __future__ import annotations

import argparse
import json
import re
import runpy
import sys
import time
from pathlib import Path

FORMAT = "profile_step/1"
# first match wins; kernel and operator names as CUDA and PyTorch print them
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("attention", re.compile(r"flash|fmha|attention|cudnn.*(sdpa|mha)|sdpa", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach|_amp_", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|sm\d+_|aten::(mm|bmm|addmm|matmul|linear)\b", re.I)),
    ("loss", re.compile(r"softmax|nll|cross_entropy|gather|scatter", re.I)),
    ("copy/cast", re.compile(r"copy|cast|to_copy|convert|fill|zero", re.I)),
)


def category(name: str) -> str:
    """The coarse bucket a kernel or operator name falls in ("other" when no pattern matches)."""
    return next((cat for cat, pattern in CATEGORIES if pattern.search(name)), "other")


def _event_times(prof, on_device: bool) -> dict[str, list[float]]:
    """name -> [calls, microseconds]: device kernels' time (on_device), else CPU operators' self time.
    With only CUDA activity recorded, the events with device time are the kernels (and memcpy/memset);
    the runtime calls that launch them have none."""
    out: dict[str, list[float]] = {}
    for evt in prof.key_averages():
        if on_device:
            us = float(getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0))
        else:
            us = float(evt.self_cpu_time_total)
        if us > 0:
            calls, total = out.get(evt.key, [0, 0.0])
            out[evt.key] = [calls + int(evt.count), total + us]
    return out


def profile_script(script: str, argv: list[str]) -> tuple[int, dict]:
    """Run ``script`` with ``argv`` under the profiler: its exit code and the profile record."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    on_device = torch.cuda.is_available()
    activities = [ProfilerActivity.CUDA] if on_device else [ProfilerActivity.CPU]
    saved_argv, rc = sys.argv, 0
    sys.argv = [script, *argv]
    t0 = time.perf_counter()
    try:
        with profile(activities=activities) as prof:
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as e:  # the script's own exit code, as if it had run alone
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if on_device:
                torch.cuda.synchronize()
    finally:
        sys.argv = saved_argv
    wall = time.perf_counter() - t0
    device = torch.cuda.get_device_name(0) if on_device else "cpu"
    record = {"format": FORMAT, "script": script, "argv": argv, "device": device, "wall_s": round(wall, 3),
              "measure": "device kernel time" if on_device else "CPU operator self time",
              "by_name": _event_times(prof, on_device)}
    return rc, record


def load_profile(path: str) -> dict:
    """A ``run --json`` file; ValueError naming the file when it is not one."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable as a profile: {e}") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("by_name"), dict):
        raise ValueError(f"{path}: not a {FORMAT} file (write one with `profile_step.py run --json {path} -- SCRIPT ...`)")
    return record


def by_category(by_name: dict[str, list[float]]) -> dict[str, float]:
    """Category -> milliseconds."""
    out: dict[str, float] = {}
    for name, (_, us) in by_name.items():
        out[category(name)] = out.get(category(name), 0.0) + us / 1e3
    return out


def diff_lines(a: dict, b: dict, top: int) -> list[str]:
    """The comparison table of two profiles, ``a`` (ours) against ``b`` (the reference)."""
    lines = [f"A: {a['script']} {' '.join(a['argv'])} ({a['device']}, {a['measure']})",
             f"B: {b['script']} {' '.join(b['argv'])} ({b['device']}, {b['measure']})"]
    if (a["device"], a["measure"]) != (b["device"], b["measure"]):
        lines.append("WARNING: the two profiles come from different devices or measures: they do not compare")
    ca, cb = by_category(a["by_name"]), by_category(b["by_name"])
    lines.append(f"{'category':<12} {'A ms':>10} {'B ms':>10} {'A-B ms':>10}")
    for cat in sorted(set(ca) | set(cb), key=lambda c: -abs(ca.get(c, 0.0) - cb.get(c, 0.0))):
        lines.append(f"{cat:<12} {ca.get(cat, 0.0):>10.1f} {cb.get(cat, 0.0):>10.1f} {ca.get(cat, 0.0) - cb.get(cat, 0.0):>+10.1f}")
    total_a, total_b = sum(ca.values()), sum(cb.values())
    lines.append(f"{'TOTAL':<12} {total_a:>10.1f} {total_b:>10.1f} {total_a - total_b:>+10.1f}   (wall A {a['wall_s']} s, B {b['wall_s']} s)")
    lines.append(f"{'A ms':>9} {'B ms':>9} {'A-B ms':>9} {'A n':>6} {'B n':>6}  name (largest difference first)")
    def us(profile: dict, name: str) -> float:
        return profile["by_name"].get(name, [0, 0.0])[1]

    names = sorted(set(a["by_name"]) | set(b["by_name"]), key=lambda n: (-abs(us(a, n) - us(b, n)), -us(a, n) - us(b, n)))
    for name in names[:top]:
        (na, ua), (nb, ub) = a["by_name"].get(name, [0, 0.0]), b["by_name"].get(name, [0, 0.0])
        lines.append(f"{ua / 1e3:>9.1f} {ub / 1e3:>9.1f} {(ua - ub) / 1e3:>+9.1f} {na:>6} {nb:>6}  {name[:110]}")
    return lines


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a step script under the profiler and save its kernel times")
    run.add_argument("--json", required=True, help="where to write the profile")
    run.add_argument("script", help="the step script (e.g. bench/train_step.py), then its own arguments after --")
    run.add_argument("args", nargs=argparse.REMAINDER)
    diff = sub.add_parser("diff", help="compare two profiles (A: ours, B: the reference)")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--top", type=int, default=30, help="kernel rows to print")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.command == "diff":
        try:
            a, b = load_profile(args.a), load_profile(args.b)
        except ValueError as e:
            print(f"profile_step: error: {e}", file=sys.stderr)
            return 2
        print("\n".join(diff_lines(a, b, args.top)))
        return 0
    if not Path(args.script).is_file():
        print(f"profile_step: error: {args.script}: no such script", file=sys.stderr)
        return 2
    script_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    rc, record = profile_script(args.script, script_args)
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    busy = sum(us for _, us in record["by_name"].values()) / 1e3
    print(f"PROFILE script={args.script} exit={rc} device={record['device']!r} busy_ms={busy:.1f} wall_s={record['wall_s']} json={args.json}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
