"""A new user's path with the real recipe (configs/gpt2-124m.yaml) on the machine they start from:
what would cost them hours (a data stage before a training that can never start here, a crash read
as "retry") or mislead them (advice that changes the recipe) is refused or said up front."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.config import ConfigError, check_geometry, load_config

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "configs" / "gpt2-124m.yaml"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_the_gpu_recipe_on_a_machine_without_gpu_is_refused_before_the_data_stage(tmp_path):
    # before: `train.device: auto` read as CPU, so `pretrain run` went to the data stage first (download
    # and tokenize ~10B tokens), then trained 124M on 8 CPU ranks; here offline, the data stage's exit 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(REAL), f"run_dir={tmp_path}/run",
                        f"data.output_dir={tmp_path}/data", f"data.cache_dir={tmp_path}/cache"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "train.device is cuda but this machine has no CUDA device" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists() and not (tmp_path / "cache").exists()


def test_device_problem_names_what_to_change():
    from trainer.launch import device_problem

    assert device_problem("cpu", 8, 0) is None and device_problem("auto", 8, 0) is None  # auto without GPU: CPU
    assert device_problem("cuda", 8, 8) is None and device_problem("auto", 4, 8) is None
    assert "no CUDA device" in device_problem("cuda", 1, 0)
    for device in ("cuda", "auto"):
        assert "set train.nproc_per_node=4" in device_problem(device, 8, 4)


def test_more_ranks_than_gpus_is_a_refusal_not_a_crash(monkeypatch):
    # before: torch.cuda.set_device(local_rank) failed ("invalid device ordinal"), exit 1: "rerun to resume"
    from trainer import dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device reached"))
    for key, value in (("RANK", "3"), ("LOCAL_RANK", "3"), ("WORLD_SIZE", "4")):
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=r"local rank 3 has no GPU: .* 2 visible CUDA device\(s\)"):
        dist.init_distributed("cuda")


def test_the_real_config_asks_for_gpus():
    assert load_config(REAL).train.device == "cuda"


def test_a_batch_that_does_not_split_suggests_the_micro_batch_that_keeps_the_recipe():
    # 2 nodes x 8 GPUs: 524288 tokens is half a micro-batch per rank. The old advice, batch_tokens
    # 1048576 with max_steps unchanged, trained 20B tokens (2 epochs of sample-10BT) on another recipe.
    two_nodes = ["slurm.nodes=2", "slurm.gpus_per_node=8"]
    with pytest.raises(ConfigError, match=r"keep the batch \(and the recipe\) with train.micro_batch_size=32"):
        check_geometry(load_config(REAL, two_nodes), on_slurm=True)
    check_geometry(load_config(REAL, [*two_nodes, "train.micro_batch_size=32"]), on_slurm=True)  # the advice works
    for nodes, gpus in ((1, 1), (1, 2), (1, 4), (1, 8), (4, 8)):
        cfg = load_config(REAL, [f"slurm.nodes={nodes}", f"slurm.gpus_per_node={gpus}", "train.micro_batch_size=16"])
        check_geometry(cfg, on_slurm=True)
    with pytest.raises(ConfigError) as e:  # 3 ranks never split 2**19 tokens: no micro-batch to suggest
        check_geometry(load_config(REAL, ["slurm.gpus_per_node=3"]), on_slurm=True)
    assert "keep the batch" not in str(e.value)


def test_an_sbatch_script_written_before_its_data_says_the_job_would_be_refused(tmp_path):
    """`pretrain sbatch` before `pretrain data` finished: the script is still written (it may be
    submitted behind the data job), but the user learns now, not after the job waited in the queue
    for 8 GPUs and then exited 2 in seconds, and how to chain it."""
    script = tmp_path / "train.sbatch"
    args = [sys.executable, "-m", "pipelines.cli", "sbatch", str(REAL), f"run_dir={tmp_path}/run",
            f"data.output_dir={tmp_path}/data", "-o", str(script)]
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and script.is_file(), r.stderr
    assert "warning: data.output_dir" in r.stderr and "--dependency=afterok:" in r.stderr, r.stderr

    from tests.trainer_helpers import make_shard_dir

    make_shard_dir(tmp_path / "data")
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
