"""Does a stopped-and-resumed training run reproduce the uninterrupted one on this device?

    python bench/resume_check.py                       # tiny model, CPU or the GPU if present
    python bench/resume_check.py model.name=gpt2 train.compile=true train.micro_batch_size=8

Runs `pretrain train` twice on a synthetic shard directory: once straight through, once stopped
with SIGTERM half-way (the trainer checkpoints and exits with 3) and started again. Prints the
steps whose losses differ, bit for bit. On CPU the tests assert equality; this script is how to
check a GPU setup (bf16, torch.compile, NCCL), where it needs no dataset, Ray or MLflow.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.rundir import RunDir  # noqa: E402
from dataprep.shards import write_shard  # noqa: E402

CONFIG = """\
run_dir: {run_dir}
data: {{output_dir: {data}}}
model: {{name: tiny}}
train: {{nproc_per_node: 1, micro_batch_size: 8, seq_len: 128, batch_tokens: 2048, max_steps: {steps},
        warmup_steps: 5, val_every: 10, val_batches: 2, sample_every: 20, sample_tokens: 8, ckpt_every: 5, keep_last: 2}}
tracking: {{uri: none}}
"""


def make_data(path: Path, tokens: int = 400_000) -> None:
    rng = np.random.default_rng(0)
    phrases = [rng.integers(0, 50000, size=rng.integers(3, 12)) for _ in range(300)]
    seq = np.concatenate([phrases[i] for i in rng.integers(0, len(phrases), size=tokens // 7)])[:tokens].astype(np.uint16)
    seq[::500] = 50256
    shards = []
    for name, split, part in (("val_000000.bin", "val", seq[:20_000]), ("train_000000.bin", "train", seq[20_000:])):
        n, sha = write_shard(path / name, [part])
        shards.append({"path": name, "split": split, "tokens": n, "docs": int((part == 50256).sum()), "sha256": sha})
    (path / "manifest.json").write_text(json.dumps({"format": "pretrain-token-shards", "format_version": 1,
                                                    "tokenizer": {"name": "gpt2", "eot_token": 50256}, "shards": shards}))


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, RunDir(run_dir).metrics.read_text().splitlines()) if "loss" in r and "step" in r}


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("overrides", nargs="*", help="section.key=value for the run config")
    args = ap.parse_args()
    overrides, steps = args.overrides, args.steps
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "data").mkdir()
        make_data(tmp / "data")
        runs = {}
        for name in ("straight", "resumed"):
            cfg = tmp / f"{name}.yaml"
            cfg.write_text(CONFIG.format(run_dir=tmp / name, data=tmp / "data", steps=steps))
            runs[name] = (cfg, tmp / name)
        cmd = lambda cfg: [sys.executable, "-m", "pipelines.cli", "train", str(cfg), *overrides]  # noqa: E731
        t0 = time.time()
        r = subprocess.run(cmd(runs["straight"][0]), capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-4000:])
            return 1
        print(f"straight run: {time.time() - t0:.1f}s", flush=True)
        cfg, run_dir = runs["resumed"]
        proc = subprocess.Popen(cmd(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while not RunDir(run_dir).metrics.exists() or len(losses(run_dir)) < steps // 2:
            if proc.poll() is not None:
                print(proc.stderr.read()[-4000:])
                return 1
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait()
        stopped_at = max(losses(run_dir))
        r = subprocess.run(cmd(cfg), capture_output=True, text=True)
        a, b = losses(runs["straight"][1]), losses(run_dir)
        differ = [s for s in a if a[s] != b.get(s)]
        worst = max((abs(a[s] - b[s]) for s in differ if s in b), default=0.0)
        print(f"RESULT stop exit={rc} (3 = checkpointed) at step {stopped_at}; resume exit={r.returncode}; "
              f"steps {len(a)} vs {len(b)}; bitwise-different losses: {len(differ)} (first {differ[:3]}, max |diff| {worst:.3g})")
        return 0 if rc == 3 and r.returncode == 0 and not differ else 1


if __name__ == "__main__":
    sys.exit(main())
