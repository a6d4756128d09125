"""``python -m trainer.torchrun_local ARGS``: torchrun whose TCP stores listen on loopback only.

torchrun's agent hosts two ``TCPStore`` servers (the c10d rendezvous store and the store the
workers bootstrap from), and ``TCPStore`` always listens on every interface, whatever host name
it is given: on a shared login or compute node, ``--standalone`` opens ``*:<port>`` to anyone
who can reach the machine. The store has no bind-address option, but it accepts an already
listening socket (``master_listen_fd``); this module makes every store *server* torchrun creates
for a loopback host (``localhost``, ``127.0.0.1``, ``::1``) listen on a socket bound to 127.0.0.1,
then runs torchrun's own ``main``. With the c10d endpoint ``127.0.0.1:0`` and
``--local-addr=127.0.0.1`` (``trainer.launch.local_rendezvous_args``) both stores are such servers, and the workers connect to them as clients (``TORCHELASTIC_USE_AGENT_STORE``);
gloo/NCCL are kept on loopback by ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME=lo``, which the
launcher sets (``trainer.launch.loopback_env``).

Only single-node runs use this; multi-node runs bind where SLURM's rendezvous endpoint says.
The patch touches a stable public constructor; ``tests/test_trainer_hardening.py`` checks what
really listens during a 2-rank run, so a torch upgrade that bypasses it fails loudly.
"""

from __future__ import annotations

if __name__ == "__main__":  # torchrun's imports (torch: ~1 s of CPU) with the collector paused: common.startup
    from common.startup import pause_collector

    pause_collector()

import ipaddress  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

import torch.distributed as dist  # noqa: E402

from common.process_exit import exit_now  # noqa: E402
from common.startup import resume_collector  # noqa: E402

_TCPStore = dist.TCPStore


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LoopbackTCPStore(_TCPStore):
    """``TCPStore`` that, as a server for a loopback host, listens on 127.0.0.1 only."""

    def __init__(self, host_name: str, port: int, *args, **kwargs) -> None:
        is_master = kwargs.get("is_master", args[1] if len(args) > 1 else False)
        if is_master and is_loopback(host_name) and kwargs.get("master_listen_fd") is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", int(port)))
                sock.listen(socket.SOMAXCONN)
                port = sock.getsockname()[1]
            except BaseException:
                sock.close()
                raise
            kwargs["master_listen_fd"] = sock.detach()
        super().__init__(host_name, port, *args, **kwargs)


def install() -> None:
    """Make torchrun's agent create loopback-bound store servers (idempotent)."""
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend

    dist.TCPStore = LoopbackTCPStore
    c10d_rendezvous_backend.TCPStore = LoopbackTCPStore


def main() -> None:
    """torchrun's own ``main`` less its failure report: when a worker exits non-zero, torchrun prints
    a Python traceback around a table, which reads as a crash even when rank 0 refused a config
    (exit 2) or checkpointed on a signal (3). The launcher (``trainer.launch``) reports the real
    outcome from rank 0's exit file; here one line per failed rank says which and how it ended."""
    install()
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    resume_collector()
    try:
        run(parse_args(sys.argv[1:]))
    except ChildFailedError as e:
        for rank, failure in sorted(e.failures.items()):
            how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit {failure.exitcode}"
            print(f"torchrun: rank {rank} (pid {failure.pid}) ended with {how}", file=sys.stderr, flush=True)
        exit_now(1)
    exit_now(0)  # the workers are gone: skip the interpreter's teardown (common.process_exit)


if __name__ == "__main__":
    main()
