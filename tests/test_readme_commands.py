"""The README's commands, run as a newcomer would: the smoke workflow, the tokenizer fetch and
the benchmark scripts (at toy sizes: the figures themselves belong to the benchmarks, not here)."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_readme_and_ci_run_the_same_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    test_cmd = next(line for line in ci.splitlines() if "pytest" in line)
    assert test_cmd in readme


def test_tokenizer_fetch_command(gpt2_ranks):
    r = run("-m", "pipelines.cli", "tokenizer", "fetch")
    assert r.returncode == 0 and "sha256 306cd27f" in r.stdout, r.stderr


@pytest.mark.slow
def test_smoke_workflow_runs_end_to_end(tmp_path, gpt2_ranks):
    """The README's main job: `pretrain run configs/smoke.yaml`, in a scratch run dir."""
    r = run("-m", "pipelines.cli", "run", "configs/smoke.yaml", f"run_dir={tmp_path}/smoke", f"data.output_dir={tmp_path}/data",
            f"data.cache_dir={tmp_path}/cache", timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "workflow: all stages done" in r.stdout and "mlflow ui --backend-store-uri sqlite:///" in r.stdout
    status = run("-m", "pipelines.cli", "status", f"{tmp_path}/smoke").stdout
    assert len(re.findall(r"step_\d{8} \(step \d+\)  hellaswag: acc", status)) == 3, status
    assert (tmp_path / "smoke" / "report.png").exists()


@pytest.mark.slow
def test_benchmark_scripts_run(gpt2_ranks):
    # Independent scripts (own temp dirs, own Ray instance): two at a time, since each one spends much of
    # its time starting Python, importing torch/Ray and waiting on a single worker. Alone here:
    # resume_check 46 s, dataprep 17 s, the other four 5-9 s each.
    commands = {  # the longest (three training runs) first, so the two threads end together
        "resume_check": ("bench/resume_check.py", "--steps", "10", "train.device=cpu", "model.name=micro", "train.seq_len=32"),
        "dataprep": ("bench/dataprep.py", "--mb", "0.5", "--workers", "1", "--tokenizer-file", gpt2_ranks),
        "signatures": ("bench/dataprep.py", "--signatures", "--mb", "0.3", "--workers", "1", "--rounds", "1", "--tokenizer-file", gpt2_ranks),
        "tokenize_memory": ("bench/tokenize_memory.py", "--docs", "200", "--tokenizer-file", gpt2_ranks),
        "train_step": ("bench/train_step.py", "configs/smoke.yaml", "--steps", "1", "--warmup", "0"),
        "hellaswag": ("bench/hellaswag.py", "--model", "micro", "--rows", "8", "--device", "cpu", "--data", "synthetic"),
        # the Triton kernel under its CPU interpreter (TRITON_INTERPRET=1: tests/conftest.py)
        "loss_kernel": ("bench/loss_kernel.py", "--rows", "256", "--vocab", "1000", "--dim", "32", "--chunk", "96", "--iters", "2",
                        "--device", "cpu"),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, *args) for name, args in commands.items()}
        res = {name: f.result() for name, f in futures.items()}
    r = res["dataprep"]
    assert r.returncode == 0 and "ratio stage/raw" in r.stdout, r.stderr[-2000:]
    r = res["signatures"]
    assert r.returncode == 0 and "files identical: True" in r.stdout, r.stdout + r.stderr[-2000:]
    r = res["tokenize_memory"]
    assert r.returncode == 0 and "token files identical: True" in r.stdout, r.stdout + r.stderr[-2000:]
    r = res["train_step"]
    assert r.returncode == 0 and r.stdout.count("RESULT") == 1, r.stderr[-2000:]
    r = res["hellaswag"]
    assert r.returncode == 0 and "same_predictions=True" in r.stdout, r.stdout + r.stderr[-2000:]
    r = res["loss_kernel"]
    assert r.returncode == 0 and r.stdout.count("RESULT way=") == 3 and "kernel_over_chunked=" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "GRADS kernel_vs_chunked hidden_equal=" in r.stdout, r.stdout
    r = res["resume_check"]
    assert r.returncode == 0 and "bitwise-different losses: 0" in r.stdout, r.stdout + r.stderr[-2000:]


def test_readme_sbatch_route_for_gpt2_124m(tmp_path):
    script = tmp_path / "train.sbatch"
    r = run("-m", "pipelines.cli", "sbatch", "configs/gpt2-124m.yaml", "slurm.partition=gpu", "-o", str(script),
            f"run_dir={tmp_path}/gpt2-124m")
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=8", "#SBATCH --requeue", "#SBATCH --signal=B:USR2@120"):
        assert line in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
