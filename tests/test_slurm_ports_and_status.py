"""The rendezvous port of multi-node jobs: below Linux's ephemeral ports, configurable
(``slurm.rdzv_ports``), and a busy one named. The runs on the SLURM test cluster are in
tests/test_slurm_audit.py (one module group on the cluster)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from slurm.config import SlurmConfig
from slurm.ports import port_problem, rendezvous_port


@contextmanager
def port_held_by_an_outgoing_connection() -> Iterator[int]:
    """A local port taken the way a busy node takes ephemeral ones: by a connection it opened."""
    with socket.create_server(("127.0.0.1", 0)) as server, socket.socket() as client:
        client.connect(server.getsockname())
        accepted, _ = server.accept()
        with accepted:
            yield client.getsockname()[1]


def test_rendezvous_port_is_below_the_ephemeral_range_configurable_and_checked():
    assert {rendezvous_port(str(j)) for j in range(0, 100_000, 7)} <= set(range(20000, 30000))  # < 32768
    assert rendezvous_port("12", (40000, 40009)) == 40002 and rendezvous_port("7_3", (40000, 40009)) == 40003
    for bad in ("80-90", "30000-20000", "20000-70000", "20000:29999"):
        with pytest.raises(ValueError, match="rdzv_ports"):
            SlurmConfig(rdzv_ports=bad).validate()
    from slurm.sbatch import render_sbatch

    script = render_sbatch(["x"], SlurmConfig(rdzv_ports="40000-40009"), Path("/tmp/logs"), "n", 3)
    assert "port=$(( 40000 + SLURM_JOB_ID % 10 ))" in script
    with port_held_by_an_outgoing_connection() as port:
        problem = port_problem(port, (port, port), "n1")
        assert problem is not None and f"rendezvous port {port} on n1 is in use" in problem and "slurm.rdzv_ports" in problem
    with socket.create_server(("127.0.0.1", 0)) as s:
        free = s.getsockname()[1]
    assert port_problem(free, (free, free), "n1") is None
