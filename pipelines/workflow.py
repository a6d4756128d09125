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
  deleted; a data directory is never overwritten: point ``data.output_dir`` somewhere new). A
  restart is refused (exit 2) while something still writes what it would move: a SLURM job of
  those stages still queued or running, or a training or eval watcher holding its run dir lock.

Locally the stages run in the foreground, in order. With ``--executor slurm`` each stage is a
SLURM job chained to the previous one with ``--dependency`` and the command returns at once.

One workflow per run dir: ``RUN_DIR/.locks/workflow.lock`` (see :mod:`trainer.runlock`); a second
``pretrain run`` on the same run dir is refused (exit 2) naming the holder.

The stages themselves are records in :mod:`pipelines.stages` (config they depend on, local runner,
what "done" means, SLURM job); this module only drives them and keeps the state. A stage's local
run *returns* its outcome; a stop signal that interrupts it (see :mod:`pipelines.stopping`) becomes a
returned outcome at the stage boundary, never an exception that escapes the workflow.

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
from typing import Any, Callable, Iterator

from common.durable import atomic_write_json
from common.rundir import RunDir
from pipelines.config import ConfigError, PipelineConfig, load_config
from pipelines.stages import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_REFUSED,
    EXIT_REQUEUE,
    STAGE_NAMES,
    STAGES,
    Outcome,
    Stage,
    StageContext,
    WorkflowError,
)
from pipelines.stopping import is_stop_signal, signals_deferred, stop_signals
from trainer.runlock import RunLock, RunLockHeld

STATE_FORMAT = 1
# stage -> the run dir lock roles (trainer.runlock) of the processes writing what its reset moves
RESET_WRITER_ROLES = {"train": ("train", "evals-watch"), "eval": ("evals-watch",)}

__all__ = ["STAGE_NAMES", "Workflow", "WorkflowError", "run_workflow"]


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
    error: str = ""  # why it failed or stopped: the most telling line the stage had (its output's exit line)
    exit_code: int | None = None  # what a local run of it exited with (1 failed, 2 refused, 3/130 stopped)
    log: str = ""  # the file that holds ``error`` with its context ("": it went to the terminal only)


class Workflow:
    """The run dir's workflow state, and the driver that runs or submits the stages in order."""

    def __init__(self, config_path: str, overrides: list[str], cfg: PipelineConfig, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).resolve()
        self.log = log
        self.ctx = StageContext(cfg, self.run_dir, str(Path(config_path).resolve()), list(overrides), log)
        self.stages: dict[str, StageState] = {s.name: StageState() for s in STAGES}
        self.executor = "local"
        self._load_state()

    @property
    def stop_signal(self) -> int | None:
        return self.ctx.stop_signal

    def record_stop(self, signum: int) -> None:
        """Keep the first stop signal or Ctrl-C (see :func:`pipelines.stopping.stop_signals`)."""
        self.ctx.stop_signal = self.ctx.stop_signal or signum

    # ---------------------------------------------------------------- state

    def _load_state(self) -> None:
        path = RunDir(self.run_dir).workflow_state
        if not path.is_file():
            return
        raw = json.loads(path.read_text())
        if raw.get("format") != STATE_FORMAT:
            raise WorkflowError(f"{path}: workflow state format {raw.get('format')} is not supported")
        self.executor = raw.get("executor", "local")
        known = {f.name for f in dataclasses.fields(StageState)}
        for name, st in raw.get("stages", {}).items():
            if name in self.stages:  # a key a later version added is left out, as a missing one gets its default
                self.stages[name] = StageState(**{k: v for k, v in st.items() if k in known})

    def save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(RunDir(self.run_dir).workflow_state, self.state_record())

    def check_config(self, restart_from: str | None) -> None:
        """Refuse a config that would invalidate a finished stage, unless restarting from it; reset
        the stages from ``restart_from`` on (only when nothing is still writing their outputs)."""
        first_restart = STAGE_NAMES.index(restart_from) if restart_from else len(STAGES)
        for stage in STAGES[:first_restart]:
            st = self.stages[stage.name]
            values = stage.depends_on(self.cfg)
            if st.status in ("done", "submitted", "running", "interrupted") and st.fingerprint and st.fingerprint != fingerprint(values):
                changed = sorted(k for k in set(values) | set(st.config) if values.get(k) != st.config.get(k))
                raise ConfigError(
                    f"the config changed since stage '{stage.name}' ran ({', '.join(changed)}); "
                    f"rerun with --restart-from {stage.name} to redo it and what follows, or restore the old values"
                )
        to_reset = [s.name for s in STAGES[first_restart:] if self.stages[s.name].status != "pending" or self.stages[s.name].job_ids]
        if not to_reset:
            return
        self._refuse_live_jobs(restart_from or "", to_reset)
        with self._writers_locked(restart_from or "", to_reset):
            for name in to_reset:
                self._reset(name)

    def _refuse_live_jobs(self, restart_from: str, names: list[str]) -> None:
        """A restart moves outputs aside and submits the stages again: a job of the old ones still
        queued or running would go on writing into the run dir beside the new one (two trainings on
        one run dir). Refused, naming the jobs to cancel: cancelling them is the user's decision."""
        from slurm.jobs import is_live, job_state

        live = []
        for name in names:
            for job_id in self.stages[name].job_ids[-1:]:
                state = job_state(job_id).state
                if is_live(state):
                    live.append((name, job_id, state))
        if live:
            jobs = ", ".join(f"{name}: job {job_id} {state}" for name, job_id, state in live)
            raise ConfigError(
                f"--restart-from {restart_from}: SLURM jobs of this run are still queued or running ({jobs}); "
                f"cancel them first (scancel {' '.join(j for _, j, _ in live)}) or wait for them to end, then rerun"
            )

    @contextlib.contextmanager
    def _writers_locked(self, restart_from: str, names: list[str]) -> Iterator[None]:
        """Hold the run dir locks of the processes that write what resetting ``names`` moves (a
        training, the eval watcher), so that none of them runs meanwhile; refuse if one does."""
        roles = sorted({role for name in names for role in RESET_WRITER_ROLES.get(name, ())})
        with contextlib.ExitStack() as held:
            for role in roles:
                try:
                    held.enter_context(RunLock(self.run_dir, role, wait_s=0, log=self.log))
                except RunLockHeld as e:
                    raise ConfigError(f"--restart-from {restart_from} would move outputs that are still being written: {e}") from e
            yield

    def _reset(self, name: str) -> None:
        layout = RunDir(self.run_dir)
        if name == "train" and layout.checkpoints.exists():
            archive = self._archive([layout.checkpoints, layout.metrics, layout.tracking_run, layout.tracking_cursor, layout.evals])
            self.log(f"workflow: previous training outputs moved to {archive}")
        if name == "eval":
            # "redo the evals": results are kept while their settings match (evals.results), so
            # a restart moves them aside; each checkpoint's copy goes to checkpoint_evals/STEP
            own = [c / "evals" for c in sorted(layout.checkpoints.glob("step_*")) if (c / "evals").is_dir()]
            if own or layout.evals.exists():
                archive = self._archive([layout.evals], {p: Path("checkpoint_evals") / p.parent.name for p in own})
                self.log(f"workflow: previous eval results moved to {archive}")
        if name == "data" and (Path(self.cfg.data.output_dir) / "manifest.json").exists():
            raise ConfigError(
                f"--restart-from data: {self.cfg.data.output_dir} already holds a finished dataset and is never "
                "overwritten; set data.output_dir to a new directory (or delete it yourself)"
            )
        self.stages[name] = StageState()

    def _archive(self, items: list[Path], renamed: dict[Path, Path] | None = None) -> Path:
        """Move ``items`` (those that exist) and ``renamed`` (source -> path inside the archive)
        into a fresh ``RUN_DIR/archive/<time>/``: outputs a restart replaces are kept, never deleted."""
        stamp = RunDir(self.run_dir).archive / time.strftime("%Y%m%d-%H%M%S")
        archive, n = stamp, 0
        while archive.exists():  # two restarts within a second: never mix their outputs
            n += 1
            archive = stamp.with_name(f"{stamp.name}-{n}")
        moves = {item: Path(item.name) for item in items if item.exists()} | dict(renamed or {})
        for source, inside in moves.items():
            if not source.exists():  # pruned by a still-running training since it was listed
                continue
            (archive / inside).parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.move(str(source), archive / inside)
            except FileNotFoundError:  # ... or while being moved
                continue
        return archive

    def verify(self, name: str) -> str | None:
        """None if the stage's outputs are there and sound, else why not."""
        stage = next(s for s in STAGES if s.name == name)
        return stage.verify(dataclasses.replace(self.ctx, executor=self.executor), self.stages[name].outputs)

    def _begin(self, stage: Stage, status: str = "running") -> StageState:
        st = self.stages[stage.name]
        values = stage.depends_on(self.cfg)
        st.status, st.fingerprint, st.config = status, fingerprint(values), values
        st.attempts += 1
        st.started, st.ended, st.error, st.exit_code, st.log = time.time(), None, "", None, ""
        return st

    def _end(self, name: str, status: str, error: str = "", exit_code: int | None = None, log: str = "") -> None:
        st = self.stages[name]
        st.status, st.ended, st.error, st.exit_code, st.log = status, time.time(), error, exit_code, log
        self.save()

    # ---------------------------------------------------------------- local execution

    def run_local(self) -> int:
        self.executor = "local"
        for stage in STAGES:
            if not self._needs_run(stage.name):
                continue
            self._begin(stage)
            self.save()
            outcome = self._run_stage(stage)
            if not outcome.done:
                self._end(stage.name, "interrupted", outcome.why, outcome.code)
                self._log_stopped(stage.name, outcome)
                return outcome.code
            self.stages[stage.name].outputs = outcome.outputs
            self._end(stage.name, "done")
        self._log_finished()
        return 0

    def _needs_run(self, name: str) -> bool:
        st = self.stages[name]
        if st.status == "done":
            problem = self.verify(name)
            if problem is None:
                self.log(f"workflow: {name}: done (outputs verified), skipping")
                return False
            self.log(f"workflow: {name}: marked done but {problem}: running it again")
        elif st.status in ("interrupted", "running"):
            self.log(f"workflow: {name}: resuming an interrupted run")
        elif st.status == "failed":
            self.log(f"workflow: {name}: retrying after a failure ({st.error})")
        return True

    def _run_stage(self, stage: Stage) -> Outcome:
        """The stage's outcome; a stop signal or Ctrl-C that interrupted it is one too (resumable).
        A failure is recorded and raised as a WorkflowError carrying its exit code."""
        try:
            return stage.run_local(self.ctx)
        except KeyboardInterrupt:
            if not is_stop_signal(self.stop_signal):
                return Outcome(EXIT_INTERRUPTED, why="interrupted by the user")
            return Outcome(EXIT_REQUEUE, why=f"stopped by {signal.Signals(self.stop_signal).name}")
        except Exception as e:
            code = e.code if isinstance(e, WorkflowError) else EXIT_REFUSED if isinstance(e, RunLockHeld) else EXIT_FAILURE
            self._end(stage.name, "failed", getattr(e, "exit_line", "") or f"{type(e).__name__}: {e}", code, getattr(e, "log", ""))
            advice = getattr(e, "advice", "") or ("fix the config or data, then run the same command again" if code == EXIT_REFUSED
                                                  else "fix the cause and run the same command again to resume")
            raise WorkflowError(f"stage '{stage.name}' {'refused' if code == EXIT_REFUSED else 'failed'}: {e}\n{advice}", code) from e

    def _log_stopped(self, name: str, outcome: Outcome) -> None:
        if outcome.why.startswith("training checkpointed"):
            self.log("workflow: training checkpointed on a stop signal; run the same command again to resume")
        elif outcome.code == EXIT_REQUEUE:
            self.log(f"workflow: {outcome.why} during '{name}' (exit {EXIT_REQUEUE}); run the same command again to resume")
        else:
            self.log(f"workflow: interrupted during '{name}'; run the same command again to resume")

    def _log_finished(self) -> None:
        from trainer.tracking_mlflow import read_run_file

        layout = RunDir(self.run_dir)
        self.log(f"workflow: all stages done for {self.run_dir}")
        self.log(f"  overview:  pretrain status {self.run_dir}")
        self.log(f"  curves:    {layout.report_png} (data: {layout.report_csv.name})")
        recorded = read_run_file(self.run_dir)  # a local store is found relative to the run dir
        uri = (recorded or {}).get("uri", "")
        if uri.startswith("sqlite:"):
            self.log(f"  MLflow UI: mlflow ui --backend-store-uri {uri}")
        elif uri:
            self.log(f"  MLflow:    {uri}")

    # ---------------------------------------------------------------- SLURM execution

    def submit_slurm(self) -> int:
        """Submit the remaining stages as chained SLURM jobs and return."""
        from pipelines.stages import check_slurm_request, submit_stage

        self.executor = "slurm"
        check_slurm_request(self.cfg)  # every problem before anything is queued
        previous, fresh = "", False  # the job the next stage follows; whether it was submitted just now
        for stage in STAGES:
            keep = self._still_submitted(stage.name, after_new=fresh)
            if keep is not None:
                previous, fresh = keep or previous, False
                continue
            st = self._begin(stage, "submitted")
            # eval watches training while it runs; the others wait for their predecessor to succeed
            dependency = f"{stage.after}:{previous}" if previous else ""
            with signals_deferred():  # a job queued is a job recorded: a rerun must not queue a twin
                job = submit_stage(stage, self.ctx, dependency)
                st.job_ids.append(str(job.job_id))
                self.save()
            self.log(f"workflow: {stage.name}: submitted job {job.job_id}" + (f" ({dependency})" if dependency else ""))
            previous, fresh = str(job.job_id), True
        self.log(f"workflow: follow it with `pretrain status {self.run_dir}`")
        return 0

    def _rechain(self, name: str, job_id: str) -> bool:
        """Whether the still queued job of stage ``name`` was cancelled, to be submitted again after
        its predecessor's job of now. It waits for an old job of the predecessor, which ended without
        success: SLURM keeps it pending for ever (DependencyNeverSatisfied), and a rerun that left it
        so never got past that stage. A job that has started meanwhile is left alone."""
        from slurm.jobs import cancel_if_pending

        if not cancel_if_pending(job_id):
            return False
        self.log(f"workflow: {name}: job {job_id} was queued behind a job that failed or was replaced; "
                 "cancelled it, submitting it again")
        return True

    def _still_submitted(self, name: str, after_new: bool = False) -> str | None:
        """None if the stage must be submitted; otherwise the job id the next stage depends on
        ("" when the stage is done). ``after_new``: its predecessor was submitted again just now,
        so a job of this stage still queued waits for the old one; so does one that SLURM says will
        never start (see :meth:`_rechain`)."""
        from slurm.jobs import is_live, job_state, never_starts

        st = self.stages[name]
        if st.status == "done" and self.verify(name) is None:
            self.log(f"workflow: {name}: done (outputs verified), skipping")
            return ""
        if st.status == "submitted" and st.job_ids:
            state = job_state(st.job_ids[-1]).state
            if is_live(state):
                if state == "PENDING" and (after_new or never_starts(st.job_ids[-1])) and self._rechain(name, st.job_ids[-1]):
                    return None
                self.log(f"workflow: {name}: job {st.job_ids[-1]} is {state}, leaving it")
                return st.job_ids[-1]
            if self._ended_well(name, state):
                self._end(name, "done")
                return ""
            self.log(f"workflow: {name}: job {st.job_ids[-1]} ended {state}; submitting it again")
        elif st.status == "failed":
            self.log(f"workflow: {name}: retrying after a failure ({st.error or 'no error kept'})")
        return None

    def _ended_well(self, name: str, state: str) -> bool:
        """A stage's last job finished and its outputs verify. UNKNOWN counts as finished: a job
        neither scontrol nor sacct knows (accounting off or purged) is long gone, and verified
        outputs say how it ended; resubmitting would redo a finished stage."""
        return (state == "COMPLETED" or state.startswith("UNKNOWN")) and self.verify(name) is None

    def refresh_slurm(self, save: bool = True) -> None:
        """Turn finished SLURM jobs into stage statuses (for `status` and reruns). `status` passes
        ``save=False``: it holds no lock, and writing its copy back could erase the job ids a
        concurrent `pretrain run` has just saved."""
        from slurm.jobs import FAILED_STATES, job_state

        changed = False
        for name, st in self.stages.items():
            if st.status == "submitted" and st.job_ids:
                state = job_state(st.job_ids[-1]).state
                if self._ended_well(name, state):
                    st.status, st.ended, changed = "done", time.time(), True
                elif state in FAILED_STATES:
                    st.status, st.error, changed = "failed", f"job {st.job_ids[-1]} {state}", True
        if changed and save:
            self.save()

    def state_record(self) -> dict[str, Any]:
        """What :meth:`save` writes to ``workflow.json``."""
        return {
            "format": STATE_FORMAT, "config_path": self.ctx.config_path, "overrides": self.ctx.overrides,
            "executor": self.executor, "stages": {n: dataclasses.asdict(s) for n, s in self.stages.items()},
        }  # fmt: skip


def run_workflow(config_path: str, overrides: list[str], executor: str, restart_from: str | None) -> int:
    cfg = load_config(config_path, overrides)
    if restart_from and restart_from not in STAGE_NAMES:
        raise ConfigError(f"--restart-from must be one of {', '.join(STAGE_NAMES)}, got '{restart_from}'")
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
        with stop_signals(wf.record_stop):
            try:
                return wf.run_local()
            except WorkflowError as e:
                print(f"pretrain run: {e}", file=sys.stderr)
                return e.code
    finally:
        lock.release()
