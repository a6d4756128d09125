"""The callable every SLURM task runs (one task per node): a command with rendezvous filled in.

It is generic: `argv` may contain the exact arguments ``{nnodes}``, ``{rdzv_endpoint}`` and
``{job_id}``, which become the allocation's node count, ``first-node:port`` (port derived from the
job id within ``slurm.rdzv_ports``, so concurrent jobs don't collide: :mod:`slurm.ports`; a port in
use on the first node ends the job at once with exit 1, naming it) and the job id. The command itself (e.g. ``pretrain
train``) does the real work; this wrapper only turns its exit code into SLURM actions:

* SIGUSR2 before the time limit / on preemption: submitit calls :meth:`checkpoint`; the command
  (which got the signal too) saves and exits with ``requeue_exit_code``; we requeue the job.
* SIGTERM alone (clusters without a user signal, ``scontrol requeue``): submitit ignores it, the
  command saves and exits with ``requeue_exit_code``, and we requeue the job ourselves.
* ``max_requeues``: after that many restarts the job fails instead of coming back forever.
* The command killed by SIGTERM/SIGUSR2 (a stop signal that found no handler: the command was
  starting or exiting) counts as stopped, not failed: it is requeued like ``requeue_exit_code``,
  and the next run resumes from the newest committed checkpoint, as after any stop.
* Any other exit code is final: the job fails and is never requeued, whatever signal came
  before. 2 means "refused, fix the config or the data" and 1 "failed": a requeue would repeat
  it, and under SLURM it would loop until ``max_requeues``.
* Such a final exit on one node of several ends the job's step on every node after
  ``PEERS_GRACE_S`` (:func:`end_other_nodes`): the others may be waiting for the failed node
  (a rendezvous, the process group's timeout) and would hold the allocation until the time limit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import submitit
from submitit.core.utils import UncompletedJobError

from common.processes import descendants
from common.stop_signals import STOP_SIGNALS
from slurm.jobs import KILL_TAKES_S, KILL_TRIES, PEERS_GRACE_S, cancelled
from slurm.ports import DEFAULT_RDZV_PORTS, check_rendezvous_port, rendezvous_port

KILL_CALL_TIMEOUT_S = 30.0  # one scancel call
PEER_CHECK_S = 1.0  # how often a node looks for another node's "failed for good" marker


def final_exit_note(rc: int | None) -> str:
    """Why an exit code is not requeued, for the job log."""
    if rc == 2:
        return " (refused: fix the config or the data; not requeued)"
    return " (failed; not requeued: submit again to resume from the last checkpoint)"


def end_other_nodes(message: str, grace_s: float = PEERS_GRACE_S) -> None:
    """This node's command failed for good (1, 2, ...): end the job's step on every node.

    The other nodes cannot go on without this one, and they may not notice: a peer that dies
    before the rendezvous or the process group is complete leaves them waiting (torchrun's join
    timeout, 10 min; the process group's, 30 min), and SLURM lets the job run on until its time
    limit, holding the allocation. They get ``grace_s`` to end by themselves (a peer lost in a
    collective is seen within seconds, and each writes its own exit line), then the step is
    killed with SIGKILL, this task included: a SIGTERM would make them checkpoint and exit "requeue
    me", and a failed job must not come back. A requeue or cancellation meanwhile (another node
    stopped on a signal) ends this task first, so the kill never reaches a later run of the job.

    The kill ends this task too, so a task still here some seconds after it knows the kill did not
    take (scancel failed, timed out, or its signal was lost on the way): it tries again, up to
    ``KILL_TRIES`` times, naming what went wrong in the job log."""
    job_id, step = os.environ.get("SLURM_JOB_ID", ""), os.environ.get("SLURM_STEP_ID", "")
    print(f"[node_command] {message}; the job's other nodes get {grace_s:.0f} s to end, then its step is killed", flush=True)
    print(message, file=sys.stderr, flush=True)  # the job's exit line (pipelines read it), as the error would be
    if not (job_id.isdigit() and step.isdigit()):
        return
    time.sleep(grace_s)
    for attempt in range(1, KILL_TRIES + 1):
        problem = kill_step(f"{job_id}.{step}")
        time.sleep(KILL_TAKES_S)
        print(f"[node_command] kill {attempt} of {KILL_TRIES} of step {job_id}.{step} did not end this task "
              f"{KILL_TAKES_S:g} s later ({problem or 'scancel said nothing'})", flush=True)
    print(f"[node_command] gave up killing step {job_id}.{step}: the other nodes may run on until the time limit", flush=True)


def kill_step(step: str) -> str | None:
    """``scancel --signal=KILL`` the step; what went wrong, or None if scancel took the request."""
    try:
        done = subprocess.run(["scancel", "--signal=KILL", step], capture_output=True, text=True, timeout=KILL_CALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"scancel did not answer in {KILL_CALL_TIMEOUT_S:.0f} s"
    except OSError as e:
        return f"scancel could not run: {e}"
    if done.returncode != 0:
        return f"scancel exited with {done.returncode}: {done.stderr.strip()[-300:]}"
    return None


class NodeFailed(RuntimeError):
    """This node's command failed for good, and the job's other nodes were told (the job's exit line)."""


class NodeCommand(submitit.helpers.Checkpointable):
    def __init__(self, argv: list[str], requeue_exit_code: int, max_requeues: int, grace_s: float = 60.0,
                 ports: tuple[int, int] = DEFAULT_RDZV_PORTS) -> None:
        self.argv = list(argv)
        self.ports = (int(ports[0]), int(ports[1]))
        self.requeue_exit_code = requeue_exit_code
        self.max_requeues = max_requeues
        self.grace_s = grace_s
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_proc"] = None  # a running process is not part of what is requeued
        return state

    def rdzv_ports(self) -> tuple[int, int]:
        # a job pickled by a version without the field (requeued across an upgrade) keeps the default
        return getattr(self, "ports", DEFAULT_RDZV_PORTS)

    def filled_argv(self, job: submitit.JobEnvironment) -> list[str]:
        hosts = job.hostnames if job.num_nodes > 1 else ["127.0.0.1"]
        endpoint = f"{hosts[0]}:{rendezvous_port(job.job_id, self.rdzv_ports())}"
        values = {"{nnodes}": str(job.num_nodes), "{rdzv_endpoint}": endpoint, "{job_id}": str(job.job_id)}
        return [values.get(a, a) for a in self.argv]

    def rendezvous_problem(self, job: submitit.JobEnvironment) -> str | None:
        """On the first node of a multi-node job whose command meets the others at ``{rdzv_endpoint}``:
        why that port cannot be listened on (in use), or None. Checked before the command starts: torchrun
        would otherwise retry for two minutes and fail with stack traces that never name the port."""
        if job.num_nodes <= 1 or job.node != 0 or "{rdzv_endpoint}" not in self.argv:
            return None
        port = rendezvous_port(job.job_id, self.rdzv_ports())
        return check_rendezvous_port(port, self.rdzv_ports(), job.hostnames[0],
                                     lambda note: print(f"[node_command] warning: {note}", flush=True))

    def __call__(self) -> int:
        job = submitit.JobEnvironment()
        try:
            return self._run(job)
        except (NodeFailed, UncompletedJobError):
            raise  # failed and said so (the others ended), or stopped on a signal (not a failure)
        except Exception as e:
            # this node could not run the command at all (its program missing here, no memory to
            # fork): the others would wait for it, as for a command that failed
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
            self._fail(job, f"cannot run {self.argv[0]}: {type(e).__name__}: {e}{final_exit_note(1)}")

    def _run(self, job: submitit.JobEnvironment) -> int:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        argv = self.filled_argv(job)
        print(f"[node_command] job {job.job_id} node {job.node}/{job.num_nodes} restart {restarts}: {' '.join(argv)}", flush=True)
        if (problem := self.rendezvous_problem(job)) is not None:
            self._fail(job, f"{problem}; {argv[0]} not started: exited with code 1{final_exit_note(1)}")
        self._proc = subprocess.Popen(argv)
        rc = self._wait(None, peers_failed=self.failed_marker(job))
        if rc == 0:
            return 0
        if self.stopped(rc):
            self._requeue_self(job, restarts)
        self._fail(job, f"{argv[0]} exited with code {rc}{final_exit_note(rc)}")

    def _fail(self, job: submitit.JobEnvironment, message: str) -> NoReturn:
        """End this task for good with ``message`` (the job's exit line), ending the other nodes' too."""
        if (marker := self.failed_marker(job)) is not None:
            try:  # the other nodes' second way to learn it (see failed_marker)
                marker.write_text(f"node {job.node}: {message}\n")
            except OSError as e:
                print(f"[node_command] could not write {marker}: {e}", flush=True)
            end_other_nodes(message)
        raise NodeFailed(message)

    @staticmethod
    def failed_marker(job: submitit.JobEnvironment) -> Path | None:
        """Where a node of a multi-node SLURM job says it failed for good, in submitit's job folder
        (every node sees it); None for a single node or a local job.

        The failed node also kills the job's step, but that kill once reached only its own node: the
        other node's slurmd logged the message cut off ("Zero Bytes were transmitted or received"),
        and the failed node, killed, could not ask again. So every node also looks for this file
        while its command runs, and ends its command if it is still running ``PEERS_GRACE_S`` +
        ``KILL_TAKES_S`` after the file appeared (the kill should have ended it). Named by the run of the job
        (SLURM_RESTART_COUNT): a requeued run never reads an earlier run's."""
        if job.name() != "slurm" or job.num_nodes <= 1:
            return None
        return Path(job.paths.folder) / f"{job.job_id}_run{os.environ.get('SLURM_RESTART_COUNT', '0')}_failed_node"

    def _wait(self, timeout: float | None, peers_failed: Path | None = None) -> int | None:
        # Poll, never block in Popen.wait(): a signal handler (submitit's) may need to wait too,
        # and Popen.wait holds a lock while it blocks.
        deadline = None if timeout is None else time.monotonic() + timeout
        next_check, seen_at = time.monotonic() + PEER_CHECK_S, None
        assert self._proc is not None
        while (rc := self._proc.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                return None
            if peers_failed is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + PEER_CHECK_S
                if seen_at is None and peers_failed.exists():
                    seen_at = time.monotonic()
                # the failed node's kill ends this node first (its exit line is the job's); this is for a lost one
                if seen_at is not None and time.monotonic() - seen_at >= PEERS_GRACE_S + KILL_TAKES_S:
                    self._end_for_peer(peers_failed)
            time.sleep(0.2)
        return rc

    def _end_for_peer(self, marker: Path) -> NoReturn:
        """Another node failed for good: kill this node's command (SIGKILL: no checkpoint, no
        "requeue me") and fail; SLURM ends the step once every node's task has ended."""
        assert self._proc is not None
        for pid in [*descendants(self._proc.pid), self._proc.pid]:  # torchrun's workers sit in sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self._proc.wait()
        try:
            said = marker.read_text().strip()
        except OSError:
            said = "(its marker could not be read)"
        message = f"another node of the job failed for good, {said}; this node's command was killed"
        print(f"[node_command] {message}", flush=True)
        raise NodeFailed(message)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit on the requeue signal: let the command save, then come back as we are.

        Returning None tells submitit not to requeue (the job then ends as failed)."""
        rc: int | None = None
        if self._proc is not None:
            if self._proc.poll() is None:
                try:
                    self._proc.send_signal(signal.SIGUSR2)  # in case the signal reached only us
                except ProcessLookupError:
                    pass
            rc = self._wait(self.grace_s)
            print(f"[node_command] command exited with {rc} after the requeue signal", flush=True)
        if not self.should_requeue(rc):
            print(f"[node_command] not requeued: the command exited with {rc}{final_exit_note(rc)}", flush=True)
            return None
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts >= self.max_requeues:
            print(f"[node_command] not requeued: {restarts} restarts reached slurm.max_requeues", flush=True)
            return None
        return submitit.helpers.DelayedSubmission(self)

    def should_requeue(self, rc: int | None) -> bool:
        """After a requeue signal: requeue if the command checkpointed (``requeue_exit_code``), or
        has not started or not finished within the grace period (it is still saving; SLURM stops
        it when the job is requeued, and the next run resumes from the newest committed checkpoint).
        Also after 0 (it finished just as the signal came): submitit can only report a job that
        is not requeued from here as failed, while the requeued run finds the work done and ends
        COMPLETED, which is what ``--dependency=afterok`` chains wait for.
        Never after 2 (refused) or 1 (failed): a rerun would repeat them."""
        return rc is None or rc == 0 or self.stopped(rc)

    def stopped(self, rc: int | None) -> bool:
        """The command checkpointed on a stop signal (``requeue_exit_code``) or was killed by one."""
        return rc == self.requeue_exit_code or (rc is not None and -rc in STOP_SIGNALS)

    def _requeue_self(self, job: submitit.JobEnvironment, restarts: int) -> None:
        # the executor decides (submitit's environment), not SLURM_JOB_ID: a local job started
        # inside an allocation (salloc, a batch script) inherits that variable, and would requeue
        # the allocation under its own pid
        if job.name() != "slurm":
            raise UncompletedJobError("the command stopped on a signal; run it again to resume")
        if job.global_rank != 0:
            sys.exit(-1)  # the first task requeues the whole job
        if restarts >= self.max_requeues:
            raise UncompletedJobError(f"stopped on a signal, but not requeued: {restarts} restarts reached slurm.max_requeues")
        if cancelled(str(job.job_id)):  # scancel: the user wants the job to end, not to come back
            raise UncompletedJobError("the job was cancelled (scancel): checkpointed, not requeued; submit it again to resume")
        subprocess.run(["scontrol", "requeue", str(job.job_id)], check=False, timeout=60)
        print(f"[node_command] stopped on a signal; requeued job {job.job_id} (restart {restarts + 1})", flush=True)
        sys.exit(-1)  # no result file: the job is coming back
