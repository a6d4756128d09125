"""The rendezvous port of a multi-node job (torchrun's store, the data job's Ray GCS) on its first node.

Every node must compute the same port without talking to the others, so it is derived from the job
id: ``LOW + job id mod (HIGH - LOW + 1)`` over ``slurm.rdzv_ports``. The default range sits below
Linux's ephemeral ports (``/proc/sys/net/ipv4/ip_local_port_range``, 32768-60999 by default): a
port there may be held by any outgoing connection of the node, and the rendezvous then fails after
torchrun's two 60 s connection timeouts with nothing but stack traces. A port that is in use anyway
(another job's, a service's) is found by the first node before the command starts (:func:`port_problem`)
and named in a one-line error; both launch routes run that one check (:func:`check_rendezvous_port`):
``slurm.node_command`` in Python, the sbatch script through ``python -m slurm.ports check`` (:func:`main`)."""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Callable
from pathlib import Path

DEFAULT_RDZV_PORTS = (20000, 29999)
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def rendezvous_port(job_id: str, ports: tuple[int, int] = DEFAULT_RDZV_PORTS) -> int:
    """The port of job ``job_id`` ("123", or "123_4" for an array task: its digits) in ``ports``."""
    low, high = ports
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return low + int(digits) % (high - low + 1)


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int] | None:
    """This machine's range of ports for outgoing connections, or None where it cannot be read."""
    try:
        low, high = (int(x) for x in path.read_text().split()[:2])
    except (OSError, ValueError):
        return None
    return low, high


def port_in_use(port: int) -> str | None:
    """Why a server cannot listen on ``port`` on every interface here (the OS error), or None if it can.
    Bound the way torchrun's store binds (SO_REUSEADDR, so a port only in TIME_WAIT counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            s.listen(1)
        except OSError as e:
            return e.strerror or str(e)
    return None


def port_problem(port: int, ports: tuple[int, int], host: str) -> str | None:
    """The error for a rendezvous port that is in use on this node (the first of the job), or None."""
    why = port_in_use(port)
    if why is None:
        return None
    eph = ephemeral_range()
    hint = f"; pick a range outside this node's ephemeral ports {eph[0]}-{eph[1]}" if eph else ""
    return (f"rendezvous port {port} on {host} is in use ({why}), so the job's nodes cannot meet: submit the job again "
            f"(another job id, another port) or set slurm.rdzv_ports (now {ports[0]}-{ports[1]}) to a free range{hint}")


def ephemeral_note(port: int) -> str | None:
    """A warning when ``port`` lies in this node's ephemeral range (free now, but any outgoing connection may take it)."""
    eph = ephemeral_range()
    if eph is None or not eph[0] <= port <= eph[1]:
        return None
    return (f"rendezvous port {port} lies in this node's ephemeral port range {eph[0]}-{eph[1]}: an outgoing "
            "connection may take it before the rendezvous; set slurm.rdzv_ports below it")


def check_rendezvous_port(port: int, ports: tuple[int, int], host: str, warn: Callable[[str], None]) -> str | None:
    """What the first node of a multi-node job checks before its command starts: ``warn`` gets the
    ephemeral-range note where it applies; the result is the error for a port in use, or None."""
    if (note := ephemeral_note(port)) is not None:
        warn(note)
    return port_problem(port, ports, host)


def _port_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    if not (sep and low.isdigit() and high.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW-HIGH")
    return int(low), int(high)


def main(argv: list[str] | None = None) -> int:
    """``python -m slurm.ports check PORT LOW-HIGH HOST``, for the sbatch script's first node: exit 0
    if the port is free, else 1 (failed; another job id gets another port) with the error on stdout.
    The ephemeral-range warning goes to stderr, so that the script can put the error in its exit line."""
    parser = argparse.ArgumentParser(prog="python -m slurm.ports", description="Check a rendezvous port on this node.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="exit 1, naming the port, if it is in use here")
    check.add_argument("port", type=int)
    check.add_argument("range", type=_port_range, help="slurm.rdzv_ports, LOW-HIGH (named in the error)")
    check.add_argument("host", help="this node's name, as the other nodes reach it")
    args = parser.parse_args(argv)
    problem = check_rendezvous_port(args.port, args.range, args.host, lambda note: print(f"warning: {note}", file=sys.stderr, flush=True))
    if problem is None:
        return 0
    print(problem, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
