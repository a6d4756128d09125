"""`pretrain submit`, `pretrain sbatch`, `pretrain jobs`: the training job on SLURM (or locally
through submitit), built from a run config. This is where ML meets `slurm/`: it knows that the
job is `pretrain train` and that its exit code 3 means "checkpointed, requeue me"."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from common.rundir import RunDir
from dataprep.shards import ShardError, TokenDataset
from pipelines.config import ConfigError, PipelineConfig
from slurm import validation
from slurm.config import SlurmConfig
from slurm.jobs import job_state, wait_for_end
from slurm.joblogs import final_exit
from slurm.sbatch import render_sbatch
from slurm.submit import recorded_jobs, submit_command
from trainer import EXIT_REQUEUE


def slurm_dir(run_dir: str | Path) -> Path:
    return RunDir(Path(run_dir).resolve()).slurm


def train_argv(config_path: str, overrides: list[str], cfg: PipelineConfig, allow_changes: bool = False) -> list[str]:
    """`pretrain train` as every node runs it, with rendezvous placeholders for slurm/ to fill.

    A GPU job runs one rank per GPU it asks for (`slurm.gpus_per_node`); a CPU job keeps its own
    `train.nproc_per_node` (it asks for no GPU). `allow_changes`: resume even though
    hyper-parameters differ from the checkpoint's (`pretrain train --allow-changes`)."""
    extra = list(overrides)
    gpus = train_gpus(cfg)
    if gpus and cfg.train.nproc_per_node != gpus:
        extra.append(f"train.nproc_per_node={gpus}")  # one rank per GPU
    flags = ["--allow-changes"] if allow_changes else []
    return [sys.executable, "-m", "pipelines.cli", "train", str(Path(config_path).resolve()), *extra, *flags,
            "--nnodes", "{nnodes}", "--rdzv-endpoint", "{rdzv_endpoint}", "--rdzv-id", "{job_id}"]  # fmt: skip


def check_ready_to_train(cfg: PipelineConfig) -> None:
    """Fail before anything is queued: the shard directory must be a finished one."""
    try:
        TokenDataset(cfg.data.output_dir)
    except ShardError as e:
        raise ConfigError(f"data.output_dir: {e}") from e


def check_run_dir_for_slurm(cfg: PipelineConfig) -> Path:
    """The resolved run dir, if SLURM can take it in `--output`/`--chdir` paths (no `%` or `\\`,
    which it reads as file name patterns); ConfigError otherwise, before anything is written."""
    run_dir = Path(cfg.run_dir).resolve()
    try:
        validation.check_slurm_path("run_dir", str(run_dir))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return run_dir


def submit_training(config_path: str, overrides: list[str], cfg: PipelineConfig, executor: str, allow_changes: bool = False):
    run_dir = check_run_dir_for_slurm(cfg)
    check_ready_to_train(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    return submit_job(train_argv(config_path, overrides, cfg, allow_changes), cfg.slurm, train_gpus(cfg), run_dir,
                      f"pretrain-{run_dir.name}", cluster=executor)


def train_gpus(cfg: PipelineConfig) -> int:
    """GPUs per node of the training job: ``slurm.gpus_per_node`` unless training runs on CPU."""
    return cfg.slurm.gpus_per_node if cfg.train.device != "cpu" else 0


def submit_job(argv: list[str], resources: SlurmConfig, gpus: int, run_dir: Path, name: str, dependency: str = "",
               cluster: str = "slurm"):
    """One job of a run: logs and the job record under ``RUN_DIR/slurm``, exit 3 requeues it."""
    return submit_command(argv, resources, RunDir(run_dir).slurm_logs / "%j", cluster=cluster, name=name,
                          requeue_exit_code=EXIT_REQUEUE, gpus_per_node=gpus, record_in=slurm_dir(run_dir), dependency=dependency)


def eval_job_request(cfg: PipelineConfig) -> tuple[SlurmConfig, int]:
    """One eval job's request (`eval.slurm.*`) in the shape check_fits takes."""
    e = cfg.eval.slurm
    job = SlurmConfig(nodes=1, gpus_per_node=e.gpus, cpus_per_task=e.cpus, mem_gb=e.mem_gb, partition=e.partition,
                      account=e.account, qos=e.qos, time=e.time)
    return job, e.gpus


def eval_request_error(message: str) -> str:
    """A SLURM refusal of an eval job (:func:`eval_job_request`), naming the ``eval.slurm`` keys
    the user sets rather than the ``slurm`` ones the request is checked as."""
    names = {"slurm.gpus_per_node": "eval.slurm.gpus", "slurm.cpus_per_task": "eval.slurm.cpus",
             "slurm.partition": "eval.slurm.partition", "mem_gb": "eval.slurm.mem_gb"}
    return re.sub(r"(?<![\w.])(slurm\.gpus_per_node|slurm\.cpus_per_task|slurm\.partition|mem_gb)\b",
                  lambda m: names[m.group(1)], message)


def sbatch_script(config_path: str, overrides: list[str], cfg: PipelineConfig, allow_changes: bool = False) -> str:
    """The training job as a plain sbatch script (see slurm.sbatch); creates the log directory
    (SLURM does not) only once the script could be rendered."""
    run_dir = check_run_dir_for_slurm(cfg)
    script = render_sbatch(
        train_argv(config_path, overrides, cfg, allow_changes),
        cfg.slurm,
        RunDir(run_dir).slurm_logs,
        name=f"pretrain-{run_dir.name}",
        requeue_exit_code=EXIT_REQUEUE,
        gpus_per_node=train_gpus(cfg),
        chdir=Path.cwd(),
    )
    (RunDir(run_dir).slurm_logs).mkdir(parents=True, exist_ok=True)
    return script


def list_jobs(run_dir: str | Path) -> list[dict]:
    """Jobs of a run: those `pretrain submit` recorded, plus sbatch jobs found by their log names."""
    root = Path(run_dir)
    if not root.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    jobs = {j["job_id"]: j for j in recorded_jobs(slurm_dir(root))}
    logs = RunDir(root).slurm_logs
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


def last_exit_code(job, pattern: str) -> int | None:
    """The exit code in the last line matching ``pattern`` (one group: the code) of a finished job's
    logs, every node's: a refusal (2) on any node wins, else the first node's (slurm.joblogs.final_exit),
    or None. How a job's outcome is read without its result pickle."""
    found = final_exit(job.paths.stderr, pattern)
    return None if found is None else found.code


def wait_for_training(job, cfg: PipelineConfig, poll_s: float = 2.0) -> tuple[int, str]:
    """Follow a submitted training job to its end; return (exit code, what happened).

    Never through ``job.result()``: that unpickles a result file from the run dir, which anyone who
    can write there could plant. The run dir's committed checkpoints say whether training finished;
    if not, the job's log says why: the final "... exited with code N" of slurm.node_command (it
    also covers a command that failed before the launcher ran, such as a config edited while the
    job was queued), else the launcher's last "pretrain train: exit N" (2: refused, fix the config
    or data; anything else: 1, a rerun may help)."""
    from trainer.checkpoint import latest_committed, read_meta

    wait_for_end(job, poll_s)
    newest = latest_committed(cfg.run_dir)
    if newest is not None and int(read_meta(newest)["step"]) >= cfg.train.max_steps:
        return 0, f"finished: {newest}"
    code = last_exit_code(job, r"exited with code (-?\d+)")
    if code is None:
        code = last_exit_code(job, r"pretrain train: exit (\d+)")
    reason = f"training exited {code}" if code is not None else "no exit line in its log"
    return (2 if code == 2 else 1), f"ended before train.max_steps ({reason}); see {job.paths.stdout}"
