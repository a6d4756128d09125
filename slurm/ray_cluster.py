"""A Ray cluster inside one SLURM allocation: `ray start` on every node, a driver on the first.

Every task of a multi-node job (one per node, see :class:`slurm.node_command.NodeCommand`) runs::

    python -m slurm.ray_cluster --nnodes {nnodes} --head {rdzv_endpoint} [--cpus N] [--memory-gb G] -- DRIVER...

* node 0 starts the head (``ray start --head --block``, GCS on the port of ``--head``), waits until
  ``--nnodes`` nodes have joined, runs ``DRIVER`` (``{ray_address}`` in it becomes the head's
  ``IP:PORT``; ``RAY_ADDRESS`` is set too) and stops its Ray processes; its exit code is the driver's;
* every other node waits for the head's port, joins (``ray start --address``), and leaves when the
  head's port closes, exiting 0.

Why a wrapper rather than Ray's own launcher: the allocation is already there (no autoscaler), the
head's address is only known inside the job, and the job must end when the driver ends.

Each node runs Ray with its own ``--temp-dir`` (``<tmp>/ray-<job>-<node>``): two "nodes" of one
machine (the tests' cluster) must not share a session directory, and a node-local temp dir keeps
Ray's sockets off a shared filesystem. Processes are stopped through the ``ray start --block``
process this wrapper started (SIGTERM: it drains and stops what it started), never with ``ray stop``,
which would stop every Ray instance of the user on the machine.

Network: every node registers with its address inside the allocation (``--node-ip-address``), so
nodes reach each other there. Ray 2.x binds its gRPC servers (GCS, raylets, object managers,
workers) to all interfaces whenever that address is not a loopback one; there is no switch for
one address. Token authentication (``RAY_AUTH_MODE=token``) is therefore always on: the token is
``RAY_AUTH_TOKEN`` if set, else the file ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, which the
head creates (mode 0600) when missing and the other nodes read (a home directory every node sees).

A stop signal (SIGTERM, SIGUSR2: preemption, time limit, ``scancel``) stops the driver and Ray on
every node; node 0 then exits ``--stopped-exit-code`` (default 3, "requeue me"), so a requeued job
resumes with whatever the driver keeps across runs.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.stop_signals import STOP_SIGNALS, ignore_stop_signals

_WAIT_NODES = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", include_dashboard=False)
deadline = time.time() + float(sys.argv[3])
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= int(sys.argv[2]) or time.time() > deadline:
        break
    time.sleep(1)
print(json.dumps({"nodes": len(alive), "cpus": ray.cluster_resources().get("CPU", 0)}))
"""


class _Stop(Exception):
    """A stop signal arrived (SIGTERM/SIGUSR2)."""


def _on_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def log(message: str) -> None:
    print(f"[ray_cluster {time.strftime('%H:%M:%S')}] {message}", flush=True)


def node_address(head_host: str, rank: int) -> str:
    """This node's IP inside the allocation: the head's own for node 0; otherwise the address of
    this host's name, unless that is loopback while the head is not (a Debian-style
    ``127.0.1.1 host`` line), then the source address of the route to the head."""
    head_ip = socket.gethostbyname(head_host)
    if rank == 0:
        return head_ip
    mine = socket.gethostbyname(socket.gethostname())
    if mine.startswith("127.") and not head_ip.startswith("127."):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((head_ip, 9))  # UDP: no packet is sent, the kernel only picks the route
            mine = s.getsockname()[0]
    return mine


def ensure_auth_token() -> None:
    """Make sure a token exists for the head to use (see the module docstring)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.is_file() and path.read_text().strip():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole under a private name, then linked into place: another job's head starting at
    # the same time sees no file or the complete token, never an empty one (which Ray would
    # replace with a token of its own, and the two heads would disagree).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    except FileExistsError:
        return  # another job's head made it at the same time
    finally:
        tmp.unlink(missing_ok=True)
    log(f"created the Ray auth token {path} (mode 0600)")


def temp_dir(job_id: str, rank: int) -> str:
    """A short node-local Ray temp dir: Ray's socket paths under it must stay < 108 bytes."""
    base = tempfile.gettempdir()
    if len(base) > 40:
        base = "/tmp"
    return os.path.join(base, f"ray-{job_id}-{rank}")


def ray_env(tmp: str) -> dict[str, str]:
    """Every Ray process this starts (and the driver) uses token auth and this node's temp dir. No
    drain on SIGTERM (Ray waits up to 30 s for a node to drain; when we stop a node the driver is
    done, or stopped, and a worker whose head is gone cannot drain at all)."""
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": tmp,
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def start_ray(argv: list[str], tmp: str) -> subprocess.Popen:
    """``ray start --block`` in a session of its own: if it dies, Ray's reaper kills its process
    group, which must not be this wrapper's (nor the SLURM task's)."""
    return subprocess.Popen(argv, env=ray_env(tmp), start_new_session=True)


def start_argv(args: argparse.Namespace, ip: str, rank: int, tmp: str) -> list[str]:
    """``ray start`` for this node; ``--block``: it stays in the foreground and, on SIGTERM, stops
    exactly the processes it started."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    host, port = args.head.rsplit(":", 1)
    argv = [ray_bin, "start", "--block", "--node-ip-address", ip, "--temp-dir", tmp, "--disable-usage-stats"]
    if rank == 0:
        argv += ["--head", "--port", port, "--include-dashboard=false"]
    else:
        argv += ["--address", f"{socket.gethostbyname(host)}:{port}"]
    if args.cpus:
        argv += ["--num-cpus", str(args.cpus)]
    if args.memory_gb:
        argv += ["--memory", str(int(args.memory_gb * 2**30))]
    if args.object_store_gb:
        argv += ["--object-store-memory", str(int(args.object_store_gb * 2**30))]
    return argv


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not port_open(host, port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode} before {host}:{port} opened")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")
        time.sleep(1)


def wait_for_nodes(address: str, nodes: int, timeout: float, tmp: str) -> dict:
    """Block until ``nodes`` Ray nodes are alive (a short-lived driver of its own); returns
    ``{"nodes": n, "cpus": c}`` as the cluster reports them."""
    import json

    out = subprocess.run([sys.executable, "-c", _WAIT_NODES, address, str(nodes), str(timeout)], env=ray_env(tmp), check=False,
                         capture_output=True, text=True, timeout=timeout + 120)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"could not query the Ray cluster at {address}: {out.stderr.strip()[-2000:]}")
    found = json.loads(out.stdout.strip().splitlines()[-1])
    if found["nodes"] < nodes:
        raise TimeoutError(f"only {found['nodes']} of {nodes} Ray nodes joined within {timeout:.0f} s")
    return found


def stop(proc: subprocess.Popen | None, grace_s: float = 45.0) -> None:
    """Stop a child and what it started: SIGTERM (``ray start --block`` drains and stops its
    processes), then SIGKILL after ``grace_s``."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_head(args: argparse.Namespace, ip: str, tmp: str) -> int:
    """Node 0: head, wait for every node, the driver; returns the driver's exit code."""
    ensure_auth_token()
    port = int(args.head.rsplit(":", 1)[1])
    address = f"{ip}:{port}"
    ray_proc = driver = None
    try:
        ray_proc = start_ray(start_argv(args, ip, 0, tmp), tmp)
        wait_for_port(ip, port, args.join_timeout, ray_proc)
        found = wait_for_nodes(address, args.nnodes, args.join_timeout, tmp)
        log(f"{found['nodes']} node(s), {found['cpus']:g} CPUs joined the head at {address}")
        argv = [a.replace("{ray_address}", address) for a in args.driver]
        log(f"driver: {' '.join(argv)}")
        driver = subprocess.Popen(argv, env={**ray_env(tmp), "RAY_ADDRESS": address})
        rc = driver.wait()
        log(f"driver exited with {rc}")
        if rc < 0 and -rc in STOP_SIGNALS:  # the stop signal reached the driver before us
            return args.stopped_exit_code
        return rc
    except _Stop as e:
        log(f"{e}: stopping the driver and Ray; exit {args.stopped_exit_code}")
        return args.stopped_exit_code
    finally:
        ignore_stop_signals()
        stop(driver, grace_s=30.0)
        stop(ray_proc)


def run_worker(args: argparse.Namespace, ip: str, rank: int, tmp: str) -> int:
    """Every other node: join once the head listens, leave when it is gone."""
    host, port = args.head.rsplit(":", 1)
    head_ip = socket.gethostbyname(host)
    ray_proc = None
    try:
        wait_for_port(head_ip, int(port), args.join_timeout)
        ray_proc = start_ray(start_argv(args, ip, rank, tmp), tmp)
        while ray_proc.poll() is None and port_open(head_ip, int(port)):
            time.sleep(1)
        if ray_proc.poll() is None:
            log(f"node {rank}: the head at {head_ip}:{port} is gone; leaving")
        else:  # the head's driver sees its tasks there fail and decides; this node has nothing left to do
            log(f"node {rank}: ray start exited with {ray_proc.returncode}; leaving")
        return 0
    except _Stop as e:
        log(f"node {rank}: {e}: stopping Ray")
        return 0
    finally:
        ignore_stop_signals()
        stop(ray_proc)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m slurm.ray_cluster", description=__doc__.splitlines()[0])
    p.add_argument("--nnodes", type=int, required=True, help="nodes that must join before the driver starts")
    p.add_argument("--head", required=True, metavar="HOST:PORT", help="first node of the allocation and the GCS port")
    p.add_argument("--node-rank", type=int, default=None, help="this node's index (default: $SLURM_NODEID)")
    p.add_argument("--job-id", default=os.environ.get("SLURM_JOB_ID", "local"), help="names the temp dir")
    p.add_argument("--cpus", type=int, default=0, help="Ray CPUs per node (0: Ray counts them)")
    p.add_argument("--memory-gb", type=float, default=0, help="Ray task memory per node (0: Ray's default)")
    p.add_argument("--object-store-gb", type=float, default=0, help="object store per node (0: Ray's default, 30%% of memory)")
    p.add_argument("--join-timeout", type=float, default=300.0, help="seconds to wait for the head and the nodes")
    p.add_argument("--stopped-exit-code", type=int, default=3, help="node 0's exit code after a stop signal")
    p.add_argument("driver", nargs=argparse.REMAINDER, help="-- the driver command ({ray_address} is filled in)")
    args = p.parse_args(argv)
    args.driver = args.driver[1:] if args.driver[:1] == ["--"] else args.driver
    if not args.driver:
        p.error("a driver command is required after --")
    if args.node_rank is None:
        args.node_rank = int(os.environ.get("SLURM_NODEID", "0"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for s in STOP_SIGNALS:
        signal.signal(s, _on_stop)
    rank = args.node_rank
    try:
        ip = node_address(args.head.rsplit(":", 1)[0], rank)
        tmp = temp_dir(args.job_id, rank)
        log(f"node {rank}/{args.nnodes} at {ip}, temp dir {tmp}")
        return run_head(args, ip, tmp) if rank == 0 else run_worker(args, ip, rank, tmp)
    except _Stop:
        return args.stopped_exit_code if rank == 0 else 0
    except (OSError, RuntimeError, TimeoutError) as e:
        log(f"node {rank}: error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
