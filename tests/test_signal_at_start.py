"""A stop signal that comes while a process is still starting (importing torch, the CLI's stages:
0.3-3 s, when SLURM's signal for a job that just started or was requeued tends to come) must give
exit 3, promptly, like one that comes later: not death by the signal (-15, which SLURM and our
launcher read as "killed"), nor a lost signal and a run that goes on (common.stop_signals).

The signal is sent at a fixed point of the real entry points, not after a guessed delay: a
``sitecustomize`` (on PYTHONPATH, so torchrun's workers load it too) makes the chosen process send
it to itself when it first imports a chosen module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer_helpers import REPO, make_shard_dir, micro_config

SITECUSTOMIZE = '''
import os, signal, sys

class _SignalAtImport:
    """PRETRAIN_TEST_SIGNAL_AT="ARGV0_NAME RANK MODULE SIGNAL": that process (RANK * = any) sends SIGNAL to itself
    when it first imports MODULE."""

    def __init__(self, spec):
        self.argv0, self.rank, self.module, signame = spec.split()
        self.signum = getattr(signal, signame)

    def find_spec(self, name, path=None, target=None):
        argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
        if name == self.module and argv0 == self.argv0 and self.rank in ("*", os.environ.get("RANK")):
            sys.meta_path.remove(self)
            os.kill(os.getpid(), self.signum)
        return None

if os.environ.get("PRETRAIN_TEST_SIGNAL_AT"):
    sys.meta_path.insert(0, _SignalAtImport(os.environ["PRETRAIN_TEST_SIGNAL_AT"]))
'''


def _run(cmd: list[str], tmp_path: Path, signal_at: str, timeout: float = 120) -> subprocess.CompletedProcess:
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
           "PRETRAIN_TEST_SIGNAL_AT": signal_at}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _pretrain(entry: str) -> tuple[list[str], str]:
    """The command line of `pretrain` and its ``sys.argv[0]`` name: the console script, or ``python -m``."""
    script = Path(sys.executable).with_name("pretrain")
    if entry == "script":
        if not script.exists():
            pytest.skip("the `pretrain` console script is not installed next to this interpreter")
        return [str(script)], "pretrain"
    return [sys.executable, "-m", "pipelines.cli"], "cli.py"


@pytest.mark.parametrize(("entry", "signame"), [("script", "SIGTERM"), ("module", "SIGUSR2")])
def test_a_stop_signal_while_pretrain_imports_is_exit_3(tmp_path, entry, signame):
    """While `pretrain` imports its modules (before any handler of the command exists), a stop
    signal is held, then acted on as soon as the command's handler is there. Lost, the command would
    refuse the missing checkpoint (2); unheld, it dies of the signal."""
    cmd, argv0 = _pretrain(entry)
    r = _run([*cmd, "eval", str(tmp_path / "no-checkpoint")], tmp_path, f"{argv0} * pipelines.config {signame}")
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert f"pretrain eval: stopped by {signame}" in r.stderr


def test_a_quick_command_still_dies_of_a_stop_signal(tmp_path):
    """Commands without a stop handler of their own (status, submit --wait, ...) get the default
    action back: the hold must not make them unkillable, nor let them run on after a stop."""
    cmd, argv0 = _pretrain("script")
    r = _run([*cmd, "status", str(tmp_path)], tmp_path, f"{argv0} * pipelines.config SIGTERM")
    assert r.returncode == -signal.SIGTERM, (r.returncode, r.stderr)


def test_a_worker_signalled_while_importing_torch_stops_every_rank_with_exit_3(tmp_path):
    """Rank 1 alone gets SIGTERM while it imports torch: both ranks agree to stop before training
    (nothing to save: no step, no checkpoint), and `pretrain train` exits 3. Before, rank 1 died of
    the signal and torchrun's failure made it exit 1: a failed job, never requeued."""
    data = make_shard_dir(tmp_path / "data")
    config = tmp_path / "run.yaml"
    config.write_text(micro_config(tmp_path / "run", data, train={"max_steps": 1000}))
    cmd, _ = _pretrain("module")
    r = _run([*cmd, "train", str(config)], tmp_path, "train.py 1 torch SIGTERM", timeout=300)
    assert r.returncode == 3, (r.returncode, r.stderr[-3000:])
    assert "a stop signal came while the workers started, before training" in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # it stopped before training, not after a while
