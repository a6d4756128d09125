"""The data stage as one SLURM job: what it asks for (the ``ray`` section), what every node runs,
and following it to its end (`pretrain data --executor slurm [--wait]`, and `pretrain run
--executor slurm` through the stage record in :mod:`pipelines.stages`).

``ray.nodes`` = 1: the node runs `pretrain data` as it would run here (a local Ray instance that
listens on 127.0.0.1 only, with the CPUs the job asked for). More: every node runs
:mod:`slurm.ray_cluster`, which starts the Ray head on the first node and workers on the others,
waits until all have joined, runs `pretrain data ... ray.address=<head>` on the first node and
stops Ray everywhere. A stop signal (preemption, time limit) ends it with exit 3 and the job is
requeued; the rerun skips the data tasks that finished.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from pipelines.config import ConfigError, PipelineConfig
from pipelines.launching import last_exit_code
from slurm.config import SlurmConfig
from slurm.jobs import wait_for_end
from trainer import EXIT_REQUEUE

# Ray's object store takes this share of ray.mem_gb on each node, its task memory the rest.
OBJECT_STORE_SHARE = 0.3


def data_cpus(cfg: PipelineConfig) -> int:
    """CPUs per node of the data job: ``ray.cpus_per_node``, else ``slurm.cpus_per_task``."""
    return cfg.ray.cpus_per_node or cfg.slurm.cpus_per_task


def data_resources(cfg: PipelineConfig) -> tuple[SlurmConfig, int]:
    """The data job's request: ``ray.*``, with the ``slurm`` section's values where ``ray`` leaves
    one empty (0 or ""), and its requeue policy; no GPU, no training constraint or extra options."""
    r, s = cfg.ray, cfg.slurm
    job = dataclasses.replace(s, nodes=r.nodes, gpus_per_node=0, cpus_per_task=data_cpus(cfg), mem_gb=r.mem_gb or s.mem_gb,
                              partition=r.partition or s.partition, account=r.account or s.account, qos=r.qos or s.qos,
                              time=r.time, constraint="", extra=[])  # fmt: skip
    return job, 0


def data_argv(config_path: str, overrides: list[str], cfg: PipelineConfig) -> list[str]:
    """What every node of the data job runs (rendezvous placeholders filled by slurm.node_command)."""
    config = str(Path(config_path).resolve())
    driver = [sys.executable, "-m", "pipelines.cli", "data", config, *overrides]
    cpus = data_cpus(cfg)
    if cfg.ray.nodes == 1:
        return driver if cfg.ray.num_cpus else [*driver, f"ray.num_cpus={cpus}"]
    mem = cfg.ray.mem_gb or cfg.slurm.mem_gb
    wrapper = [sys.executable, "-m", "slurm.ray_cluster", "--nnodes", "{nnodes}", "--head", "{rdzv_endpoint}",
               "--job-id", "{job_id}", "--cpus", str(cpus), "--stopped-exit-code", str(EXIT_REQUEUE)]  # fmt: skip
    if mem:
        store = round(mem * OBJECT_STORE_SHARE, 3)
        wrapper += ["--memory-gb", str(round(mem - store, 3)), "--object-store-gb", str(store)]
    return [*wrapper, "--", *driver, "ray.address={ray_address}"]


def request_error(message: str) -> str:
    """A SLURM refusal of the data job, naming the ``ray`` keys its node and CPU counts come from."""
    return message.replace("slurm.nodes=", "ray.nodes=").replace("slurm.cpus_per_task=", "ray.cpus_per_node (or slurm.cpus_per_task)=")


def check_submittable(cfg: PipelineConfig) -> None:
    """ConfigError (exit 2) for a data job that cannot be what the config says."""
    if cfg.ray.address:
        raise ConfigError(f"ray.address={cfg.ray.address!r} joins a running cluster; --executor slurm starts its own "
                          "(leave ray.address empty, or run `pretrain data` without --executor slurm)")  # fmt: skip


def wait_for_data(job, cfg: PipelineConfig, poll_s: float = 2.0) -> tuple[int, str]:
    """Follow a submitted data job to its end; return (exit code, what happened): see
    :func:`data_job_outcome`. Never from submitit's result pickle (see
    pipelines.launching.wait_for_training)."""
    wait_for_end(job, poll_s)
    return data_job_outcome(job, cfg)


def data_job_outcome(job, cfg: PipelineConfig) -> tuple[int, str]:
    """What a finished data job came to: (exit code, what happened).

    The job's own exit first: a "... exited with code N" line (written by slurm.node_command only
    for a code that is not requeued, so never a stale one of an attempt before a requeue) means it
    ended so: 2 stays 2 (refused: fix the config or the data), anything else is 1 (a rerun resumes).
    Without one, the shard directory decides: a manifest that loads and records this config's
    settings is done. Any manifest was not enough: a refused job leaves a dataset of other settings
    in place, and that was reported as finished."""
    from dataprep.pipeline import settings_differences
    from dataprep.shards import ShardError, TokenDataset

    code = last_exit_code(job, r"exited with code (-?\d+)")
    if code is not None:
        return (2 if code == 2 else 1), f"ended without a finished dataset (the data stage exited {code}); see {job.paths.stderr}"
    try:
        ds = TokenDataset(cfg.data.output_dir)
    except ShardError:
        return 1, f"ended without a finished dataset (no exit line in its log); see {job.paths.stdout}"
    if differ := settings_differences(ds.manifest, cfg.data):
        return 2, (f"ended without a finished dataset: {cfg.data.output_dir} holds one built with other settings "
                   f"({', '.join(differ)}); see {job.paths.stdout}")  # fmt: skip
    return 0, f"finished: {len(ds.shards)} shards in {cfg.data.output_dir}"
