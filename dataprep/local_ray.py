"""The Ray instance the data stage runs on: an existing cluster it joins (``ray.address``), or a
local one it starts, owns and stops.

A local instance is private to this process in two ways:

* it listens on 127.0.0.1 only (:func:`_loopback_node`);
* its daemons (GCS, raylet, agents and, through the raylet, the task workers) do not hear the
  job's stop signals (:func:`_deaf_to_stop_signals`). SIGTERM and SIGUSR2 reach every process of
  the job at once: a terminal or ``kill -- -PGID`` signals the process group, SLURM (preemption,
  ``--signal`` before the time limit, ``scancel``) every process of the step. Were the GCS to die of
  it, the driver would find it gone while it shuts down, and Ray's core worker ends a driver that
  cannot reach its GCS for 60 s with exit 1, which is final, where the stop must give exit 3
  ("requeue me"). So only the driver hears the signal; it stops its work where it is and takes Ray
  down with :func:`stop_ray`;
* none of its processes outlives the driver by more than a moment, even when the driver dies without
  stopping it (``kill -9``, the OOM killer): :mod:`dataprep.ray_reaper` sweeps up after it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common.stop_signals import STOP_SIGNALS
from dataprep.config import RayConfig
from dataprep.errors import TransientDataError

__all__ = ["start_ray", "stop_ray"]


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Make the local Ray instance about to start take 127.0.0.1 as its node address.

    Ray (2.5x+) binds its servers (GCS, raylet, object manager, every worker's gRPC server, the
    runtime-env agent) to the node address, and ``ray.init`` derives that from the route to the
    outside (``_node_ip_address="127.0.0.1"`` is deliberately turned back into that external
    address). Its only switch is the check below, meant for single-machine OSX/Windows, that
    makes the node address loopback. A local instance is one machine, so nothing needs to reach
    it from outside; joining a cluster (``ray.address``) does not come through here.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextlib.contextmanager
def _deaf_to_stop_signals() -> Iterator[None]:
    """Hold SIGTERM and SIGUSR2 back in the calling thread and in every process or thread it starts
    meanwhile.

    Ray's daemons started in this window never hear them: a blocked signal stays blocked across
    fork and exec, and they do not unblock it (Ray itself starts them with SIGINT blocked, for
    Ctrl-C). They still stop when this process shuts them down (:func:`stop_ray`: SIGKILL at once,
    not Ray's SIGTERM and a second's wait each, which they would not hear), and die with it if it
    is killed (Ray's fate-sharing SIGKILL). In this process, a stop signal that arrives meanwhile stays pending and
    is handled as soon as the window closes.
    """
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def start_ray(ray_cfg: RayConfig) -> bool:
    """Start (or join) Ray; return True if we started it and must stop it (:func:`stop_ray`)."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING"}
    if ray_cfg.address:
        _join_cluster(ray_cfg.address, kwargs)
        return True
    # Progress is shown once, by the driver; datatrove's own bars inside workers are noise.
    with _loopback_node(), _deaf_to_stop_signals(), _handlers_kept():
        _start_reaper()
        try:
            ray.init(num_cpus=ray_cfg.num_cpus or None, runtime_env={"env_vars": {"TQDM_DISABLE": "1"}},
                     _node_ip_address="127.0.0.1", **kwargs)
        except BaseException:
            _stop_reaper()  # sweeps up what the failed start left running
            raise
    return True


_reaper: subprocess.Popen | None = None  # the sweeper of the local instance this process started
REAPER_WAIT_S = 10.0  # a sweep takes well under a second; a stuck one must not hold up the driver


def _start_reaper() -> None:
    """Start :mod:`dataprep.ray_reaper` for the local instance about to start (Linux: it reads /proc).

    Started before ``ray.init``, so that a driver killed while Ray starts is swept up after too, and
    inside :func:`_deaf_to_stop_signals`: it inherits the blocked stop signals. Its stdin is a pipe
    whose write end only this process holds (Python's descriptors are not inherited, and Ray starts
    its daemons with ``close_fds``); ``-I -S``: it needs the standard library only."""
    global _reaper
    if not os.path.isdir("/proc/self/fd"):
        return
    script = Path(__file__).with_name("ray_reaper.py")
    _reaper = subprocess.Popen([sys.executable, "-I", "-S", str(script), str(os.getpid())], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL)


def _stop_reaper() -> None:
    """Let the sweeper sweep now (after Ray's own shutdown, it finds nothing or a straggler) and end."""
    global _reaper
    reaper, _reaper = _reaper, None
    if reaper is None:
        return
    reaper.stdin.close()
    try:
        reaper.wait(timeout=REAPER_WAIT_S)
    except subprocess.TimeoutExpired:
        reaper.kill()
        reaper.wait()


JOIN_PROBE_S = 10.0  # how long a HOST:PORT in ray.address gets to accept a connection


def _join_cluster(address: str, kwargs: dict[str, Any]) -> None:
    """``ray.init(address=...)``, its failures a data-stage error naming ``ray.address`` (exit 1: the
    cluster may be up on a rerun). Ray raises a ConnectionError traceback for ``auto`` with no
    cluster on this machine, and retries a HOST:PORT nothing answers for minutes; a probe of the
    port first makes that seconds."""
    import ray

    if "://" not in address and address != "auto":
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=JOIN_PROBE_S).close()
        except OSError as e:
            raise TransientDataError(f"ray.address {address}: no Ray cluster answers there ({e}); start it first "
                                     "(`ray start --head`), or leave ray.address empty for a local Ray instance") from e
    try:
        with _handlers_kept():
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError) as e:
        raise TransientDataError(f"ray.address {address}: cannot join the Ray cluster ({type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r})") from e


def stop_ray() -> None:
    """Disconnect from Ray and stop the local instance's processes, if this process started them.

    Stop signals stay with the caller's handlers throughout: the main thread holds them back while
    Ray shuts down, and the handlers come back as soon as Ray's core worker is down, before its
    daemons are stopped (seconds, see :func:`_deaf_to_stop_signals`), not after. Then the sweeper
    (:mod:`dataprep.ray_reaper`) ends whatever of the instance still runs, and itself."""
    import ray

    with _deaf_to_stop_signals(), _handlers_kept() as put_back:
        _before_daemons_stop(put_back)
        ray.shutdown()
        _stop_reaper()


def _before_daemons_stop(action: Callable[[], None]) -> None:
    """Run ``action`` inside ``ray.shutdown``, between the core worker's end (which resets SIGTERM
    to the default action, "terminate") and the stopping of the local daemons."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    kill = getattr(node, "kill_all_processes", None)
    if kill is None:  # joined a cluster (nothing of ours to stop), or another Ray: no early hook
        return

    def kill_all_processes(*args: Any, **kwargs: Any) -> Any:
        action()
        # Ray's "graceful" stop sends each daemon a SIGTERM and waits up to a second for it to end;
        # ours never hear SIGTERM (_deaf_to_stop_signals), so that wait (about 4 s in all) would end
        # in the SIGKILL this asks for at once.
        return kill(*args, **{**kwargs, "allow_graceful": False})

    node.kill_all_processes = kill_all_processes


@contextlib.contextmanager
def _handlers_kept() -> Iterator[Callable[[], None]]:
    """Put this process's signal handlers back after Ray has replaced them; yields the function
    that does it, to do it early as well.

    ``ray.init`` installs a C++ failure handler for SIGTERM in the driver that aborts the process
    (exit -6, a stack dump) and ``ray.shutdown`` resets it to the default (exit 143), where the
    caller's handler must stop it cleanly. Restored inside :func:`_deaf_to_stop_signals`, so a
    signal held back meanwhile finds the caller's handler."""
    saved = {s: signal.getsignal(s) for s in (*STOP_SIGNALS, signal.SIGINT)}

    def put_back() -> None:
        for signum, handler in saved.items():
            if handler is not None:  # None: set outside Python; nothing to put back
                signal.signal(signum, handler)

    try:
        yield put_back
    finally:
        put_back()
