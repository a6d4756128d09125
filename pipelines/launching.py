"""`pretrain submit`, `pretrain sbatch`, `pretrain jobs`: the training job on SLURM (or locally
through submitit), built from a run config. This is where ML meets `slurm/`: it knows that the
job is `pretrain train` and that its exit code 3 means "checkpointed, requeue me"."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from dataprep.shards import ShardError, TokenDataset
from pipelines.config import ConfigError, PipelineConfig
from slurm.jobs import job_state
from slurm.sbatch import render_sbatch
from slurm.submit import recorded_jobs, submit_command
from trainer import EXIT_REQUEUE


def slurm_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / "slurm"


def train_argv(config_path: str, overrides: list[str], cfg: PipelineConfig) -> list[str]:
    """`pretrain train` as every node runs it, with rendezvous placeholders for slurm/ to fill."""
    extra = list(overrides)
    if cfg.slurm.gpus_per_node and cfg.train.nproc_per_node != cfg.slurm.gpus_per_node:
        extra.append(f"train.nproc_per_node={cfg.slurm.gpus_per_node}")  # one rank per GPU
    return [sys.executable, "-m", "pipelines.cli", "train", str(Path(config_path).resolve()), *extra,
            "--nnodes", "{nnodes}", "--rdzv-endpoint", "{rdzv_endpoint}", "--rdzv-id", "{job_id}"]  # fmt: skip


def check_ready_to_train(cfg: PipelineConfig) -> None:
    """Fail before anything is queued: the shard directory must be a finished one."""
    try:
        TokenDataset(cfg.data.output_dir)
    except ShardError as e:
        raise ConfigError(f"data.output_dir: {e}") from e


def submit_training(config_path: str, overrides: list[str], cfg: PipelineConfig, executor: str):
    check_ready_to_train(cfg)
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    gpus = cfg.slurm.gpus_per_node if cfg.train.device != "cpu" else 0
    return submit_command(
        train_argv(config_path, overrides, cfg),
        cfg.slurm,
        slurm_dir(run_dir) / "logs" / "%j",
        cluster=executor,
        name=f"pretrain-{run_dir.name}",
        requeue_exit_code=EXIT_REQUEUE,
        gpus_per_node=gpus,
        record_in=slurm_dir(run_dir),
    )


def sbatch_script(config_path: str, overrides: list[str], cfg: PipelineConfig) -> str:
    run_dir = Path(cfg.run_dir).resolve()
    (slurm_dir(run_dir) / "logs").mkdir(parents=True, exist_ok=True)  # SLURM does not create it
    gpus = cfg.slurm.gpus_per_node if cfg.train.device != "cpu" else 0
    return render_sbatch(
        train_argv(config_path, overrides, cfg),
        cfg.slurm,
        slurm_dir(run_dir) / "logs",
        name=f"pretrain-{run_dir.name}",
        requeue_exit_code=EXIT_REQUEUE,
        gpus_per_node=gpus,
        chdir=Path.cwd(),
    )


def list_jobs(run_dir: str | Path) -> list[dict]:
    """Jobs of a run: those `pretrain submit` recorded, plus sbatch jobs found by their log names."""
    root = Path(run_dir)
    if not root.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    jobs = {j["job_id"]: j for j in recorded_jobs(slurm_dir(root))}
    logs = slurm_dir(root) / "logs"
    if logs.is_dir():
        for log in sorted(logs.glob("*-*.out")):
            m = re.fullmatch(r"(.+)-(\d+)\.out", log.name)
            if m and m.group(2) not in jobs:
                jobs[m.group(2)] = {"job_id": m.group(2), "name": m.group(1), "cluster": "slurm (sbatch)", "stdout": str(log), "stderr": str(log)}
    out = []
    for job_id, job in sorted(jobs.items(), key=lambda kv: int(re.sub(r"\D", "", kv[0]) or 0)):
        state = job_state(job_id) if job.get("cluster", "").startswith("slurm") else None
        out.append({**job, "state": state.state if state else "local", "restarts": state.restarts if state else None})
    return out
