"""`pretrain evals watch`: one eval job per committed checkpoint, until training is over.

Each scan lists committed checkpoints (marker present; never a partial one), skips those whose
results are complete (file + MLflow, see :mod:`evals.results`), and submits one job per remaining
checkpoint through submitit (``local`` subprocesses or ``slurm`` jobs with ``eval.slurm.*``),
``eval.order`` newest or oldest first, at most ``eval.max_parallel`` in flight.

* Idempotent: the results files are the truth, so rerunning the watcher (or running
  ``pretrain eval`` by hand) never evaluates a checkpoint twice.
* Retries: a job that fails is resubmitted up to ``eval.max_retries`` times, then reported as
  failed (exit status 1; 2 when a job was refused because its eval data is wrong, which is not
  retried); its error is kept in the state file. Rerunning the watcher gives such
  checkpoints fresh retries (the rerun is how one says the cause is fixed); an attempt cut short
  by Ctrl-C or a stop signal is not counted.
* Retention: a checkpoint deleted by keep-last-K before its job ran is skipped with a message
  (the job itself also checks, and the watcher never re-creates the directory).
* End of training: the newest committed checkpoint has reached its own config's ``train.max_steps`` (the trainer always commits a final checkpoint at max_steps).
  A ``--executor slurm`` watcher also stops when the run's newest recorded training job (in
  ``RUN_DIR/slurm/jobs.jsonl``) has ended without that checkpoint (FAILED, CANCELLED...; a
  requeue is not an end): it evaluates what was committed and exits 1, instead of polling until
  its own time limit and being requeued.
  Without ``--once`` the watcher polls every ``eval.poll_s`` until then and every checkpoint is
  resolved. ``--once`` does one listing, runs (and retries) the jobs for it, and waits for them:
  local jobs die with the process that started them.
* State: ``RUN_DIR/evals/watch.json`` (written atomically); ``RunLock(run_dir, "evals-watch")``
  keeps a second watcher of the same run out (refused, naming the holder). Job logs:
  ``RUN_DIR/evals/jobs/``.
* No pickle is read: submitit's ``<job>_0_result.pkl`` lives in the run dir, which anyone who can
  write there could replace with one that runs code when unpickled. A job's outcome comes from
  what it wrote as JSON instead: the results files (the truth) and a per-attempt status file
  (``RUN_DIR/evals/jobs/<step>.attempt<N>.status.json``) that only supplies the error message.
  Job ids read back from ``watch.json`` are checked to be plain numbers before they are used.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from common.rundir import RunDir
from evals.config import EvalConfig
from slurm.executor import KINDS, JobResources, build_executor
from slurm.jobs import FAILED_STATES, job_ended, job_state
from slurm.resources import SlurmError, parse_time_minutes
from evals.job import planned_tasks, run_job
from evals.results import all_complete, checkpoint_id, format_scores, job_device_type, read_result, write_json_atomic
from trainer.checkpoint import MARKER, CheckpointError, list_committed, read_meta
from trainer.runlock import RunLock

LOCK_ROLE = "evals-watch"
CANCEL_WAIT_S = 10.0  # a cancelled local eval job unwinds in about a second
# submitit job ids: a local job's pid, a SLURM job id (array jobs: 123_4)
JOB_ID_RE = re.compile(r"^[0-9]{1,12}(_[0-9]{1,9})?$")


class WatchError(RuntimeError):
    pass


def training_finished(run_dir: Path) -> bool:
    for ckpt in reversed(list_committed(run_dir)):
        try:
            meta = read_meta(ckpt)
        except (OSError, ValueError, CheckpointError):  # deleted by retention meanwhile
            continue
        max_steps = ((meta.get("config") or {}).get("train") or {}).get("max_steps")
        return max_steps is not None and int(meta["step"]) >= int(max_steps)
    return False


# a training job in one of these states runs no more; a PREEMPTED one is being requeued
TRAINING_JOB_ENDED = ("COMPLETED", *(s for s in FAILED_STATES if s != "PREEMPTED"))
TRAINING_GONE_GRACE_S = 10.0  # how long it must stay so before the watcher believes it (a requeue passes through states)


def training_job(run_dir: Path) -> str | None:
    """The newest SLURM job recorded to train ``run_dir`` (`pretrain run --executor slurm`'s train
    stage, or `pretrain submit`), or None."""
    from slurm.submit import recorded_jobs

    layout = RunDir(run_dir)
    names = {f"pretrain-train-{run_dir.name}", f"pretrain-{run_dir.name}"}
    jobs = [j for j in recorded_jobs(layout.slurm) if j.get("name") in names and j.get("cluster") == "slurm"]
    return jobs[-1]["job_id"] if jobs else None


def training_job_ended(run_dir: Path) -> str | None:
    """Why no training is coming for ``run_dir`` ("training job 12 FAILED"), or None while its SLURM
    job is queued, running or being requeued, or when none is known (a training started by hand)."""
    job_id = training_job(run_dir)
    if job_id is None:
        return None
    state = job_state(job_id).state
    return f"training job {job_id} {state}" if state in TRAINING_JOB_ENDED else None


def make_executor(kind: str, folder: Path, cfg: EvalConfig) -> Any:
    """A submitit executor: ``local`` (subprocesses) or ``slurm`` (``eval.slurm.*`` resources)."""
    s = cfg.slurm
    try:
        minutes = parse_time_minutes(s.time) if kind in KINDS else 0  # an unknown kind is the error to report
    except SlurmError as e:
        raise WatchError(f"eval.slurm.time: {e}") from e
    resources = JobResources(timeout_min=minutes, nodes=1, gpus_per_node=s.gpus, cpus_per_task=s.cpus, mem_gb=s.mem_gb,
                             partition=s.partition, account=s.account, qos=s.qos)
    try:
        return build_executor(kind, folder, resources, "pretrain-eval")
    except SlurmError as e:
        raise WatchError(str(e)) from e


def _error_line(ex: BaseException) -> str:
    """The job's own exception line out of submitit's FailedJobError text (traceback + log paths)."""
    lines = [ln.strip() for ln in str(ex).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*:", ln):
            return ln
    return lines[0] if lines else type(ex).__name__


class _ForeignLocalJob:
    """A local job (a process; its id is the pid) started by an earlier watcher process.

    submitit's LocalJob needs the Popen handle to know whether the job runs; without it the pid
    and the presence of the result pickle tell the same (the pickle is never opened).
    """

    def __init__(self, folder: Path, job_id: str):
        from submitit.local.local import LocalJob

        self.job_id = job_id
        self._job = LocalJob(folder=folder, job_id=job_id)

    def ran_to_its_end(self) -> bool:
        """submitit writes the result pickle when the job function returns or raises an Exception
        (never opened here); a job interrupted (KeyboardInterrupt) or killed leaves none."""
        return self._job.paths.result_pickle.exists()

    def done(self) -> bool:
        if self.ran_to_its_end():
            return True
        try:  # alive, and still a submitit job (not a recycled pid)?
            return b"submitit" not in Path(f"/proc/{int(self.job_id)}/cmdline").read_bytes()
        except (OSError, ValueError):
            return True

    def cancel(self, check: bool = False) -> None:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(self.job_id), signal.SIGINT)


def _died_with_its_watcher(job: Any, status: dict[str, Any]) -> bool:
    """Whether an attempt without results was cut short by the death of the watcher that started it.

    Every local job is tied to its watcher (:func:`slurm.executor.local_jobs_end_with_this_process`):
    when the watcher dies without cleanup (SIGKILL, the OOM killer, a closed terminal), the job's
    controller gets SIGINT and interrupts the job, as Ctrl-C would, and kills it a second later. A
    job interrupted inside ``run_job`` writes "stopped"; one interrupted earlier (while it starts:
    unpickling, importing torch, 2-5 s of every job) or killed before it wrote anything leaves no
    status and no submitit result at all. A job that *fails* leaves both ("failed", and submitit's
    error result), and one that crashes while its watcher lives is collected by that watcher. So a
    local job of an earlier watcher (one this process did not start) that ended without a word was
    stopped, not failed, and does not count: otherwise a few driver kills would use up
    ``eval.max_retries`` and leave the checkpoint unevaluated for good. SLURM jobs are not tied to
    their watcher and count as before."""
    return isinstance(job, _ForeignLocalJob) and not status and not job.ran_to_its_end()


@dataclass
class Entry:
    """What the watcher knows about one checkpoint (keyed by its step directory name)."""

    step: int
    ckpt_id: str
    status: str = "new"  # new | running | done | failed | skipped
    attempts: int = 0
    job_id: str | None = None
    errors: list[str] = field(default_factory=list)
    updated: float = 0.0
    status_file: str | None = None  # the running attempt's status JSON (name under RUN_DIR/evals/jobs)
    refused: bool = False  # the last attempt failed on its eval data or an unloadable checkpoint: not retried


# Entry fields the watcher computes with -> (the types they must have, whether they may be absent)
ENTRY_TYPES: dict[str, tuple[tuple[type, ...], bool]] = {
    "step": ((int,), False), "ckpt_id": ((str,), False), "status": ((str,), True), "attempts": ((int,), True),
    "errors": ((list,), True), "updated": ((int, float), True), "refused": ((bool,), True),
}


def _entry_problem(raw: dict[str, Any]) -> str | None:
    """What makes one checkpoint's entry of watch.json unusable (a field missing or of the wrong
    type, which would stop the watcher mid-scan), or None. ``job_id`` and ``status_file`` are checked
    where they are read."""
    for key, (types, optional) in ENTRY_TYPES.items():
        if key not in raw:
            if optional:
                continue
            return f"no '{key}'"
        value = raw[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"'{key}' is {value!r}, not {' or '.join(t.__name__ for t in types)}"
    if not all(isinstance(m, str) for m in raw.get("errors", [])):
        return "'errors' holds something other than text"
    return None


class Watcher:
    def __init__(self, run_dir: str | Path, cfg: EvalConfig, executor: str = "local", log: Callable[[str], None] = print):
        self.run_dir = Path(run_dir).resolve()
        self.cfg = cfg
        self.kind = executor
        self.log = log
        self.layout = RunDir(self.run_dir)
        self.dir = self.layout.evals
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tasks = planned_tasks(cfg)
        if not self.tasks:
            raise WatchError("nothing to evaluate: eval.hellaswag is false and eval.harness_tasks is empty")
        self.executor = make_executor(executor, self.layout.eval_jobs, cfg)
        self.entries: dict[str, Entry] = self._load_state()
        self.jobs: dict[str, Any] = {}  # step dir name -> submitit Job (in flight, this process)
        self.training_gone: str | None = None  # why training ended before its final checkpoint
        self._gone_since: float | None = None
        self._lock = RunLock(self.run_dir, LOCK_ROLE, log=log)

    # ------------------------------------------------------------------ state

    def _load_state(self) -> dict[str, Entry]:
        path = self.layout.eval_watch_state
        if not path.is_file():
            return {}
        try:
            raw = json.loads(path.read_text())
            items = raw.get("checkpoints", {}).items()
        except (ValueError, AttributeError) as e:
            raise WatchError(f"{path}: unreadable watcher state ({e}); move it aside to start afresh") from e
        known = {f.name for f in fields(Entry)}
        entries = {}
        for name, v in items:
            if not isinstance(v, dict) or not re.fullmatch(r"step_[0-9]{8}", str(name)):
                continue  # not something this watcher wrote
            problem = _entry_problem(v)
            if problem:
                raise WatchError(f"{path}: unreadable watcher state ({name}: {problem}); move it aside to start afresh")
            e = Entry(**{k: x for k, x in v.items() if k in known})
            if e.job_id is not None and not JOB_ID_RE.match(str(e.job_id)):
                e.job_id = None  # used as a pid / sacct argument: only plain ids
            if e.status_file is not None and not re.fullmatch(r"[\w.-]+\.status\.json", str(e.status_file)):
                e.status_file = None
            entries[name] = e
        return entries

    def save_state(self) -> None:
        state = {
            "run_dir": str(self.run_dir),
            "tasks": self.tasks,
            "executor": self.kind,
            "updated": time.time(),
            "checkpoints": {k: vars(e) for k, e in sorted(self.entries.items())},
        }
        write_json_atomic(self.layout.eval_watch_state, state)

    def lock(self) -> None:
        """One watcher per run dir; raises :class:`trainer.runlock.RunLockHeld` naming the holder."""
        if not self._lock.held:
            self._lock.acquire()

    def unlock(self) -> None:
        self._lock.release()

    # ------------------------------------------------------------------ one scan

    def _cpu_threads(self) -> int:
        """Local jobs share this machine's cores; SLURM jobs get their own (0 = torch's default)."""
        if self.kind != "local":
            return 0
        return max(1, (os.cpu_count() or 1) // max(1, self.cfg.max_parallel))

    def _reattach(self, job_id: str | None):
        """A handle on a job of an earlier watcher, or None if it cannot still be running/finished."""
        import submitit

        if not job_id:
            return None
        folder = self.layout.eval_jobs
        if self.kind == "slurm":
            return submitit.SlurmJob(folder=folder, job_id=job_id)
        return _ForeignLocalJob(folder, job_id)

    def _complete(self, ckpt: Path, ckpt_id: str) -> bool:
        """Complete as the job would find it: computed in the dtype ``eval.dtype`` resolves to on the
        job's node (a SLURM node with GPUs, seen from a login node without; see evals.results)."""
        return all_complete(ckpt, self.cfg, self.tasks, ckpt_id, job_device_type(self.cfg, self.kind))

    def _status(self, e: Entry) -> dict[str, Any]:
        """The attempt's status JSON (written by ``evals.job.run_job`` as it ends), {} if none."""
        if e.status_file:
            try:
                status = json.loads((self.layout.eval_jobs / e.status_file).read_text())
                return status if isinstance(status, dict) else {}
            except (OSError, ValueError):
                pass
        return {}

    def _job_error(self, e: Entry, job: Any, status: dict[str, Any]) -> tuple[str, bool]:
        """Why an attempt ended without complete results (its ``status`` JSON, else where its log
        is), and whether the job was refused (its data is wrong: retrying cannot help)."""
        if status.get("error"):
            # a file in the run dir: printable text only (no terminal escapes from a forged one)
            text = " | ".join(str(status["error"]).splitlines())
            return "".join(c if c.isprintable() else "?" for c in text)[:2000], status.get("refused") is True
        if isinstance(job, _ForeignLocalJob):
            state = "finished"
        else:  # SLURM's own word for a SLURM job (submitit's may lag): FAILED, OUT_OF_MEMORY, TIMEOUT ...
            state = job_state(str(job.job_id)).state if self.kind == "slurm" else getattr(job, "state", "unknown")
        return f"job {e.job_id} ended ({state}) without complete results; see its logs in {self.dir / 'jobs'}", False

    def _collect(self) -> None:
        """Resolve finished jobs: done (results complete), skipped (checkpoint gone), or a failed attempt.

        The job's own return value (submitit's result pickle) is never read; see the module docstring.
        """
        for name, job in list(self.jobs.items()):
            if not job_ended(job):  # not job.done(): it may see a killed SLURM job end minutes late
                continue
            del self.jobs[name]
            e = self.entries[name]
            e.updated = time.time()
            ckpt = self.layout.checkpoints / name
            if not (ckpt / MARKER).is_file():  # retention removes the marker first, then the files
                e.status = "skipped"
                self.log(f"watch: {name} was deleted before it could be evaluated: skipped")
            elif self._complete(ckpt, e.ckpt_id):
                e.status = "done"
                scores = "; ".join(format_scores(r) for r in (read_result(ckpt, t) for t in self.tasks) if r)
                self.log(f"watch: {name} evaluated (job {e.job_id}): {scores}")
            elif (status := self._status(e)).get("status") == "stopped":  # cancelled, e.g. by a watcher stopped before it saved
                e.status, e.attempts = "new", max(0, e.attempts - 1)
                self.log(f"watch: {name}: job {e.job_id} was stopped before it finished; not counted, evaluating it again")
            elif _died_with_its_watcher(job, status):
                e.status, e.attempts = "new", max(0, e.attempts - 1)
                self.log(f"watch: {name}: job {e.job_id} was cancelled when the watcher that started it died; "
                         "not counted, evaluating it again")
            else:
                error, e.refused = self._job_error(e, job, status)
                e.errors.append(error)
                retry = e.attempts <= self.cfg.max_retries and not e.refused
                e.status = "new" if retry else "failed"
                self.log(
                    f"watch: {name} eval failed (attempt {e.attempts}/{self.cfg.max_retries + 1}): {e.errors[-1]}"
                    + ("; will retry" if retry else
                       "; refused: fix what it names (the eval data or the checkpoint), then run again" if e.refused else f"; giving up, see {self.dir / 'jobs'}")
                )

    def scan(self, only: set[str] | None = None) -> list[Path]:
        """Update entries from disk and jobs; submit what needs evaluating. Returns the checkpoints seen."""
        self._collect()
        committed = list_committed(self.run_dir)
        self._follow_known({c.name for c in committed})
        todo = [ckpt for ckpt in committed if (only is None or ckpt.name in only) and self._needs_eval(ckpt)]
        todo.sort(key=lambda p: p.name, reverse=self.cfg.order == "newest")
        if self.cfg.order not in ("newest", "oldest"):
            raise WatchError(f"eval.order must be newest or oldest, got {self.cfg.order!r}")
        for ckpt in todo:
            if len(self.jobs) >= max(1, self.cfg.max_parallel):
                break
            self._submit(ckpt)
        self.save_state()
        return committed

    def _follow_known(self, committed: set[str]) -> None:
        """Entries from the state file: skip those whose checkpoint retention removed, and follow
        the jobs an earlier watcher process submitted rather than submit twins."""
        for name, e in self.entries.items():
            if name not in committed and e.status in ("new",) and name not in self.jobs:
                e.status, e.updated = "skipped", time.time()
                self.log(f"watch: {name} was deleted (retention) before it was evaluated: skipped")
            if e.status == "running" and name not in self.jobs:
                job = self._reattach(e.job_id)
                if job is not None:
                    self.jobs[name] = job
                    self.log(f"watch: following {name}'s job {e.job_id} of an earlier watcher")
                else:
                    e.status = "new"

    def _needs_eval(self, ckpt: Path) -> bool:
        """Bring `ckpt`'s entry up to date with its results on disk; True if a job should run for it."""
        try:
            step = int(read_meta(ckpt)["step"])  # CheckpointError once retention removed the marker
            cid = checkpoint_id(ckpt)
        except (OSError, ValueError, KeyError, CheckpointError):
            return False  # deleted between listing and reading
        e = self.entries.get(ckpt.name)
        if e is None or e.ckpt_id != cid:  # new, or the step was re-written after a resume
            e = self.entries[ckpt.name] = Entry(step=step, ckpt_id=cid, updated=time.time())
        if ckpt.name in self.jobs:
            return False
        if self._complete(ckpt, cid):
            if e.status != "done":
                e.status, e.updated = "done", time.time()
            return False
        if e.status == "done":  # its results were removed: a fresh start, with fresh retries
            e.status, e.attempts, e.errors = "new", 0, []
        if e.status == "failed":
            return False
        if e.status == "skipped":  # committed again (e.g. restored): evaluate it after all
            e.status, e.attempts, e.errors = "new", 0, []
        return True

    def _submit(self, ckpt: Path) -> None:
        """One attempt at `ckpt`: a fresh status file, then the job; a refused submission counts as
        a failed attempt (retried up to ``eval.max_retries``) rather than stopping the watcher."""
        e = self.entries[ckpt.name]
        e.attempts += 1
        e.status_file = f"{ckpt.name}.attempt{e.attempts}.status.json"
        status_path = self.layout.eval_jobs / e.status_file
        status_path.parent.mkdir(parents=True, exist_ok=True)
        status_path.unlink(missing_ok=True)  # never read an earlier job's words as this one's
        self.executor.update_parameters(name=f"eval-{ckpt.name}")
        try:
            job = self.executor.submit(run_job, str(ckpt), self.cfg, self._cpu_threads(), str(status_path))
        except Exception as ex:  # noqa: BLE001 - e.g. sbatch refusing the request: report, don't crash
            e.errors.append(f"submission failed: {_error_line(ex)}")
            e.status, e.updated = ("failed" if e.attempts > self.cfg.max_retries else "new"), time.time()
            self.log(f"watch: could not submit {ckpt.name} (attempt {e.attempts}): {_error_line(ex)}")
            return
        self.jobs[ckpt.name] = job
        e.status, e.job_id, e.updated = "running", str(job.job_id), time.time()
        self.log(f"watch: submitted {ckpt.name} (job {job.job_id}, attempt {e.attempts}/{self.cfg.max_retries + 1})")

    def _retry_failed(self) -> None:
        """Checkpoints an earlier watcher gave up on get fresh retries: whatever failed them (a
        missing data file, a full disk, a bad node) may be fixed now, and rerunning is how one says so."""
        for name, e in self.entries.items():
            if e.status == "failed":
                e.status, e.attempts, e.refused = "new", 0, False
                self.log(f"watch: {name} failed in an earlier run ({e.errors[-1] if e.errors else 'no error kept'}); trying again")

    def _cancel_in_flight(self) -> None:
        """Ctrl-C or a stop signal: cancel this process's jobs and leave their checkpoints to be
        evaluated by the next run, without counting the attempt (it did not fail; it was stopped)."""
        for name, job in self.jobs.items():
            job.cancel(check=False)
            e = self.entries[name]
            e.status, e.attempts, e.job_id, e.updated = "new", max(0, e.attempts - 1), None, time.time()
        if self.kind == "local":  # they die with us: wait (bounded) until they have, so none outlives the exit
            deadline = time.monotonic() + CANCEL_WAIT_S
            while time.monotonic() < deadline and not all(job.done() for job in self.jobs.values()):
                time.sleep(0.1)
        self.jobs.clear()

    def pending(self, only: set[str] | None = None) -> bool:
        """Jobs in flight, or checkpoints still to evaluate (not done, failed or skipped)."""
        if self.jobs:
            return True
        return any(
            e.status == "new" and (only is None or name in only) and (self.layout.checkpoints / name / MARKER).is_file()
            for name, e in self.entries.items()
        )

    # ------------------------------------------------------------------ loops

    def run(self, once: bool = False, tick_s: float = 1.0) -> int:
        """Scan until done; returns 0, 1 if some checkpoint's eval failed for good, or 2 if some
        failed on its configured data (refused: fix it, then run again).

        Raises :class:`trainer.runlock.RunLockHeld` when another watcher holds this run dir.
        """
        self.lock()
        self.entries = self._load_state()  # as the previous holder left it (we may have waited for it)
        self._retry_failed()
        only = {c.name for c in list_committed(self.run_dir)} if once else None
        if once:
            self.log(f"watch: one pass over {len(only or ())} committed checkpoints of {self.run_dir}")
        last_scan = 0.0
        try:
            while True:
                now = time.time()
                if once or self.jobs or now - last_scan >= self.cfg.poll_s:
                    # Asked before listing: a final checkpoint committed after this question is
                    # in the listing below; asked after, it could be taken as "over" unseen.
                    over = once or training_finished(self.run_dir) or self._training_gone()
                    self.scan(only)
                    last_scan = now
                    if over and not self.pending(only):
                        break
                time.sleep(tick_s if (self.jobs or once) else self.cfg.poll_s)
        except KeyboardInterrupt:
            self._cancel_in_flight()
            raise
        finally:
            self.save_state()
            self.unlock()
        failed = sorted(n for n, e in self.entries.items() if e.status == "failed")
        done = sorted(n for n, e in self.entries.items() if e.status == "done")
        self.log(f"watch: finished: {len(done)} evaluated" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
        if self.training_gone:
            self.log(f"watch: {self.training_gone} before train.max_steps: its committed checkpoints are evaluated; "
                     "run the watcher again with the training that resumes it")
        if any(self.entries[n].refused for n in failed):
            return 2
        return 1 if failed or self.training_gone else 0

    def _training_gone(self) -> bool:
        """Whether training ended for good before its final checkpoint (its SLURM job failed or was
        cancelled, and stays so for TRAINING_GONE_GRACE_S): nothing more will be committed, and the
        watcher would otherwise poll until its own time limit (then be requeued, again and again)."""
        why = None if self.kind != "slurm" else training_job_ended(self.run_dir)
        if why is None:
            self._gone_since = None
            return False
        now = time.monotonic()
        self._gone_since = self._gone_since or now
        if now - self._gone_since < TRAINING_GONE_GRACE_S:
            return False
        if training_finished(self.run_dir):  # committed meanwhile: over, and well
            return True
        self.training_gone = why
        return True
