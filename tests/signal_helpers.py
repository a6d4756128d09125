"""Run a `pretrain` command in a fresh process that receives real stop signals at a chosen point.

The point is a function of the project (``module:attr`` or ``module:Class.method``), wrapped so
that SIGTERM is sent to the process itself just before the original runs (``before``) or just
after it returned (``after``); ``twice`` also sends a second SIGTERM from inside the first one's
unwinding (SLURM and ``kill -- -PGID`` often deliver two). After the command returns, one more
SIGTERM arrives as the process exits: the exit code must still be the command's own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = """
import importlib, os, signal, sys

target, mode, twice = sys.argv[1], sys.argv[2], sys.argv[3] == "twice"
module_name, path = target.split(":")
owner = importlib.import_module(module_name)
*parents, name = path.split(".")
for part in parents:
    owner = getattr(owner, part)
original = getattr(owner, name)

def stop_signal():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        if twice:
            os.kill(os.getpid(), signal.SIGTERM)

def signalled(*args, **kwargs):
    if mode == "before":
        stop_signal()
    result = original(*args, **kwargs)
    if mode == "after":
        stop_signal()
    return result

setattr(owner, name, signalled)
from pipelines.cli import main
sys.argv = ["pretrain", *sys.argv[4:]]
code = main()
os.kill(os.getpid(), signal.SIGTERM)  # a late one, after the outcome is decided
sys.exit(code)
"""


def run_signalled(target: str, mode: str, *argv: str, twice: bool = False, timeout: float = 300,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`pretrain ARGV` with SIGTERM at ``target`` (see the module docstring); its exit code and output."""
    assert mode in ("before", "after")
    return subprocess.run([sys.executable, "-c", _SCRIPT, target, mode, "twice" if twice else "once", *argv],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
