"""The one place that turns a job's resources into a submitit executor (SLURM or local).

Training/data jobs (:mod:`slurm.submit`, from the ``slurm`` section) and eval jobs
(:mod:`evals.watch`, from ``eval.slurm``) ask for different things, but the mapping onto submitit's
parameters (which are generic, which ``slurm_``-prefixed, what is left out so that the partition's
default applies) is the same and lives here, so a new resource is added once.

Nothing here validates values against SLURM's syntax: callers check their own config section
first (``SlurmConfig.validate``, ``EvalSlurmConfig.validate``), because only they can name the
offending key. The job name is made SLURM-safe here, since it reaches ``%x`` in log paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from slurm import validation
from slurm.resources import SlurmError

if TYPE_CHECKING:  # imported where a job is built: see require_submitit
    import submitit

KINDS = ("local", "slurm")
_NAMED = ("partition", "account", "qos", "constraint")


@dataclass(frozen=True)
class JobResources:
    """What one job asks for. ``None`` (and 0 for ``mem_gb``, "" for names) means "not asked":
    the line is left out of the batch script and the partition's or submitit's default applies."""

    timeout_min: int
    nodes: int = 1
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: int = 0
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    additional: dict[str, str | bool] | None = None  # submitit's slurm_additional_parameters
    signal_delay_s: int | None = None  # the requeue signal (USR2) this long before the time limit
    max_requeues: int | None = None  # submitit's slurm_max_num_timeout

    def slurm_parameters(self) -> dict:
        """The parameters only a SLURM executor takes (a local one runs on this machine as it is)."""
        params: dict = {}
        if self.cpus_per_task is not None:
            params["cpus_per_task"] = self.cpus_per_task
        if self.signal_delay_s is not None:
            params["slurm_signal_delay_s"] = self.signal_delay_s
        if self.additional is not None:
            params["slurm_additional_parameters"] = dict(self.additional)
        if self.gpus_per_node is not None:
            params["gpus_per_node"] = self.gpus_per_node
        if self.mem_gb:
            params["mem_gb"] = self.mem_gb
        for key in _NAMED:
            if getattr(self, key):
                params[f"slurm_{key}"] = getattr(self, key)
        return params


def require_submitit() -> ModuleType:
    """The submitit module, or a SlurmError saying how to get it. It is imported only where a job is
    built, so the commands that build none (`pretrain eval`, `config show`) run without it."""
    try:
        import submitit
    except ImportError as e:
        raise SlurmError(f"submitting a job (local or SLURM) needs submitit, which cannot be imported here: {e}; "
                         "pip install submitit") from e
    return submitit


def build_executor(kind: str, folder: Path, resources: JobResources, name: str) -> submitit.Executor:
    """A submitit executor for `kind` ("slurm" or "local") running one task per node.

    submitit writes every parameter as ``#SBATCH --key=<value>`` and `folder` into its
    ``--output``/``--error`` lines and ``srun`` command, so callers hand over checked values only."""
    if kind not in KINDS:
        raise SlurmError(f"--executor must be local or slurm, got {kind!r}")
    submitit = require_submitit()
    ctor = {} if resources.max_requeues is None else {"slurm_max_num_timeout": resources.max_requeues}
    executor = submitit.AutoExecutor(folder=str(folder), cluster=kind, **ctor)
    params: dict = {"name": validation.job_name(name), "timeout_min": resources.timeout_min, "tasks_per_node": 1,
                    "nodes": resources.nodes}
    if kind == "slurm":
        params.update(resources.slurm_parameters())
    executor.update_parameters(**params)
    return executor
