"""The workflow's stages, one record each: adding a stage to `pretrain run` is adding one record.

A :class:`Stage` says everything the workflow needs to know about a stage, and nothing about the
others:

* ``depends_on``: which config values its outputs depend on (changing one invalidates a finished
  stage; keys that only change *how* it runs are left out), read from the sections it names;
* ``run_local``: run it here, in the foreground; it *returns* an :class:`Outcome` (done with its
  outputs, or stopped: checkpointed / interrupted and resumable) and raises only for a failure;
* ``verify``: what "done" means, checked from its outputs on disk before it is skipped;
* ``resources`` and ``argv``: its SLURM job (the request and the command every node runs), and
  ``after`` how it is chained to the stage before it (``afterok``, or ``after`` for a stage that
  runs alongside its predecessor, like the eval watcher next to training).

Stage runners receive the :class:`StageContext` (the resolved config, the run dir, the config
path and overrides for the jobs' command lines, a log function, and the stop signal received so
far), never the workflow object, so they stay plain functions that are easy to read and test.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.rundir import RunDir
from common.strict import flatten, to_dict
from pipelines.config import PipelineConfig
from pipelines.data_job import data_argv, data_resources, request_error as data_request_error
from slurm.config import SlurmConfig
from pipelines.launching import eval_job_request, eval_request_error, submit_job, train_argv, train_gpus
from slurm.resources import SlurmError, check_fits
from trainer.config import RESUME_RUNTIME_KEYS

if TYPE_CHECKING:
    from evals.watch import Watcher

EXIT_OK, EXIT_FAILURE, EXIT_REFUSED, EXIT_REQUEUE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class WorkflowError(RuntimeError):
    """A stage failed or the workflow cannot proceed; the message says what to do.

    ``code`` is the exit code it means: 1 (a rerun may help) or 2 (refused: fix the config/data).
    ``advice``, when the stage knows better than the exit code alone, is what the user should do.
    ``exit_line``: the line of the stage's own output that says why it ended (the launcher's
    "pretrain train: exit 2: refused: ...", an eval job's error), and ``log`` the file that holds it
    ("" when it went to the terminal only): recorded in workflow.json for `pretrain status`, which
    a local run has no job log for, unlike a SLURM one."""

    def __init__(self, message: str, code: int = EXIT_FAILURE, advice: str = "", exit_line: str = "", log: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.advice = advice
        self.exit_line = exit_line
        self.log = log


@dataclasses.dataclass
class Outcome:
    """What a stage's local run came to. ``code`` 0: done, with ``outputs`` recorded in the state;
    3 (stopped by SIGTERM/SIGUSR2) or 130 (Ctrl-C): stopped, everything resumable; ``why`` says how."""

    code: int = EXIT_OK
    outputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    why: str = ""

    @property
    def done(self) -> bool:
        return self.code == EXIT_OK


@dataclasses.dataclass
class StageContext:
    """What a stage runner gets: the run, not the workflow that drives it."""

    cfg: PipelineConfig
    run_dir: Path
    config_path: str
    overrides: list[str]
    log: Callable[[str], None] = print
    stop_signal: int | None = None  # the first stop signal this process got (pipelines.stopping.stop_signals)
    executor: str = "local"  # where the stages' jobs run: what "evaluated" means depends on it (unevaluated)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    depends_on: Callable[[PipelineConfig], dict[str, Any]]
    run_local: Callable[[StageContext], Outcome]
    verify: Callable[[StageContext, dict[str, Any]], str | None]  # (context, recorded outputs) -> None if done
    resources: Callable[[PipelineConfig], tuple[SlurmConfig, int]]  # (SLURM request, GPUs per node)
    argv: Callable[[StageContext], list[str]]
    after: str = "afterok"


# ------------------------------------------------------------------------------------ config each stage depends on

# Keys that change how a stage runs but not what it produces: changing them never invalidates it.
RUNTIME_KEYS = {
    "data": {"cache_dir", "download_retries", "keep_work"},
    "train": set(RESUME_RUNTIME_KEYS),  # the trainer's own list of what a resume may change
    "eval": {"slurm", "poll_s", "max_retries", "device", "batch_size", "max_parallel", "order", "tracking_uri"},
}


def section_values(cfg: PipelineConfig, section: str) -> dict[str, Any]:
    """``section.key`` -> value for the keys of ``section`` that shape its stage's outputs."""
    skip = RUNTIME_KEYS.get(section, set())
    values = flatten(to_dict(cfg)[section])
    return {f"{section}.{k}": v for k, v in values.items() if k.split(".")[0] not in skip}


def _data_depends(cfg: PipelineConfig) -> dict[str, Any]:
    return section_values(cfg, "data")


def _train_depends(cfg: PipelineConfig) -> dict[str, Any]:
    return {**section_values(cfg, "model"), **section_values(cfg, "train"), **section_values(cfg, "data")}


def _eval_depends(cfg: PipelineConfig) -> dict[str, Any]:
    return section_values(cfg, "eval")


# ------------------------------------------------------------------------------------ local runners


def _run_data(ctx: StageContext) -> Outcome:
    from dataprep.errors import DataError
    from dataprep.pipeline import run_data_stage
    from dataprep.shards import TokenDataset

    try:
        run_data_stage(ctx.cfg.data, ctx.cfg.ray)
    except DataError as e:
        raise WorkflowError(str(e), getattr(e, "exit_code", EXIT_FAILURE)) from e
    ds = TokenDataset(ctx.cfg.data.output_dir)
    return Outcome(outputs={"output_dir": str(Path(ctx.cfg.data.output_dir).resolve()),
                            "manifest_fingerprint": ds.fingerprint, "shards": len(ds.shards)})  # fmt: skip


def _run_train(ctx: StageContext) -> Outcome:
    from trainer.checkpoint import latest_committed
    from trainer.failure_log import first_since
    from trainer.launch import say_on_stderr, train_command

    said: list[str] = []  # the launcher's lines; its last says why training ended (kept for `pretrain status`)

    def say(line: str) -> None:
        said.append(line)
        say_on_stderr(line)

    started = time.time()
    rc = train_command(to_dict(ctx.cfg), say=say)
    if rc == EXIT_REQUEUE:
        # checkpointed on a stop signal: Ctrl-C (SIGINT seen here) keeps meaning 130, anything else 3
        return Outcome(EXIT_INTERRUPTED if ctx.stop_signal == signal.SIGINT else EXIT_REQUEUE,
                       why="training checkpointed on a stop signal")
    if rc == EXIT_REFUSED and (holder := train_lock_holder(ctx.run_dir)) is not None:
        raise run_dir_in_use(ctx.run_dir, holder)
    if rc != EXIT_OK:
        traceback_file = first_since(ctx.run_dir, started)  # a crashed rank's, kept in the run dir
        raise WorkflowError(f"pretrain train exited with {rc}", EXIT_REFUSED if rc == EXIT_REFUSED else EXIT_FAILURE,
                            exit_line=said[-1] if said else "", log=str(traceback_file or ""))
    return Outcome(outputs={"final_checkpoint": str(latest_committed(ctx.run_dir))})


def train_lock_holder(run_dir: Path) -> dict[str, Any] | None:
    """Who holds ``run_dir``'s ``train`` lock now (its record: host, pid, job_id, since), or None
    when it is free. Asked after training was refused: a live holder is why (the trainer waited
    for it, :data:`trainer.runlock.WAIT_S`, before refusing); a free lock means another cause."""
    from trainer.runlock import RunLock, RunLockHeld

    lock = RunLock(run_dir, "train", wait_s=0, log=lambda _msg: None)
    try:
        lock.acquire()
    except RunLockHeld as e:
        return e.holder
    except OSError:
        return None
    lock.release()
    return None


def run_dir_in_use(run_dir: Path, holder: dict[str, Any]) -> WorkflowError:
    """The train stage's refusal when another live training holds the run dir: nothing is wrong with
    the config or data, so say who it is and how to end it. Exit 2 all the same, as the trainer
    itself refuses a held run dir: a rerun (or a SLURM requeue) cannot make that process go away,
    and a requeued job would only meet it again; the trainer already waits for the holder a while
    (minutes in a requeued SLURM job, for its previous incarnation) before it refuses."""
    from trainer.runlock import holder_text

    pid, host, job = holder.get("pid"), holder.get("host"), holder.get("job_id")
    stop = ""
    if job:
        stop = f"scancel {job}"
    elif pid:
        stop = f"kill -TERM {pid}" + (f" on host {host}" if host else "")
    return WorkflowError(
        f"another training is writing {run_dir}: its train lock is held by {holder_text(holder)}",
        EXIT_REFUSED,
        advice="nothing is wrong with the config or data: wait for that training to end, or stop it"
        + (f" ({stop}: it checkpoints and exits)" if stop else "")
        + ", then run the same command again to resume from its last checkpoint",
    )


def unevaluated(ctx: StageContext) -> list[str]:
    """Committed checkpoints that lack a complete result for some planned eval task, judged as the
    eval jobs compute it: with ``--executor slurm`` on the job's node (``eval.dtype: auto`` is bf16
    there when ``eval.slurm.gpus`` > 0), not on a login node without GPUs (evals.results)."""
    from evals.job import planned_tasks
    from evals.results import all_complete, job_device_type
    from trainer.checkpoint import list_committed

    tasks = planned_tasks(ctx.cfg.eval)
    device_type = job_device_type(ctx.cfg.eval, ctx.executor)
    return [c.name for c in list_committed(ctx.run_dir)
            if not all_complete(c, ctx.cfg.eval, tasks, device_type=device_type)]  # fmt: skip


def _run_eval(ctx: StageContext) -> Outcome:
    from evals.watch import Watcher
    from slurm.executor import local_jobs_end_with_this_process
    from trainer.checkpoint import list_committed

    with local_jobs_end_with_this_process():  # a driver killed without cleanup leaves no eval job running
        watcher = Watcher(ctx.run_dir, ctx.cfg.eval, executor="local", log=ctx.log)  # its executor is built here
        rc = watcher.run(once=True)
    missing = unevaluated(ctx)
    if rc != 0 or missing:
        refused = rc == EXIT_REFUSED  # an eval's data is wrong: fix it first
        exit_line, log = _eval_error(watcher)
        raise WorkflowError(f"evals {'refused' if refused else 'failed'} for {', '.join(missing) or 'some checkpoints'} "
                            f"(see {RunDir(ctx.run_dir).evals})", EXIT_REFUSED if refused else EXIT_FAILURE,
                            exit_line=exit_line, log=log)
    return Outcome(outputs={"checkpoints": len(list_committed(ctx.run_dir))})


def _eval_error(watcher: Watcher) -> tuple[str, str]:
    """(exit line, log) of a failed eval pass: the last error of the first checkpoint that failed
    for good (a refused one first: that is what the exit code says), as the watcher kept it from its
    job, and that job's stderr log (submitit's ``<job>_0_log.err``, which holds its traceback) when
    it is there; a submission that failed has no log of its own."""
    failed = sorted((not e.refused, name) for name, e in watcher.entries.items() if e.status == "failed" and e.errors)
    if not failed:
        return "", ""
    from submitit.core.utils import JobPaths

    entry = watcher.entries[failed[0][1]]
    error = entry.errors[-1]
    if not entry.job_id or error.startswith("submission failed"):
        return error, ""
    log = JobPaths(RunDir(watcher.run_dir).eval_jobs, job_id=entry.job_id, task_id=0).stderr
    return error, str(log) if log.is_file() else ""


def _run_report(ctx: StageContext) -> Outcome:
    from pipelines.report import write_report

    png, csv = write_report(ctx.run_dir, ctx.cfg, log=ctx.log)
    return Outcome(outputs={"png": str(png), "csv": str(csv)})


# ------------------------------------------------------------------------------------ what "done" means


def _verify_data(ctx: StageContext, outputs: dict[str, Any]) -> str | None:
    from dataprep.shards import ShardError, TokenDataset

    try:
        ds = TokenDataset(ctx.cfg.data.output_dir)
    except ShardError as e:
        return str(e)
    want = outputs.get("manifest_fingerprint")
    return None if not want or want == ds.fingerprint else "the shard manifest changed since the data stage ran"


def _verify_train(ctx: StageContext, outputs: dict[str, Any]) -> str | None:
    from trainer.checkpoint import CheckpointError, list_committed, read_meta, verify

    ckpts = list_committed(ctx.run_dir)
    if not ckpts:
        return "no committed checkpoint"
    try:
        verify(ckpts[-1])
        step = int(read_meta(ckpts[-1])["step"])
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        return f"newest checkpoint does not verify: {e}"
    max_steps = ctx.cfg.train.max_steps
    return None if step >= max_steps else f"newest checkpoint is step {step} of {max_steps}"


def _verify_eval(ctx: StageContext, outputs: dict[str, Any]) -> str | None:
    from evals.watch import training_finished

    if not training_finished(ctx.run_dir):  # no checkpoints at all must not read as "all evaluated"
        return "training has not committed its final checkpoint, so not every checkpoint can be evaluated"
    missing = unevaluated(ctx)
    return f"checkpoints without eval results: {', '.join(missing)}" if missing else None


def _verify_report(ctx: StageContext, outputs: dict[str, Any]) -> str | None:
    layout = RunDir(ctx.run_dir)
    missing = [p.name for p in (layout.report_png, layout.report_csv) if not p.exists()]
    return f"missing {', '.join(missing)}" if missing else None


# ------------------------------------------------------------------------------------ SLURM jobs


def _train_resources(cfg: PipelineConfig) -> tuple[SlurmConfig, int]:
    return cfg.slurm, train_gpus(cfg)  # only training gets the big allocation


def _data_resources(cfg: PipelineConfig) -> tuple[SlurmConfig, int]:
    return data_resources(cfg)  # the `ray` section: one node (local Ray) or a Ray cluster across ray.nodes


def _watcher_resources(cfg: PipelineConfig) -> tuple[SlurmConfig, int]:
    # the eval watcher submits the eval jobs (with eval.slurm.*) and is small itself; training's
    # constraint and extra options (--exclusive...) would hold a whole node for the whole run
    return dataclasses.replace(cfg.slurm, nodes=1, cpus_per_task=1, mem_gb=0, constraint="", extra=[]), 0


def _report_resources(cfg: PipelineConfig) -> tuple[SlurmConfig, int]:
    return dataclasses.replace(cfg.slurm, nodes=1, cpus_per_task=1, mem_gb=0, time="00:30:00", constraint="", extra=[]), 0


def cli_argv(*args: str) -> list[str]:
    """``pretrain ARGS`` as a job runs it (this interpreter, so the job uses the same install)."""
    return [sys.executable, "-m", "pipelines.cli", *args]


def _config_arg(ctx: StageContext) -> str:
    return str(Path(ctx.config_path).resolve())


def _data_argv(ctx: StageContext) -> list[str]:
    return data_argv(ctx.config_path, ctx.overrides, ctx.cfg)


def _train_argv(ctx: StageContext) -> list[str]:
    return train_argv(_config_arg(ctx), ctx.overrides, ctx.cfg)


def _eval_argv(ctx: StageContext) -> list[str]:
    return cli_argv("evals", "watch", str(ctx.run_dir), *ctx.overrides, "--executor", "slurm", "--config", _config_arg(ctx))


def _report_argv(ctx: StageContext) -> list[str]:
    return cli_argv("report", str(ctx.run_dir))


def _nothing(cfg: PipelineConfig) -> dict[str, Any]:
    return {}


STAGES: tuple[Stage, ...] = (
    Stage("data", _data_depends, _run_data, _verify_data, _data_resources, _data_argv),
    Stage("train", _train_depends, _run_train, _verify_train, _train_resources, _train_argv),
    Stage("eval", _eval_depends, _run_eval, _verify_eval, _watcher_resources, _eval_argv, after="after"),
    Stage("report", _nothing, _run_report, _verify_report, _report_resources, _report_argv),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise ValueError(f"no stage '{name}' (stages: {', '.join(STAGE_NAMES)})")


def check_slurm_request(cfg: PipelineConfig) -> None:
    """Every stage's request, and each eval job's, must fit the cluster before the first job is queued
    (a refusal names the keys the user sets: ``ray.*`` for the data job, ``eval.slurm.*`` for evals)."""
    for s in STAGES:
        try:
            check_fits(*s.resources(cfg))
        except SlurmError as e:
            raise SlurmError(data_request_error(str(e)) if s.name == "data" else str(e)) from e
    check_eval_request(cfg)


def check_eval_request(cfg: PipelineConfig) -> None:
    """One eval job (``eval.slurm.*``) must fit the cluster; SlurmError naming those keys if not."""
    try:
        check_fits(*eval_job_request(cfg))
    except SlurmError as e:
        raise SlurmError(eval_request_error(str(e))) from e


def submit_stage(s: Stage, ctx: StageContext, dependency: str, cluster: str = "slurm", argv: list[str] | None = None):
    """Submit stage ``s`` as one job (``pretrain-<stage>-<run>``); returns the submitit job."""
    resources, gpus = s.resources(ctx.cfg)
    return submit_job(argv or s.argv(ctx), resources, gpus, ctx.run_dir, f"pretrain-{s.name}-{ctx.run_dir.name}", dependency, cluster)


def submit_eval_watcher(config_path: str, overrides: list[str], cfg: PipelineConfig, executor: str, train_job_id: str):
    """The eval watcher as its own small job, started with training, so every checkpoint gets
    evaluated with no one at the keyboard (its eval jobs use `eval.slurm.*`)."""
    ctx = StageContext(cfg, Path(cfg.run_dir).resolve(), config_path, list(overrides))
    watcher = stage("eval")
    argv = watcher.argv(ctx)
    argv[argv.index("--executor") + 1] = executor
    if executor == "slurm":
        check_eval_request(cfg)
    return submit_stage(watcher, ctx, f"after:{train_job_id}" if executor == "slurm" else "", cluster=executor, argv=argv)
