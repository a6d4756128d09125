"""`pretrain run`: data → train → eval of every checkpoint → report, as one resumable workflow.

State lives in ``RUN_DIR/workflow.json`` (atomic writes): each stage's status, the config it ran
with (as a fingerprint and as values, to name what changed), attempts, SLURM job ids, times and
the last error. Running the same command again resumes:

* a stage marked done is skipped only after its outputs verify (the shard manifest and headers,
  the final committed checkpoint, an eval result for every checkpoint, the report files);
* an interrupted stage simply runs again: the data stage skips its finished Ray tasks and the
  trainer resumes from its newest committed checkpoint;
* a finished stage whose config changed is refused, naming the keys, unless ``--restart-from``
  names it or an earlier stage (training outputs are then moved to ``RUN_DIR/archive/``, never
  deleted; a data directory is never overwritten: point ``data.output_dir`` somewhere new).

Locally the stages run in the foreground, in order. With ``--executor slurm`` each stage is a
SLURM job chained to the previous one with ``--dependency`` and the command returns at once.

One workflow per run dir: ``RUN_DIR/.locks/workflow.lock`` (see :mod:`trainer.runlock`); a second
``pretrain run`` on the same run dir is refused (exit 2) naming the holder.

Exit codes (as everywhere): 0 all stages done; 1 a stage failed and a rerun may help; 2 refused (a
config or data problem, or the run dir is in use); 3 stopped by SIGTERM/SIGUSR2 with everything
resumable (training checkpointed), "requeue me"; 130 interrupted with Ctrl-C (also resumable).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from common.durable import atomic_write_json
from common.rundir import RunDir
from dataprep.shards import ShardError, TokenDataset
from pipelines.config import ConfigError, PipelineConfig, flatten, load_config, to_dict
from trainer.config import RESUME_RUNTIME_KEYS
from trainer.runlock import RunLock, RunLockHeld

STAGES = ("data", "train", "eval", "report")
STATE_FORMAT = 1
# Keys that change how a stage runs but not what it produces: changing them never invalidates it.
RUNTIME_KEYS = {
    "data": {"cache_dir", "download_retries", "keep_work"},
    "train": set(RESUME_RUNTIME_KEYS),  # the trainer's own list of what a resume may change
    "eval": {"slurm", "poll_s", "max_retries", "device", "batch_size", "max_parallel", "order", "tracking_uri"},
}


EXIT_OK, EXIT_FAILURE, EXIT_REFUSED, EXIT_REQUEUE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class WorkflowError(RuntimeError):
    """A stage failed or the workflow cannot proceed; the message says what to do.

    ``code`` is the exit code it means: 1 (a rerun may help) or 2 (refused: fix the config/data)."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


class StopRequested(KeyboardInterrupt):
    """SIGTERM/SIGUSR2 reached the workflow: stop the running stage as an interruption (resumable).

    A KeyboardInterrupt so that every stage's interrupt handling (Ray shutdown, eval job
    cancellation) runs, and no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stage_config(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The config values a stage's outputs depend on (flattened)."""
    d = to_dict(cfg)
    if stage == "data":
        values = {f"data.{k}": v for k, v in flatten(d["data"]).items() if k not in RUNTIME_KEYS["data"]}
    elif stage == "train":
        values = {f"model.{k}": v for k, v in flatten(d["model"]).items()}
        values.update({f"train.{k}": v for k, v in flatten(d["train"]).items() if k not in RUNTIME_KEYS["train"]})
        values.update(stage_config(cfg, "data"))
    elif stage == "eval":
        values = {f"eval.{k}": v for k, v in flatten(d["eval"]).items() if k.split(".")[0] not in RUNTIME_KEYS["eval"]}
    else:
        values = {}
    return values


def fingerprint(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass
class StageState:
    status: str = "pending"  # pending | running | submitted | done | interrupted | failed
    fingerprint: str = ""
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    attempts: int = 0
    started: float | None = None
    ended: float | None = None
    job_ids: list[str] = dataclasses.field(default_factory=list)
    outputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str = ""


class TrainingStopped(Exception):
    """Training exited 3 (checkpointed on a stop signal); ``code`` is what the workflow exits with."""

    def __init__(self, code: int) -> None:
        super().__init__(f"exit {code}")
        self.code = code


class Workflow:
    """The run dir's workflow state, and the stage implementations that update it."""

    def __init__(self, config_path: str, overrides: list[str], cfg: PipelineConfig, log: Callable[[str], None] = print):
        self.config_path = str(Path(config_path).resolve())
        self.overrides = list(overrides)
        self.stop_signal: int | None = None  # the first stop signal this process got (see stop_signals)
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).resolve()
        self.log = log
        self.stages: dict[str, StageState] = {s: StageState() for s in STAGES}
        self.executor = "local"
        path = RunDir(self.run_dir).workflow_state
        if path.is_file():
            raw = json.loads(path.read_text())
            if raw.get("format") != STATE_FORMAT:
                raise WorkflowError(f"{path}: workflow state format {raw.get('format')} is not supported")
            self.executor = raw.get("executor", "local")
            for name, st in raw.get("stages", {}).items():
                if name in self.stages:
                    self.stages[name] = StageState(**st)

    # ---------------------------------------------------------------- state

    def save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(RunDir(self.run_dir).workflow_state, {
            "format": STATE_FORMAT, "config_path": self.config_path, "overrides": self.overrides,
            "executor": self.executor, "stages": {n: dataclasses.asdict(s) for n, s in self.stages.items()},
        })  # fmt: skip

    def check_config(self, restart_from: str | None) -> None:
        """Refuse a config that would invalidate a finished stage, unless restarting from it."""
        first_restart = STAGES.index(restart_from) if restart_from else len(STAGES)
        for i, name in enumerate(STAGES):
            st = self.stages[name]
            values = stage_config(self.cfg, name)
            if i >= first_restart:
                if st.status != "pending" or st.job_ids:
                    self._reset(name)
                continue
            if st.status in ("done", "submitted", "running", "interrupted") and st.fingerprint and st.fingerprint != fingerprint(values):
                changed = sorted(k for k in set(values) | set(st.config) if values.get(k) != st.config.get(k))
                raise ConfigError(
                    f"the config changed since stage '{name}' ran ({', '.join(changed)}); "
                    f"rerun with --restart-from {name} to redo it and what follows, or restore the old values"
                )

    def _reset(self, name: str) -> None:
        layout = RunDir(self.run_dir)
        if name == "train" and layout.checkpoints.exists():
            archive = layout.archive / time.strftime("%Y%m%d-%H%M%S")
            archive.mkdir(parents=True, exist_ok=True)
            for item in (layout.checkpoints, layout.metrics, layout.tracking_run, layout.tracking_cursor, layout.evals):
                if item.exists():
                    shutil.move(str(item), archive / item.name)
            self.log(f"workflow: previous training outputs moved to {archive}")
        if name == "data" and (Path(self.cfg.data.output_dir) / "manifest.json").exists():
            raise ConfigError(
                f"--restart-from data: {self.cfg.data.output_dir} already holds a finished dataset and is never "
                "overwritten; set data.output_dir to a new directory (or delete it yourself)"
            )
        self.stages[name] = StageState()

    # ---------------------------------------------------------------- verification

    def verify(self, name: str) -> str | None:
        """None if the stage's outputs are there and sound, else why not."""
        from trainer.checkpoint import CheckpointError, list_committed, read_meta, verify

        if name == "data":
            try:
                ds = TokenDataset(self.cfg.data.output_dir)
            except ShardError as e:
                return str(e)
            want = self.stages["data"].outputs.get("manifest_fingerprint")
            return None if not want or want == ds.fingerprint else "the shard manifest changed since the data stage ran"
        if name == "train":
            ckpts = list_committed(self.run_dir)
            if not ckpts:
                return "no committed checkpoint"
            try:
                verify(ckpts[-1])
                step = int(read_meta(ckpts[-1])["step"])
            except (CheckpointError, OSError, ValueError, KeyError) as e:
                return f"newest checkpoint does not verify: {e}"
            return None if step >= self.cfg.train.max_steps else f"newest checkpoint is step {step} of {self.cfg.train.max_steps}"
        if name == "eval":
            missing = self.unevaluated()
            return f"checkpoints without eval results: {', '.join(missing)}" if missing else None
        if name == "report":
            from pipelines.report import report_paths

            missing = [p.name for p in report_paths(self.run_dir) if not p.exists()]
            return f"missing {', '.join(missing)}" if missing else None
        raise ValueError(name)

    def unevaluated(self) -> list[str]:
        from evals.job import planned_tasks
        from evals.results import checkpoint_id, is_complete
        from trainer.checkpoint import list_committed

        tasks = planned_tasks(self.cfg.eval)
        return [c.name for c in list_committed(self.run_dir) if not all(is_complete(c, t, checkpoint_id(c), self.cfg.eval.limit) for t in tasks)]

    # ---------------------------------------------------------------- local execution

    def run_local(self) -> int:
        self.executor = "local"
        for name in STAGES:
            st = self.stages[name]
            if st.status == "done":
                problem = self.verify(name)
                if problem is None:
                    self.log(f"workflow: {name}: done (outputs verified), skipping")
                    continue
                self.log(f"workflow: {name}: marked done but {problem}: running it again")
            elif st.status in ("interrupted", "running"):
                self.log(f"workflow: {name}: resuming an interrupted run")
            elif st.status == "failed":
                self.log(f"workflow: {name}: retrying after a failure ({st.error})")
            self._begin(name)
            try:
                getattr(self, f"_local_{name}")()
            except TrainingStopped as e:
                self._end(name, "interrupted", "training checkpointed on a stop signal")
                self.log("workflow: training checkpointed on a stop signal; run the same command again to resume")
                return e.code
            except KeyboardInterrupt:
                if self.stop_signal not in (None, signal.SIGINT):
                    how = signal.Signals(self.stop_signal).name
                    self._end(name, "interrupted", f"stopped by {how}")
                    self.log(f"workflow: stopped by {how} during '{name}' (exit {EXIT_REQUEUE}); run the same command again to resume")
                    return EXIT_REQUEUE
                self._end(name, "interrupted", "interrupted by the user")
                self.log(f"workflow: interrupted during '{name}'; run the same command again to resume")
                return EXIT_INTERRUPTED
            except Exception as e:
                self._end(name, "failed", f"{type(e).__name__}: {e}")
                code = e.code if isinstance(e, WorkflowError) else EXIT_REFUSED if isinstance(e, RunLockHeld) else EXIT_FAILURE
                advice = "fix the config or data, then run the same command again" if code == EXIT_REFUSED else \
                    "fix the cause and run the same command again to resume"
                raise WorkflowError(f"stage '{name}' failed: {e}\n{advice}", code) from e
            self._end(name, "done")
        self.log(f"workflow: all stages done for {self.run_dir}")
        self.log(f"  overview:  pretrain status {self.run_dir}")
        self.log(f"  curves:    {self.run_dir / 'report.png'} (data: report.csv)")
        from trainer.tracking_mlflow import read_run_file

        recorded = read_run_file(self.run_dir)  # a local store is found relative to the run dir
        if recorded:
            uri = recorded.get("uri", "")
            if uri.startswith("sqlite:"):
                self.log(f"  MLflow UI: mlflow ui --backend-store-uri {uri}")
            elif uri:
                self.log(f"  MLflow:    {uri}")
        return 0

    def _begin(self, name: str) -> None:
        st = self.stages[name]
        values = stage_config(self.cfg, name)
        st.status, st.fingerprint, st.config = "running", fingerprint(values), values
        st.attempts += 1
        st.started, st.ended, st.error = time.time(), None, ""
        self.save()

    def _end(self, name: str, status: str, error: str = "") -> None:
        st = self.stages[name]
        st.status, st.ended, st.error = status, time.time(), error
        self.save()

    def _local_data(self) -> None:
        from dataprep.errors import DataError
        from dataprep.pipeline import run_data_stage

        try:
            run_data_stage(self.cfg.data, self.cfg.ray)
        except DataError as e:
            raise WorkflowError(str(e), getattr(e, "exit_code", EXIT_FAILURE)) from e
        ds = TokenDataset(self.cfg.data.output_dir)
        self.stages["data"].outputs = {"output_dir": str(Path(self.cfg.data.output_dir).resolve()), "manifest_fingerprint": ds.fingerprint,
                                       "shards": len(ds.shards)}  # fmt: skip

    def _local_train(self) -> None:
        from trainer import EXIT_OK, EXIT_REQUEUE
        from trainer.launch import train_command

        rc = train_command(to_dict(self.cfg))
        if rc == EXIT_REQUEUE:
            # checkpointed on a stop signal: Ctrl-C (SIGINT seen here) keeps meaning 130, anything else 3
            raise TrainingStopped(EXIT_INTERRUPTED if self.stop_signal == signal.SIGINT else EXIT_REQUEUE)
        if rc != EXIT_OK:
            raise WorkflowError(f"pretrain train exited with {rc}", EXIT_REFUSED if rc == EXIT_REFUSED else EXIT_FAILURE)
        from trainer.checkpoint import latest_committed

        self.stages["train"].outputs = {"final_checkpoint": str(latest_committed(self.run_dir))}

    def _local_eval(self) -> None:
        from evals.watch import Watcher

        rc = Watcher(self.run_dir, self.cfg.eval, executor="local", log=self.log).run(once=True)
        missing = self.unevaluated()
        if rc != 0 or missing:
            raise WorkflowError(f"evals failed for {', '.join(missing) or 'some checkpoints'} (see {self.run_dir / 'evals'})")
        from trainer.checkpoint import list_committed

        self.stages["eval"].outputs = {"checkpoints": len(list_committed(self.run_dir))}

    def _local_report(self) -> None:
        from pipelines.report import write_report

        png, csv = write_report(self.run_dir, self.cfg, log=self.log)
        self.stages["report"].outputs = {"png": str(png), "csv": str(csv)}

    # ---------------------------------------------------------------- SLURM execution

    def submit_slurm(self) -> int:
        """Submit the remaining stages as chained SLURM jobs and return."""
        from pipelines.launching import check_slurm_request, stage_argv, submit_stage
        from slurm.jobs import job_state

        self.executor = "slurm"
        check_slurm_request(self.cfg)  # every problem before anything is queued
        previous = ""
        for name in STAGES:
            st = self.stages[name]
            if st.status == "done" and self.verify(name) is None:
                self.log(f"workflow: {name}: done (outputs verified), skipping")
                continue
            if st.status == "submitted" and st.job_ids:
                state = job_state(st.job_ids[-1]).state
                if state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED"):
                    self.log(f"workflow: {name}: job {st.job_ids[-1]} is {state}, leaving it")
                    previous = st.job_ids[-1]
                    continue
                if state == "COMPLETED" and self.verify(name) is None:
                    self._end(name, "done")
                    continue
                self.log(f"workflow: {name}: job {st.job_ids[-1]} ended {state}; submitting it again")
            values = stage_config(self.cfg, name)
            st.status, st.fingerprint, st.config = "submitted", fingerprint(values), values
            st.attempts += 1
            # eval watches training while it runs; the others wait for their predecessor to succeed
            dependency = f"{'after' if name == 'eval' else 'afterok'}:{previous}" if previous else ""
            job = submit_stage(name, stage_argv(name, self.config_path, self.overrides, self.run_dir, self.cfg), self.cfg, dependency)
            st.job_ids.append(str(job.job_id))
            st.started = time.time()
            self.save()
            self.log(f"workflow: {name}: submitted job {job.job_id}" + (f" ({dependency})" if dependency else ""))
            previous = str(job.job_id)
        self.log(f"workflow: follow it with `pretrain status {self.run_dir}`")
        return 0

    def refresh_slurm(self) -> None:
        """Turn finished SLURM jobs into stage statuses (for `status` and reruns)."""
        from slurm.jobs import job_state

        changed = False
        for name, st in self.stages.items():
            if st.status == "submitted" and st.job_ids:
                state = job_state(st.job_ids[-1]).state
                if state == "COMPLETED" and self.verify(name) is None:
                    st.status, st.ended, changed = "done", time.time(), True
                elif state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                    st.status, st.error, changed = "failed", f"job {st.job_ids[-1]} {state}", True
        if changed:
            self.save()


@contextlib.contextmanager
def stop_signals(wf: Workflow) -> Any:
    """While the local stages run: SIGTERM/SIGUSR2 raise :class:`StopRequested` in the main thread,
    and SIGINT a KeyboardInterrupt; both are also recorded on ``wf`` because a library in between
    may turn the exception into another interruption (Ray re-raises a plain KeyboardInterrupt).

    During training the launcher installs its own SIGTERM/SIGUSR2 handlers (it forwards them to the
    workers, which checkpoint and exit 3) and swallows the KeyboardInterrupt of a Ctrl-C; the
    recorded SIGINT is how the workflow still exits 130 for it."""

    def stop(signum: int, frame: Any) -> None:
        wf.stop_signal = wf.stop_signal or signum
        raise StopRequested(signum)

    def interrupt(signum: int, frame: Any) -> None:
        wf.stop_signal = wf.stop_signal or signum
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGUSR2)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_workflow(config_path: str, overrides: list[str], executor: str, restart_from: str | None) -> int:
    cfg = load_config(config_path, overrides)
    if restart_from and restart_from not in STAGES:
        raise ConfigError(f"--restart-from must be one of {', '.join(STAGES)}, got '{restart_from}'")
    run_dir = Path(cfg.run_dir).resolve()
    try:
        lock = RunLock(run_dir, "workflow").acquire()
    except RunLockHeld as e:
        print(f"pretrain run: refused: {e}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        wf = Workflow(config_path, overrides, cfg)
        if wf.executor == "slurm":
            wf.refresh_slurm()
        wf.check_config(restart_from)
        wf.save()
        if executor == "slurm":
            return wf.submit_slurm()
        with stop_signals(wf):
            try:
                return wf.run_local()
            except WorkflowError as e:
                print(f"pretrain run: {e}", file=sys.stderr)
                return e.code
    finally:
        lock.release()
