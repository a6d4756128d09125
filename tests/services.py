"""Real services the tests start themselves (no mocks): an MLflow tracking server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from tests.conftest import skip_or_fail


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (sqlite store, 1 worker, no job runner) that a test can kill,
    freeze and restart on the same port and store (an outage as a user would see it)."""

    def __init__(self, tmp: Path, port: int | None = None) -> None:
        self.exe = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
        if not Path(self.exe).exists():
            skip_or_fail("the mlflow CLI is not installed")
        self.tmp = tmp
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "mlflow-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.exe, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.tmp / 'm.db'}", "--artifacts-destination", str(self.tmp / "artifacts")],
                cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.uri
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                skip_or_fail(f"mlflow server did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL the server's whole process group (an outage, not a shutdown); the store stays."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
            self.proc = None
        except (ProcessLookupError, subprocess.TimeoutExpired):
            self.kill()


@contextlib.contextmanager
def mlflow_server(tmp: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 for the duration of the block; yields its URI."""
    server = MlflowServer(tmp)
    try:
        yield server.start()
    finally:
        server.stop()
