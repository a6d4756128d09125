"""Shared helpers of the trainer tests: tiny run configs and shard directories, run commands, process control."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from dataprep.shards import write_shard

EOT = 50256
REPO = Path(__file__).resolve().parents[1]

# The train section every tiny CPU run starts from; a test module passes only what it changes.
MICRO_TRAIN = {
    "nproc_per_node": 2,  # two gloo ranks
    "device": "cpu",
    "micro_batch_size": 2,
    "seq_len": 32,
    "batch_tokens": 256,  # 2 ranks x 2 x 32 x grad_accum 2
    "max_steps": 16,
    "warmup_steps": 3,
    "lr": 3.0e-3,
    "min_lr": 3.0e-4,
    "val_every": 0,
    "sample_every": 0,
    "ckpt_every": 4,
    "keep_last": 3,
}


def micro_config(run_dir: Path | str, data_dir: Path | str, *, train: dict | None = None, model: dict | None = None,
                 tracking_uri: str = "none", extra: dict | None = None) -> str:
    """YAML text of a tiny CPU training run: the "micro" model on 2 gloo ranks with MICRO_TRAIN's schedule.

    ``train`` and ``model`` override or add keys of those sections; ``extra`` adds top-level sections,
    its keys merged into a section that is already there (``{"tracking": {"experiment": ...}}``)."""
    cfg = {
        "run_dir": str(run_dir),
        "data": {"output_dir": str(data_dir)},
        "model": {"name": "micro", **(model or {})},
        "train": {**MICRO_TRAIN, **(train or {})},
        "tracking": {"uri": tracking_uri},
    }
    for section, values in (extra or {}).items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return yaml.safe_dump(cfg, sort_keys=False)


def make_shard_dir(path: Path, seed: int = 0, train_shards: int = 3, shard_tokens: int = 6000, val_tokens: int = 3000) -> Path:
    """A committed shard dir of learnable token streams: documents made of a few repeated "phrases"."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(0, 2000, size=rng.integers(3, 9)) for _ in range(40)]

    def stream(n: int) -> tuple[list[np.ndarray], int]:
        pieces, total, docs = [], 0, 0
        while total < n:
            doc = [np.array([EOT])] + [phrases[i] for i in rng.integers(0, len(phrases), size=rng.integers(5, 30))]
            doc_arr = np.concatenate(doc)[: n - total]
            pieces.append(doc_arr.astype(np.uint16))
            total += len(doc_arr)
            docs += 1
        return pieces, docs

    shards = []
    for i in range(train_shards):
        pieces, docs = stream(shard_tokens + 37 * i)  # unequal sizes: exercise the tail skipping
        name = f"train_{i:06d}.bin"
        n, sha = write_shard(path / name, pieces)
        shards.append({"path": name, "split": "train", "tokens": n, "docs": docs, "sha256": sha})
    pieces, docs = stream(val_tokens)
    n, sha = write_shard(path / "val_000000.bin", pieces)
    shards.append({"path": "val_000000.bin", "split": "val", "tokens": n, "docs": docs, "sha256": sha})
    manifest = {
        "format": "pretrain-token-shards",
        "format_version": 1,
        "tokenizer": {"name": "gpt2", "eot_token": EOT},
        "shards": shards,
        "note": f"synthetic test data, seed {seed}",
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return path


def pretrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from pipelines.cli import main; sys.exit(main())", *args]


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a command in its own session (so the test can signal or kill its whole group)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    f = open(log, "ab")
    return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)


def dead_pid() -> int:
    """The PID of a process that has just ended (reaped): nothing runs under it."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (a zombie has ended)."""
    out = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(pid)
        except OSError:
            pass
    return out


def descendants(pid: int) -> list[int]:
    from trainer.launch import child_pids

    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = child_pids(p)
        out.extend(kids)
        todo.extend(kids)
    return out


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """torch distributed rank -> pid of the launcher's worker processes (read from their RANK= environment)."""
    out = {}
    for pid in descendants(launcher.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = pid
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and everything under it (torchrun starts workers in sessions of their own)."""
    pids = [proc.pid] + descendants(proc.pid)
    for pid in pids:
        for fn in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                fn()
            except (ProcessLookupError, PermissionError):
                pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def metric_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while metric_steps(run_dir) < step:
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before step {step}")
        if time.time() > deadline:
            raise AssertionError(f"step {step} not reached in {timeout}s")
        time.sleep(0.05)


def listening_sockets(pids: list[int]) -> list[tuple[int, str, int]]:
    """``(pid, address, port)`` of every listening TCP socket (v4 and v6) the processes hold, read
    from /proc/<pid>/fd and /proc/net/tcp{,6} (what ``ss -ltnp`` shows for them)."""
    import ipaddress
    import struct

    listening: dict[str, tuple[str, int]] = {}  # socket inode -> (address, port)
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] != "0A":  # TCP_LISTEN
                continue
            hex_addr, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_addr)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(struct.pack("<I", struct.unpack(">I", raw[i:i + 4])[0]) for i in range(0, width, 4))
            listening[cols[9]] = (str(ipaddress.ip_address(raw)), int(hex_port, 16))
    out = []
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in listening:
                out.append((pid, *listening[target[8:-1]]))
    return out


def train(config: Path, log: Path, *args: str, env: dict | None = None, timeout: float = 240) -> int:
    """`pretrain train CONFIG ARGS...` to its end (output appended to `log`); its exit code."""
    proc = start(pretrain_cmd("train", str(config), *args), log, env)
    try:
        return proc.wait(timeout=timeout)
    finally:
        kill_tree(proc)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of metrics.jsonl, asserting that each step is there once, in order."""
    from trainer.metrics import read_metrics

    recs = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), f"metrics.jsonl must hold each step once, in order: {steps}"
    return {r["step"]: r["loss"] for r in recs}
