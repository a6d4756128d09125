"""What a training ran, where and on which data: recorded in its MLflow run and its run dir.

``MlflowClient.create_run`` (which the tracker uses, so it never touches global MLflow state)
sets none of MLflow's automatic tags, so they are set here, from the tracker's background thread
(``trainer.tracking``), never from the training loop:

* ``mlflow.source.name``, ``mlflow.source.type`` (``JOB`` under SLURM, else ``LOCAL``),
  ``mlflow.user``, and ``mlflow.source.git.commit`` when the code is a git checkout;
* ``pretrain.git.commit`` and ``pretrain.git.dirty`` of the code that runs (the checkout holding
  this package; absent when it is not one, e.g. an installed wheel). Dirty means a tracked file
  differs from the commit; untracked files (run dirs, caches) do not count;
* ``pretrain.version.{python,torch,cuda,mlflow,numpy}``, ``pretrain.gpu.model`` and
  ``pretrain.gpu.count`` (this node's visible devices; ``resolved.world_size`` is a param),
  ``pretrain.hostname``, ``pretrain.slurm.job_id`` and ``pretrain.slurm.nodes`` under SLURM.

Tags are set again on every start, so a resume on another node or in a requeued job shows where
the run is now. The data manifest becomes the run's dataset input (``mlflow.data``): its digest is
the manifest fingerprint (the one checkpoints record; MLflow's SQL stores keep 36 characters of
it) and its profile holds the full fingerprint and the token, document and shard counts per split.
System metrics (CPU, memory, GPU) go to the run when ``psutil`` is installed and
``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` is not ``false``; without it, nothing is logged.

The resolved config is also written to ``RUN_DIR/config.yaml`` by each start (rank 0); a previous
one that differs is kept as ``config.prev.yaml``.
"""

from __future__ import annotations

import getpass
import json
import os
import platform
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

from common.durable import atomic_write_bytes
from common.rundir import RunDir

GIT_TIMEOUT_S = 5.0  # a hung NFS checkout must not hold up tracking for long
DIGEST_CHARS = 36  # MLflow's SQL stores: datasets.digest is VARCHAR(36)
SOURCE_NAME = "pretrain train"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the checkout (or site-packages) holding trainer/


def write_run_config(run_dir: str | Path, text: str) -> None:
    """``RUN_DIR/config.yaml`` (atomic); a previous, different one becomes ``config.prev.yaml``.

    The previous file is compared and kept as bytes: one that is not UTF-8 (edited by hand, or
    damaged) is still a previous config to keep, never a reason to refuse every start."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    layout = RunDir(run_dir)
    path = layout.config
    new = text.encode()
    try:
        old: bytes | None = path.read_bytes()
    except FileNotFoundError:
        old = None
    if old == new:
        return
    if old is not None:
        atomic_write_bytes(layout.prev_config, old)
    atomic_write_bytes(path, new)


def _git(root: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def git_state(root: Path = PACKAGE_ROOT) -> dict[str, str]:
    """``{"commit": sha, "dirty": "true"|"false"}`` of the checkout at ``root``; {} if it is none.

    A package installed inside some other repository (a venv in a project dir) is not that
    repository's code: the checkout's top level must be ``root`` itself.
    """
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != root.resolve():
        return {}
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return {}
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    out = {"commit": commit.strip()}
    if status is not None:
        out["dirty"] = "true" if status.strip() else "false"
    return out


def _versions() -> dict[str, str]:
    import mlflow
    import numpy
    import torch

    return {
        "pretrain.version.python": platform.python_version(),
        "pretrain.version.torch": torch.__version__,
        "pretrain.version.cuda": torch.version.cuda or "none",
        "pretrain.version.mlflow": mlflow.__version__,
        "pretrain.version.numpy": numpy.__version__,
    }


def _gpus() -> dict[str, str]:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out = {"pretrain.gpu.count": str(count)}
    if count:
        out["pretrain.gpu.model"] = torch.cuda.get_device_name(0)
    return out


def provenance_tags(root: Path = PACKAGE_ROOT) -> dict[str, str]:
    """The run's provenance tags (see the module doc); a few ms plus two bounded git calls."""
    job = os.environ.get("SLURM_JOB_ID", "")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    tags = {
        "mlflow.source.name": SOURCE_NAME,
        "mlflow.source.type": "JOB" if job else "LOCAL",
        "pretrain.hostname": socket.gethostname(),
        **_versions(),
        **_gpus(),
    }
    if user:
        tags["mlflow.user"] = user
    if job:
        tags["pretrain.slurm.job_id"] = job
        tags["pretrain.slurm.nodes"] = os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1"))
    git = git_state(root)
    if "commit" in git:
        tags["pretrain.git.commit"] = tags["mlflow.source.git.commit"] = git["commit"]
    if "dirty" in git:
        tags["pretrain.git.dirty"] = git["dirty"]
    return tags


def manifest_profile(manifest: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    """Token, document and shard counts per split, the fingerprint and the tokenizer of a shard manifest."""
    profile: dict[str, Any] = {"fingerprint": fingerprint}
    for shard in manifest.get("shards", []):
        split = shard.get("split", "?")
        profile[f"{split}_tokens"] = profile.get(f"{split}_tokens", 0) + int(shard.get("tokens", 0))
        profile[f"{split}_docs"] = profile.get(f"{split}_docs", 0) + int(shard.get("docs", 0))
        profile[f"{split}_shards"] = profile.get(f"{split}_shards", 0) + 1
    tokenizer = manifest.get("tokenizer") or {}
    if tokenizer.get("name"):
        profile["tokenizer"] = tokenizer["name"]
    return profile


def manifest_dataset_input(data_dir: str | Path) -> Any:
    """The shard directory's manifest as an ``mlflow.entities.DatasetInput`` (context ``train``)."""
    import hashlib

    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    from dataprep.shards import MANIFEST_NAME

    path = Path(data_dir).resolve() / MANIFEST_NAME
    raw = path.read_bytes()
    fingerprint = hashlib.sha256(raw).hexdigest()  # as dataprep.shards.TokenDataset computes it
    profile = manifest_profile(json.loads(raw), fingerprint)

    class ManifestDataset(MetaDataset):
        @property
        def profile(self) -> dict[str, Any]:
            return profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(profile)}  # MetaDataset leaves the profile out

    dataset = ManifestDataset(LocalArtifactDatasetSource(str(path)), name=path.parent.name, digest=fingerprint[:DIGEST_CHARS])
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "train")])


class SystemMetrics:
    """MLflow's system metrics monitor for a run, when it can run here; stopping it is bounded."""

    def __init__(self, uri: str, run_id: str) -> None:
        self._monitor: Any = None
        if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower() == "false":
            return
        try:
            import psutil  # noqa: F401 - mlflow's monitor needs it; without it there are no system metrics
            from mlflow.system_metrics.system_metrics_monitor import (
                SystemMetricsMonitor,
            )
        except ImportError:
            return
        self._monitor = SystemMetricsMonitor(run_id, tracking_uri=uri, resume_logging=True)
        self._monitor.start()  # its own daemon thread

    @property
    def running(self) -> bool:
        return self._monitor is not None

    def stop(self, timeout: float = 2.0) -> None:
        """Stop sampling; its last flush gets ``timeout`` seconds (a down server cannot hold us)."""
        if self._monitor is None:
            return
        t = threading.Thread(target=self._monitor.finish, name="system-metrics-finish", daemon=True)
        t.start()
        t.join(timeout)
        self._monitor = None
