"""The `slurm` section of a run config (resources and requeue policy; nothing ML-specific)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SlurmConfig:
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 32
    mem_gb: int = 0  # 0 = the partition's default
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = "24:00:00"
    constraint: str = ""
    extra: list[str] = field(default_factory=list)  # raw "#SBATCH" lines
    signal_delay_s: int = 120  # USR2 this long before the time limit
    max_requeues: int = 20
