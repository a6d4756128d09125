"""The one place that turns a job's resources into a submitit executor (SLURM or local).

Training/data jobs (:mod:`slurm.submit`, from the ``slurm`` section) and eval jobs
(:mod:`evals.watch`, from ``eval.slurm``) ask for different things, but the mapping onto submitit's
parameters (which are generic, which ``slurm_``-prefixed, what is left out so that the partition's
default applies) is the same and lives here, so a new resource is added once.

Nothing here validates values against SLURM's syntax: callers check their own config section
first (``SlurmConfig.validate``, ``EvalSlurmConfig.validate``), because only they can name the
offending key. The job name is made SLURM-safe here, since it reaches ``%x`` in log paths.

Local jobs outlive the command that submitted them (submitit's design, and what a detached
``pretrain submit --executor local`` wants). A command that waits for its local jobs in the
foreground (the eval watcher of ``pretrain run``, ``pretrain evals watch``) builds its executor
inside :func:`local_jobs_end_with_this_process`: if it dies without cleanup (SIGKILL, the OOM
killer, a closed terminal), its jobs are cancelled as its Ctrl-C would cancel them, instead of
writing on, unseen, into the run dir. SLURM jobs are never tied: they are meant to outlive it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from common.parent_death import parent_death_signal
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
    if kind == "local" and _LOCAL_JOBS_TIED.get():
        # AutoExecutor builds its LocalExecutor itself and has no hook for the class: make it the
        # subclass below (same state; only the start of a job's controller differs)
        executor._executor.__class__ = _tied_local_executor_class()
    return executor


# ---------------------------------------------------------------- local jobs that end with their submitter

_LOCAL_JOBS_TIED: contextvars.ContextVar[bool] = contextvars.ContextVar("local_jobs_tied", default=False)


@contextlib.contextmanager
def local_jobs_end_with_this_process() -> Iterator[None]:
    """Local executors built in the block start jobs that are cancelled when this process dies
    (see the module docstring). Only for a process that waits for its jobs anyway."""
    token = _LOCAL_JOBS_TIED.set(True)
    try:
        yield
    finally:
        _LOCAL_JOBS_TIED.reset(token)


@functools.cache
def _tied_local_executor_class() -> type:
    """submitit's LocalExecutor whose job controllers get SIGINT when this process dies.

    SIGINT is what ``LocalJob.cancel`` sends the controller: it interrupts its tasks (SIGINT, then
    SIGKILL a second later) and exits, so the eval job unwinds as on a Ctrl-C (its attempt is
    recorded as stopped, not failed). The controller is started as ``submitit.local.local.start_controller``
    starts it (submitit 1.5), plus the ``preexec_fn`` that ties it (:func:`common.parent_death.parent_death_signal`)."""
    from submitit.local.local import LocalExecutor, LocalJob

    class TiedLocalExecutor(LocalExecutor):
        def _submit_command(self, command: str) -> LocalJob:
            ntasks = self.parameters.get("tasks_per_node", 1)
            gpus = self.parameters.get("gpus_per_node", 0)
            visible = self.parameters.get("visible_gpus", ())
            env = dict(os.environ,
                       SUBMITIT_LOCAL_NTASKS=str(ntasks), SUBMITIT_LOCAL_COMMAND=command,
                       SUBMITIT_LOCAL_TIMEOUT_S=str(int(60 * self.parameters.get("timeout_min", 2.0))),
                       SUBMITIT_LOCAL_SIGNAL_DELAY_S=str(int(self.parameters.get("signal_delay_s", 30))),
                       SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_JOB_NUM_NODES="1",
                       SUBMITIT_STDERR_TO_STDOUT="1" if self.parameters.get("stderr_to_stdout", False) else "",
                       SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_WITH_SHELL="",
                       CUDA_VISIBLE_DEVICES=",".join(str(k) for k in (range(gpus) if visible == () else visible[:gpus])))
            if self.parameters.get("setup"):
                raise ValueError("a local job tied to its submitter takes no 'setup' commands")
            process = subprocess.Popen([sys.executable, "-m", "submitit.local._local", str(self.folder)], env=env,  # noqa: S603
                                       preexec_fn=parent_death_signal(signal.SIGINT))  # noqa: PLW1509
            return LocalJob(folder=self.folder, job_id=str(process.pid), process=process, tasks=list(range(ntasks)))

    return TiedLocalExecutor
