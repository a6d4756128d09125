"""``pretrain train``: be the torchrun worker, or start torchrun on this machine and supervise it.

When the environment has RANK/WORLD_SIZE/LOCAL_RANK we *are* a worker (e.g. SLURM runs torchrun
itself) and train in-process. Otherwise we run
``python -m trainer.torchrun_local <loopback c10d rendezvous> --nproc_per_node N -m trainer.train RESOLVED.yaml``
(torchrun, bound to 127.0.0.1; across nodes plain torchrun at SLURM's endpoint) and stay in
front of it, for two reasons:

* Signals. torchrun starts each worker in its own session, reacts to SIGTERM by terminating
  them (SIGKILL after ``train.stop_timeout_s``, set through ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``:
  its own 30 s would cut a large model's stop checkpoint short) and would die of SIGUSR1/2 (so
  it is started with those ignored and blocked, which its workers inherit: see ``trainer.signals``). We forward SIGTERM/SIGUSR2/SIGUSR1
  straight to the worker processes, which agree on a step, checkpoint and exit with 3; torchrun
  is left alone and simply sees its workers finish. A stop that comes before the workers exist
  reaches them as they start; one before torchrun starts means it never does (exit 3).
* Exit codes. torchrun reports any worker failure as 1, which would hide "checkpointed, requeue
  me" (3) and "refused" (2); rank 0 writes its code to a file we name, and we return that. After
  a stop signal, a failure is a stop too (3): a worker killed by the signal before its handler
  existed has nothing to lose, the rerun resumes from the newest committed checkpoint.
* Our own death. torchrun must not outlive us: killed without cleanup (SIGKILL, the OOM killer,
  the SIGHUP of a closed terminal or a dropped ssh session), we forward nothing, and torchrun
  and its ranks would train on unseen, holding the run dir's ``train`` lock against the rerun.
  So torchrun gets SIGTERM when we die (``PR_SET_PDEATHSIG``, :func:`common.parent_death.parent_death_signal`):
  it stops its workers with it, and they checkpoint and exit 3 as on any stop (within
  ``train.stop_timeout_s``). torchrun holds SIGHUP blocked: a terminal's hangup reaches our whole
  process group, and torchrun would pass it on to the workers, which die of it uncheckpointed.

On one node nothing listens beyond loopback: torchrun runs as ``trainer.torchrun_local``
(its stores bound to 127.0.0.1), with ``--local-addr=127.0.0.1`` (the workers' MASTER_ADDR) and
gloo/NCCL sockets on ``lo`` unless the user chose an interface. Multi-node runs use the c10d
endpoint SLURM's first node provides, on the interface it resolves to.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from common.parent_death import parent_death_signal
from common.processes import child_pids
from common.scratch import owned_scratch_dir
from common.strict import ConfigError
from trainer import EXIT_FILE_ENV, EXIT_OK, EXIT_REFUSED, EXIT_REQUEUE, rank_exit_file, under_torchrun
from trainer.config import TrainJob
from trainer.signals import block_user_signals

FORWARDED = (signal.SIGTERM, signal.SIGUSR2, signal.SIGUSR1)
DELIBERATE = (EXIT_OK, EXIT_REFUSED, EXIT_REQUEUE)  # outcomes a rank chose; anything else is a failure


SCRATCH_PREFIX = "pretrain-launch-"  # in the temp dir: <prefix><host>-<launcher pid>-XXXX/{config.yaml,exit.json,...}
# torchrun's wait for its workers after a stop signal, before SIGKILL (torch.distributed.launcher.api)
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
LOCAL_ENDPOINT = "127.0.0.1:0"  # a free port on loopback; the store listens there only (trainer.torchrun_local)


def local_rendezvous_args() -> list[str]:
    """What ``--standalone`` does, but on 127.0.0.1 (not "localhost", which may resolve to ::1 only),
    with the workers' bootstrap store on 127.0.0.1 too (``--local-addr``)."""
    return ["--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={LOCAL_ENDPOINT}", f"--rdzv-id={uuid.uuid4()}",
            "--local-addr=127.0.0.1"]  # fmt: skip


def loopback_env(env: dict[str, str]) -> dict[str, str]:
    """Keep a single-node run's collective sockets on loopback (unless an interface was chosen)."""
    out = dict(env)
    out.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out.setdefault("NCCL_SOCKET_IFNAME", "lo")
    return out


def rendezvous_args(nnodes: int, endpoint: str, rdzv_id: str) -> list[str]:
    """torchrun's rendezvous flags: standalone on loopback on one node, c10d at ``endpoint`` across nodes."""
    if nnodes <= 1:
        return local_rendezvous_args()
    if not endpoint:
        raise ValueError("a multi-node launch needs a rendezvous endpoint (HOST:PORT)")
    return [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", f"--rdzv_id={rdzv_id or 'pretrain'}"]


def say_on_stderr(line: str) -> None:
    """Where the launcher's own "pretrain train: ..." lines go unless the caller also keeps them."""
    print(line, file=sys.stderr, flush=True)


def train_command(resolved: dict[str, Any], nnodes: int = 1, rdzv_endpoint: str = "", rdzv_id: str = "",
                  allow_changes: bool = False, say: Callable[[str], None] = say_on_stderr) -> int:
    """Train with the resolved run config ``resolved`` (plain data; the caller loaded and validated
    it); returns the process exit code. The launcher's lines (the last one: "pretrain train: exit N:
    why") go to ``say``: the workflow keeps that last one for `pretrain status`."""
    if under_torchrun():
        from trainer.train import run_worker

        return run_worker(resolved, allow_changes=allow_changes)
    try:
        job = TrainJob.from_resolved(resolved)  # fail fast on config errors, before starting torchrun
    except ConfigError as e:
        say(f"pretrain train: config error: {e}")
        return EXIT_REFUSED
    # The workers read the resolved config from, and write their outcomes to, a private directory of
    # this launch, where torchrun keeps its own files too (node-local, removed after; swept by the
    # next launch if this one is SIGKILLed). Our stop handler, which only records and forwards, is
    # in place before the directory is made and until it is removed: the caller's handler raises
    # (pipelines.stopping), and an exception raised inside shutil.rmtree closed a descriptor twice
    # there (EBADF: exit 1 instead of 3; once, in CI, the process died of SIGSEGV).
    forward = _StopForwarder()
    with forward.installed(), owned_scratch_dir(SCRATCH_PREFIX) as scratch:
        config_file = scratch / "config.yaml"
        config_file.write_text(job.resolved_yaml(), encoding="utf-8")
        return launch_torchrun(str(config_file), job.train.nproc_per_node, rendezvous_args(nnodes, rdzv_endpoint, rdzv_id),
                               allow_changes=allow_changes, say=say, scratch=scratch, stop_timeout_s=job.train.stop_timeout_s,
                               forward=forward)


def visible_gpus() -> int | None:
    """CUDA devices this process would see (``CUDA_VISIBLE_DEVICES`` applied), counted in a child
    process: the caller never imports torch nor initialises CUDA. None if the probe failed (killed,
    broken install): not knowing is no reason to refuse."""
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=False)
        return int(out.stdout.split()[-1]) if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def device_problem(device: str, nproc_per_node: int, gpus: int) -> str | None:
    """Why ``train.device`` with ``nproc_per_node`` ranks cannot train on a machine with ``gpus``
    CUDA devices (one rank per GPU), or None. ``auto`` on a machine without one is CPU training."""
    if device == "cpu" or (device == "auto" and gpus == 0):
        return None
    if gpus == 0:
        return "train.device is cuda but this machine has no CUDA device (train here on a GPU node, or submit it to SLURM)"
    if nproc_per_node > gpus:
        return (f"train.nproc_per_node ({nproc_per_node}) is one rank per GPU but this machine has {gpus} CUDA device(s): "
                f"set train.nproc_per_node={gpus} (train.batch_tokens must stay a multiple of its ranks' micro-batches)")
    return None


class _StopForwarder:
    """The launcher's SIGTERM/SIGUSR2/SIGUSR1 handler, from before the launch's directory is made
    (so before torchrun starts) until it is removed (after torchrun has exited): each signal goes to
    the workers (torchrun's children); one that comes before they exist reaches them as they appear
    (:meth:`catch_up`), and the first one is remembered. It never raises."""

    def __init__(self) -> None:
        self.stops: list[int] = []  # the stop signals received, first first
        self.told: set[int] = set()  # the workers that were given one
        self.proc: subprocess.Popen | None = None  # torchrun, once started

    def __call__(self, signum: int, frame: Any) -> None:
        self.stops.append(signum)
        if self.proc is None:
            return  # torchrun is not started (and will not be)
        workers = self._tell_workers(signum)
        if not workers and signum == signal.SIGTERM and self.proc.poll() is None:
            self.proc.send_signal(signum)  # torchrun will terminate the workers itself
        # os.write, not print: a handler that prints while the main thread prints raises "reentrant call"
        os.write(2, f"pretrain train: forwarded {signal.Signals(signum).name} to workers {workers}\n".encode())

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """This object as the handler of FORWARDED while the block runs; the previous handlers after."""
        previous = {s: signal.signal(s, self) for s in FORWARDED}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def catch_up(self) -> None:
        """Workers that started after the signal get it too: they hold it until their handler exists."""
        if self.stops and self.proc is not None and set(child_pids(self.proc.pid)) - self.told:
            self._tell_workers(self.stops[0])

    def _tell_workers(self, signum: int) -> list[int]:
        assert self.proc is not None
        workers = child_pids(self.proc.pid)
        for pid in workers:
            try:
                os.kill(pid, signum)
                self.told.add(pid)
            except ProcessLookupError:
                pass
        return workers


def exit_file_in(scratch: Path) -> str:
    """Where rank 0 writes its outcome (every local rank its own beside it): in the launch's directory."""
    return str(scratch / "exit.json")


def torchrun_command(config: str, nproc: int, rdzv: list[str], allow_changes: bool, scratch: Path,
                     stop_timeout_s: int) -> tuple[list[str], dict[str, str]]:
    """torchrun's command line and environment: loopback-only on one node (``trainer.torchrun_local``).

    torchrun's log dir (``--log-dir``; its default is a new ``torchelastic_*`` directory in the
    temp dir, never removed: 1,362 had piled up here) is in the launch's ``scratch`` directory.
    ``stop_timeout_s`` goes through the environment, not ``--shutdown-timeout``: both came with
    pytorch#172596 (March 2026), and a torch before it refuses the unknown flag but ignores the
    variable (it then keeps its 30 s; ``torch>=2.4`` is what ``pyproject.toml`` allows)."""
    local = f"--rdzv-endpoint={LOCAL_ENDPOINT}" in rdzv
    env = loopback_env(dict(os.environ)) if local else dict(os.environ)
    env[EXIT_FILE_ENV] = exit_file_in(scratch)
    env[SHUTDOWN_TIMEOUT_ENV] = str(stop_timeout_s)
    cmd = [
        sys.executable, "-m", "trainer.torchrun_local" if local else "torch.distributed.run", *rdzv, f"--nproc_per_node={nproc}",
        f"--log-dir={scratch / 'torchrun'}", "-m", "trainer.train", *(["--allow-changes"] if allow_changes else []), config,
    ]
    return cmd, env


def torchrun_preexec() -> Callable[[], None]:
    """torchrun's ``preexec_fn``: SIGUSR1/2 ignored and blocked (:func:`trainer.signals.block_user_signals`),
    SIGHUP blocked, and SIGTERM when this process dies (see the module docstring, "Our own death")."""
    tie = parent_death_signal(signal.SIGTERM)

    def preexec() -> None:
        block_user_signals()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        tie()

    return preexec


def launch_torchrun(config: str, nproc: int, rdzv: list[str] | None, allow_changes: bool,
                    say: Callable[[str], None], scratch: Path, stop_timeout_s: int, forward: _StopForwarder) -> int:
    """Run torchrun on ``config`` and supervise it (see the module docstring); ``scratch`` is this
    launch's own directory, for the ranks' outcomes and torchrun's files; ``forward`` is the stop
    handler the caller installed (:meth:`_StopForwarder.installed`)."""
    if nproc < 1:  # load_config refuses it already
        say(f"pretrain train: train.nproc_per_node must be >= 1, got {nproc}")
        return EXIT_REFUSED
    exit_file = exit_file_in(scratch)
    cmd, env = torchrun_command(config, nproc, local_rendezvous_args() if rdzv is None else rdzv, allow_changes, scratch,
                                stop_timeout_s)
    if forward.stops:
        code, reason = EXIT_REQUEUE, "stopped before torchrun started"
    else:
        forward.proc = proc = subprocess.Popen(cmd, env=env, preexec_fn=torchrun_preexec())  # noqa: PLW1509
        while (rc := proc.poll()) is None:
            try:
                forward.catch_up()
                time.sleep(0.2)
            except KeyboardInterrupt:
                # Ctrl-C: ask the workers to checkpoint and stop (SIGTERM), whether or not the
                # terminal also signalled torchrun, then wait for them.
                forward(signal.SIGTERM, None)
                say("pretrain train: interrupted; the workers checkpoint and stop")
        code, reason = _exit_code(exit_file, rc)
        ranks = _rank_outcomes(exit_file, nproc)
        if forward.stops and code not in DELIBERATE:
            # a worker died of the signal before its handler existed or after its outcome was
            # written, or torchrun ended on it: nothing committed is lost, the rerun resumes
            code, reason = EXIT_REQUEUE, f"stopped by {signal.Signals(forward.stops[0]).name} (torchrun exited with {rc})"
        elif code not in DELIBERATE:
            reason = _first_failure(*ranks) or reason
    # torchrun reports any non-zero worker exit as a failure with a traceback; this is the real outcome
    say(f"pretrain train: exit {code}: {_explain(code, reason)}")
    return code


def _explain(code: int, reason: str) -> str:
    return {
        EXIT_OK: "finished",
        EXIT_REFUSED: f"refused: {reason or 'see the error above'}. Running it again unchanged will not help (committed checkpoints are kept)",
        EXIT_REQUEUE: f"{reason or 'checkpoint committed on a stop signal'}; requeue / rerun the same command to continue",
    }.get(code, f"failed{f' ({reason})' if reason else ''}; rerun the same command to resume from the last committed checkpoint")


def _rank_outcomes(exit_file: str, nproc: int) -> tuple[list[dict[str, Any]], list[int]]:
    """(what this node's ranks wrote of their own outcome, the local ranks that wrote none); the
    files are removed. See trainer.train._write_exit_status."""
    outcomes, silent = [], []
    for local_rank in range(nproc):
        path = rank_exit_file(exit_file, local_rank)
        try:
            outcome = json.loads(Path(path).read_text())
            os.unlink(path)
            outcomes.append({"rank": int(outcome["rank"]), "code": int(outcome["code"]), "time": float(outcome["time"]),
                             "reason": str(outcome.get("reason", "")), "traceback_file": outcome.get("traceback_file")})
        except (OSError, ValueError, KeyError, TypeError):
            silent.append(local_rank)
    return outcomes, silent


def _first_failure(outcomes: list[dict[str, Any]], silent: list[int]) -> str:
    """Why a run failed, rank by rank: the local ranks that wrote no outcome (killed, say by the OOM
    killer: the others then fail on the lost connection, which says nothing of the cause), then the
    first error any rank wrote; "" when neither."""
    parts = []
    if silent:
        parts.append(f"local rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} ended without a word "
                     f"(killed by a signal, e.g. the OOM killer: see `dmesg`; or never started)")
    failed = sorted((o for o in outcomes if o["code"] not in DELIBERATE and o["reason"]), key=lambda o: o["time"])
    if failed:
        first = (failed[0]["reason"].strip().splitlines() or [""])[0]
        kept = f" (traceback: {failed[0]['traceback_file']})" if failed[0].get("traceback_file") else ""
        parts.append(f"first error: rank {failed[0]['rank']}: {first[:300]}{kept}")
    return "; ".join(parts)


def _exit_code(exit_file: str, rc: int) -> tuple[int, str]:
    """(code, reason): rank 0's own when it wrote them, else torchrun's code (negative = killed by a signal)."""
    try:
        status = json.loads(Path(exit_file).read_text())
        os.unlink(exit_file)
        code, reason = int(status["code"]), str(status.get("reason", ""))
    except (OSError, ValueError, KeyError):
        return (rc if rc >= 0 else 128 - rc), ""
    # rank 0 said "finished" but another rank failed afterwards: trust torchrun
    return (rc, "") if code == 0 and rc != 0 else (code, reason)
