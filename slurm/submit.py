"""Submitting a command to SLURM (or to submitit's local executor, for laptops and CI) and
keeping a record of the jobs of a run, so `pretrain jobs` can show them later."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from slurm import validation
from slurm.config import SlurmConfig
from slurm.executor import JobResources, build_executor, require_submitit
from slurm.resources import SlurmError, check_fits, extra_parameters, parse_time_minutes

if TYPE_CHECKING:  # imported where a job is built: see slurm.executor.require_submitit
    import submitit

JOBS_FILE = "jobs.jsonl"
# "afterok:12", "after:12:13,afterany:14", "singleton"
_DEPENDENCY = re.compile(r"singleton|[a-z]+(?::[0-9_+]+)+(?:[,?][a-z]+(?::[0-9_+]+)+)*")


def make_executor(folder: Path, cfg: SlurmConfig, cluster: str, name: str, gpus_per_node: int,
                  dependency: str = "") -> submitit.Executor:
    """A submitit executor for `cluster` ("slurm" or "local") with the ``slurm`` section's resources.

    submitit writes every parameter as ``#SBATCH --key=<shlex-quoted value>`` and the folder
    into its ``--output``/``--error`` lines and ``srun`` command: values are checked here first
    (no control character could end a comment line, no ``%``/backslash in the folder, a SLURM-safe
    job name), so nothing handed over can break out of submitit's script either."""
    check_submittable(folder, cfg)
    return build_executor(cluster, folder, job_resources(cfg, gpus_per_node, dependency), name)


def job_resources(cfg: SlurmConfig, gpus_per_node: int, dependency: str = "") -> JobResources:
    """The ``slurm`` section as one job's request (`dependency` is SLURM's, e.g. "afterok:123")."""
    additional = extra_parameters(cfg.extra)
    if dependency:
        additional["dependency"] = dependency
    return JobResources(
        timeout_min=parse_time_minutes(cfg.time), nodes=cfg.nodes, gpus_per_node=gpus_per_node or None,
        cpus_per_task=cfg.cpus_per_task, mem_gb=cfg.mem_gb, partition=cfg.partition, account=cfg.account,
        qos=cfg.qos, constraint=cfg.constraint, additional=additional, signal_delay_s=cfg.signal_delay_s,
        max_requeues=cfg.max_requeues,
    )


def check_submittable(folder: Path, cfg: SlurmConfig) -> None:
    """SlurmError unless every value can go into a batch script unchanged (see make_executor)."""
    try:
        cfg.validate()
    except ValueError as e:
        raise SlurmError(f"slurm.{e}") from e
    try:
        # "%j" is submitit's own placeholder for the job id: the rest of the path must hold no pattern
        validation.check_slurm_path("log folder", str(folder).replace("%j", ""))
    except ValueError as e:
        raise SlurmError(str(e)) from e


def submit_command(
    argv: list[str],
    cfg: SlurmConfig,
    log_dir: Path,
    cluster: str,
    name: str,
    requeue_exit_code: int,
    gpus_per_node: int = 0,
    record_in: Path | None = None,
    dependency: str = "",
) -> submitit.Job:
    """Submit `argv` (with rendezvous placeholders, see NodeCommand) as one job; return at once.

    `dependency` is SLURM's (e.g. "afterok:123"), for chaining jobs. `argv` never meets a shell:
    it travels pickled to the job, which starts it with subprocess (no quoting to get wrong)."""
    require_submitit()  # NodeCommand subclasses a submitit class
    from slurm.node_command import NodeCommand

    if dependency and not _DEPENDENCY.fullmatch(dependency):
        raise SlurmError(f"not a SLURM job dependency: {dependency!r}")
    if cluster == "slurm":
        check_fits(cfg, gpus_per_node)
    executor = make_executor(log_dir, cfg, cluster, name, gpus_per_node, dependency)
    grace = max(5.0, cfg.signal_delay_s - 5.0)
    ports = validation.port_range("slurm.rdzv_ports", cfg.rdzv_ports)  # checked by make_executor above
    job = executor.submit(NodeCommand(argv, requeue_exit_code, cfg.max_requeues, grace_s=grace, ports=ports))
    if record_in is not None:
        record_job(record_in, {"job_id": str(job.job_id), "name": name, "cluster": cluster, "log_dir": str(log_dir),
                               "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr), "submitted": time.time()})
    return job


def record_job(directory: Path, record: dict) -> None:
    """Append one line to ``jobs.jsonl``. After a line torn by a submitter killed mid-write (or a
    full disk) the record starts on a line of its own, so the torn one cannot take it down with it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / JOBS_FILE
    line = json.dumps(record, sort_keys=True) + "\n"
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


TEXT_FIELDS = ("name", "cluster", "log_dir", "stdout", "stderr")  # what submit_command records as text


def _whole_record(record: object) -> bool:
    """Whether ``record`` is a job as :func:`submit_command` records it: a text ``job_id``, and each
    of TEXT_FIELDS it has is text (readers call string methods on them)."""
    return isinstance(record, dict) and isinstance(record.get("job_id"), str) and all(
        isinstance(record[k], str) for k in TEXT_FIELDS if k in record)


def recorded_jobs(directory: Path) -> list[dict]:
    """The recorded jobs, oldest first; a line that is not a whole record (torn, or a field of the
    wrong type) is left out, so it costs only itself."""
    path = directory / JOBS_FILE
    if not path.is_file():
        return []
    jobs = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if _whole_record(record):
            jobs.append(record)
    return jobs
