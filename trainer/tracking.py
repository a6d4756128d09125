"""MLflow tracking for rank 0: one run per training, continued across every resume.

Rank 0 alone talks to MLflow (other ranks never import it). The run is created on the first
start and its id written to ``RUN_DIR/mlflow_run.json`` at once and into every checkpoint, so a
restart, even one before the first checkpoint, continues the same run. ``tracking.uri`` empty
means a local sqlite store next to the run dir (``sqlite:///<run_dir parent>/mlflow.db``, with
artifacts in ``<run_dir parent>/mlartifacts``); ``none`` or ``off`` disables tracking.

Failure policy: if tracking is configured and the run cannot be created or reopened at start,
training fails before the first step (a silent untracked multi-day run is worse than a clear
error). Once running, a failed metric upload is a warning: losing a few points of a curve must
not kill a training job. ``metrics.jsonl`` remains the exact record either way; after a resume,
MLflow may hold two values for steps re-run since the last checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

DISABLED = ("none", "off", "false", "disabled")
RUN_FILE = "mlflow_run.json"


class TrackingError(RuntimeError):
    pass


def resolve_uri(uri: str, run_dir: str | Path) -> str | None:
    if uri.strip().lower() in DISABLED:
        return None
    if uri:
        return uri
    parent = Path(run_dir).resolve().parent
    return f"sqlite:///{parent / 'mlflow.db'}"


class NullTracker:
    run_id: str | None = None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def flush(self) -> None: ...
    def finish(self, status: str) -> None: ...


class MlflowTracker:
    """A thin, failure-aware wrapper over ``MlflowClient`` (no global active-run state)."""

    def __init__(self, uri: str, experiment: str, run_dir: str | Path, run_id: str | None, params: dict[str, Any], run_name: str, flush_every_s: float = 10.0):
        try:
            from mlflow.entities import Metric, Param  # noqa: F401 - lazy, rank 0 only
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=uri)
            self.run_dir = Path(run_dir)
            run_id = run_id or self._run_id_from_file()
            if run_id:
                run = self.client.get_run(run_id)  # raises if the run is gone
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                self._log_params(params, existing=run.data.params)
                print(f"mlflow: continuing run {run_id} at {uri}", flush=True)
            else:
                exp = self.client.get_experiment_by_name(experiment)
                if exp is None:
                    location = None
                    if uri.startswith("sqlite:///"):
                        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
                    exp_id = self.client.create_experiment(experiment, artifact_location=location)
                else:
                    exp_id = exp.experiment_id
                run = self.client.create_run(exp_id, run_name=run_name, tags={"run_dir": str(self.run_dir.resolve())})
                self.run_id = run.info.run_id
                self._write_run_file(uri)
                self._log_params(params, existing={})
                print(f"mlflow: created run {self.run_id} in experiment '{experiment}' at {uri}", flush=True)
        except Exception as e:  # noqa: BLE001 - any failure here means "tracking unusable"
            raise TrackingError(f"MLflow tracking at {uri} failed at start: {type(e).__name__}: {e}") from e
        self.flush_every_s = flush_every_s
        self._buffer: list[Any] = []
        self._last_flush = time.time()

    def _run_id_from_file(self) -> str | None:
        path = self.run_dir / RUN_FILE
        if path.is_file():
            return json.loads(path.read_text())["run_id"]
        return None

    def _write_run_file(self, uri: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps({"run_id": self.run_id, "uri": uri}) + "\n")
        os.replace(tmp, self.run_dir / RUN_FILE)

    def _log_params(self, params: dict[str, Any], existing: dict[str, str]) -> None:
        from mlflow.entities import Param

        new = []
        for k, v in params.items():
            text = str(v)[:6000]
            if k not in existing:
                new.append(Param(k, text))
            elif existing[k] != text:
                # MLflow params are immutable; record the change on resume as a tag instead
                self.client.set_tag(self.run_id, f"resumed_with.{k}", text)
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None)
        if time.time() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.time()
        try:
            while self._buffer:
                chunk = self._buffer[:1000]
                self.client.log_batch(self.run_id, metrics=chunk)
                del self._buffer[: len(chunk)]
        except Exception as e:  # noqa: BLE001 - non-fatal after start (see module doc)
            print(f"mlflow: warning: could not log {len(self._buffer)} metrics ({type(e).__name__}: {e}); will retry", file=sys.stderr, flush=True)

    def log_text(self, text: str, name: str) -> None:
        try:
            self.client.log_text(self.run_id, text, name)
        except Exception as e:  # noqa: BLE001
            print(f"mlflow: warning: could not log {name}: {e}", file=sys.stderr, flush=True)

    def log_artifact(self, path: str | Path) -> None:
        try:
            self.client.log_artifact(self.run_id, str(path))
        except Exception as e:  # noqa: BLE001
            print(f"mlflow: warning: could not log artifact {path}: {e}", file=sys.stderr, flush=True)

    def finish(self, status: str) -> None:
        """status: FINISHED (max_steps reached), KILLED (stopped for requeue), FAILED."""
        self.flush()
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:  # noqa: BLE001
            print(f"mlflow: warning: could not mark run {status}: {e}", file=sys.stderr, flush=True)


def start_tracking(uri_cfg: str, experiment: str, run_dir: str | Path, run_id: str | None, params: dict[str, Any]) -> NullTracker | MlflowTracker:
    uri = resolve_uri(uri_cfg, run_dir)
    if uri is None:
        return NullTracker()
    return MlflowTracker(uri, experiment, run_dir, run_id, params, run_name=Path(run_dir).name)
