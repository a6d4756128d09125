"""State of recorded jobs: `squeue`/`scontrol` for live ones, `sacct` for finished ones."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

PEERS_GRACE_S = 10.0  # after one node of a job failed for good, how long the others get to end by themselves
KILL_TRIES = 3  # then the step is killed: attempts before giving up (scancel failed, its signal lost)
KILL_TAKES_S = 5.0  # a kill that took ends the step within this; still running after it, try again
# SLURM's end states but COMPLETED (and REVOKED, a federated sibling's): a job in one runs no more, having failed
FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")


QUERY_TIMEOUT_S = 10.0  # one scontrol/sacct call; a controller that answers at all does so in well under a second
SILENT_FOR_S = 60.0  # after a call timed out, the same command is not tried again for this long
UNREACHABLE = "UNREACHABLE"  # SLURM did not answer: the job may be running (is_live), never taken for gone
_silent_until: dict[str, float] = {}  # command -> monotonic time until which it is not asked again


@dataclass
class JobState:
    job_id: str
    state: str
    restarts: int | None
    elapsed: str
    exit_code: str = ""  # SLURM's "code:signal" of the batch script ("137:0": killed)
    reason: str = ""  # scontrol's Reason (NonZeroExitCode, TimeLimit, ...), sacct's where scontrol no longer knows the job


def _query(argv: list[str]) -> subprocess.CompletedProcess | None:
    """Run a SLURM client for at most QUERY_TIMEOUT_S; None if it did not answer in time (a controller
    or slurmdbd that is down or hung: scontrol alone retries for about 20 s, sacct longer). Such a
    command is then left alone for SILENT_FOR_S, so `pretrain status` over many jobs, or a
    workflow's refresh, costs one timeout, not one per job."""
    import time

    if time.monotonic() < _silent_until.get(argv[0], 0.0):
        return None
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _silent_until[argv[0]] = time.monotonic() + SILENT_FOR_S
        return None
    except OSError:
        return None


def _scontrol(job_id: str) -> dict[str, str] | None:
    """The job's fields; {} if the controller does not know it (purged after MinJobAge), None if
    the controller did not answer."""
    out = _query(["scontrol", "show", "job", "-o", job_id])
    if out is None:
        return None
    if out.returncode != 0:
        return {} if "Invalid job id" in out.stderr else None
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _sacct(job_id: str) -> tuple[str, str, str, str] | None:
    """(state, elapsed, exit code, reason) from accounting, or None (no accounting, no record, no answer)."""
    if shutil.which("sacct") is None:
        return None
    out = _query(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,Elapsed,ExitCode,Reason"])
    lines = [l for l in (out.stdout if out else "").splitlines() if l.strip()]
    if out is None or out.returncode != 0 or not lines:
        return None
    state, elapsed, exit_code, reason = (lines[-1].split("|") + ["", "", "", ""])[:4]
    return state.split()[0], elapsed, exit_code, "" if reason == "None" else reason


def _is_job_id(job_id: str) -> bool:
    """A SLURM job id (digits, "_" for array tasks): the only thing passed to scontrol/sacct."""
    return re.fullmatch(r"[0-9]+(?:_[0-9]+)?", job_id) is not None


def job_state(job_id: str) -> JobState:
    """The job's state; `job_id` comes from a file in the run dir, so anything but a SLURM job id
    (digits, "_" for array tasks) is reported, never passed to scontrol/sacct as an argument.
    UNREACHABLE when the controller did not answer and accounting had no record: never UNKNOWN
    (a job gone), since it may well be running."""
    job_id = str(job_id)
    if not _is_job_id(job_id):
        return JobState(job_id, "INVALID JOB ID", None, "")
    if shutil.which("scontrol") is None:
        return JobState(job_id, "UNKNOWN (no SLURM here)", None, "")
    info = _scontrol(job_id)
    if info:
        return JobState(job_id, info.get("JobState", "UNKNOWN"), int(info.get("Restarts", "0")), info.get("RunTime", ""),
                        info.get("ExitCode", ""), "" if info.get("Reason") == "None" else info.get("Reason", ""))
    acct = _sacct(job_id)
    if acct:
        return JobState(job_id, acct[0], None, acct[1], acct[2], acct[3])
    if info is None:
        return JobState(job_id, f"{UNREACHABLE} (SLURM did not answer)", None, "")
    return JobState(job_id, "UNKNOWN", None, "")


def cancelled(job_id: str) -> bool:
    """Whether the job was cancelled (``scancel``), which a requeue must not undo: SLURM lets
    ``scontrol requeue`` revive a cancelled job. A cancellation sends the SIGTERM a preemption
    sends, and while the job is killed scontrol says COMPLETING for both; accounting tells them
    apart ("CANCELLED by UID" against "PREEMPTED"). Without accounting: False, and the job is
    requeued as a preempted one would be."""
    job_id = str(job_id)
    if not _is_job_id(job_id) or shutil.which("scontrol") is None:
        return False
    if (_scontrol(job_id) or {}).get("JobState") == "CANCELLED":
        return True
    acct = _sacct(job_id)
    return acct is not None and acct[0] == "CANCELLED"


def is_live(state: str) -> bool:
    """Whether a job in ``state`` is queued or may still run and write: any state but an end state.
    Not only PENDING or RUNNING: a job STOPPED (SIGSTOP), SIGNALING, in STAGE_OUT or held after a
    requeue (REQUEUE_HOLD, SPECIAL_EXIT) comes back or is still ending; so may one SLURM did not
    answer about (UNREACHABLE). A job neither scontrol nor sacct knows (UNKNOWN) is long gone."""
    return state not in (*FAILED_STATES, "COMPLETED", "REVOKED") and not state.startswith(("UNKNOWN", "INVALID"))


ASK_EVERY_S = (2.0, 30.0)  # job_ended asks SLURM about a job at most this often: 2 s, growing with its age to 30 s
_asked: dict[str, tuple[float, float]] = {}  # job id -> (monotonic time first asked, next time it may be asked)


def job_ended(job) -> bool:
    """Whether a submitted job (submitit's) has ended. A local one: its process is done. A SLURM one:
    submitit's ``job.done()`` (every task's result file, else its own ``sacct`` watcher), or else
    SLURM's state no longer queued, running or completing (:func:`is_live`), asked at most every 2 s,
    then 5% of the time since it was first asked about, up to 30 s (:data:`ASK_EVERY_S`): a job that
    ended is seen within that, and a long wait costs the controller 2 calls a minute.

    ``job.done()`` alone missed ends by minutes: a task killed before it wrote its result file (the
    OOM killer; every node of a multi-node job after one failed, slurm.node_command.end_other_nodes)
    left it to submitit's shared watcher, which asks 2, 4, 8 ... 64 s after the newest submission and
    up to 10 min apart. A job that ended after about 45 s was reported 19 s late. A SLURM that does
    not answer (UNREACHABLE) counts as live."""
    import time

    import submitit

    done = job.done()
    if not isinstance(job, submitit.SlurmJob):
        return done
    job_id = str(job.job_id)
    if done:
        _asked.pop(job_id, None)  # ended: a long-lived watcher keeps no entry for it
        return True
    now = time.monotonic()
    first, next_ask = _asked.get(job_id, (now, now))
    if now < next_ask:
        return False
    low, high = ASK_EVERY_S
    _asked[job_id] = (first, now + min(high, max(low, (now - first) / 20)))
    if is_live(job_state(job_id).state):
        return False
    del _asked[job_id]
    return True


def wait_for_end(job, poll_s: float = 2.0) -> None:
    """Return once a submitted job has ended (:func:`job_ended`), looking every ``poll_s``."""
    import time

    while not job_ended(job):
        time.sleep(poll_s)


def never_starts(job_id: str) -> bool:
    """Whether a queued job waits for a dependency that can no longer be met (a job it follows
    failed): SLURM keeps it pending so, for ever, unless it is cancelled."""
    if not _is_job_id(str(job_id)):
        return False
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%r"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):  # no squeue here, or it hangs: say nothing
        return False
    return out.returncode == 0 and out.stdout.strip() == "DependencyNeverSatisfied"


def cancel_if_pending(job_id: str, wait_s: float = 30.0) -> bool:
    """Cancel the job only while it is still queued (``scancel --state=PENDING``); True if it is
    gone, False if it started meanwhile (left alone) or scancel could not be run."""
    import time

    if not _is_job_id(str(job_id)):
        return False
    try:
        subprocess.run(["scancel", "--state=PENDING", str(job_id)], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    deadline = time.monotonic() + wait_s
    while (state := job_state(job_id).state) == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.5)
    return not is_live(state)
