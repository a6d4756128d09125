"""The `slurm` section of a run config (resources and requeue policy; nothing ML-specific)."""

from __future__ import annotations

from dataclasses import dataclass, field

from slurm import validation as v


# sbatch options the pipeline writes itself, with the key that sets each: an `extra` item naming one
# would silently replace it (`--time=0`: unlimited; `--nodes`: not the geometry that was checked;
# `--output`: a log `submit --wait` and `pretrain jobs` never find)
MANAGED_OPTIONS = {
    "nodes": "slurm.nodes", "gpus-per-node": "slurm.gpus_per_node", "cpus-per-task": "slurm.cpus_per_task",
    "mem": "slurm.mem_gb", "time": "slurm.time", "partition": "slurm.partition", "account": "slurm.account",
    "qos": "slurm.qos", "constraint": "slurm.constraint", "signal": "slurm.signal_delay_s",
    "requeue": "slurm.max_requeues", "no-requeue": "slurm.max_requeues", "output": "run_dir", "error": "run_dir",
    "open-mode": "run_dir", "chdir": "run_dir", "job-name": "run_dir", "ntasks-per-node": "train.nproc_per_node (one launcher per node)",
    "dependency": "the stage order of `pretrain run`",
}  # fmt: skip


@dataclass
class SlurmConfig:
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 32
    mem_gb: int = 0  # 0 = the partition's default
    partition: str = ""  # one name, or several separated by ","
    account: str = ""
    qos: str = ""
    time: str = "24:00:00"
    constraint: str = ""  # node features: "a100", "intel&ib", "[rack1|rack2]"
    extra: list[str] = field(default_factory=list)  # one sbatch option per item: "--exclusive", "--reservation=x"
    signal_delay_s: int = 120  # USR2 this long before the time limit
    max_requeues: int = 20
    # The multi-node rendezvous port (torchrun's store, the data job's Ray GCS) is LOW + job id mod the
    # range's size, on the first node: below Linux's ephemeral ports (32768-60999, which outgoing
    # connections take, so a port there can be busy on a busy node) and above Ray's worker ports (10002-19999)
    rdzv_ports: str = "20000-29999"

    def validate(self) -> None:
        """Everything here reaches an ``#SBATCH`` line: refuse what could break out of one, or
        what SLURM would reject only once the job is queued."""
        v.check_at_least("nodes", self.nodes, 1)
        v.check_at_least("gpus_per_node", self.gpus_per_node, 0)
        v.check_at_least("cpus_per_task", self.cpus_per_task, 1)
        v.check_at_least("mem_gb", self.mem_gb, 0)
        v.check_at_least("signal_delay_s", self.signal_delay_s, 0)
        if self.signal_delay_s > 65535:  # sbatch --signal=...@<0..65535>
            raise ValueError(f"signal_delay_s must be <= 65535, got {self.signal_delay_s}")
        v.check_at_least("max_requeues", self.max_requeues, 0)
        v.port_range("rdzv_ports", self.rdzv_ports)
        v.check_name("partition", self.partition, allow_list=True)
        v.check_name("account", self.account)
        v.check_name("qos", self.qos)
        v.check_constraint("constraint", self.constraint)
        v.time_minutes("time", self.time)
        v.parse_extra("extra", self.extra)
        for i, raw in enumerate(self.extra):
            (option,) = v.parse_extra("extra", [raw])  # one option per item
            if option in MANAGED_OPTIONS:
                raise ValueError(f"extra[{i}]: --{option} is set by the pipeline (from {MANAGED_OPTIONS[option]}); "
                                 f"set that instead of passing it in slurm.extra, got {raw!r}")
