"""One MLflow run, spoken to synchronously: open or create it, send each step once, replay metrics.jsonl.

Used by one thread at a time: the tracker's background thread (``trainer.tracking``) during
training, or ``pretrain report`` afterwards. Nothing here is called from the training loop.

Exactly once. ``metrics.jsonl`` is the record; MLflow gets a copy of it, step by step, in order.
Every ``log_batch`` carries the run tag ``pretrain.metrics_through_step`` (the last step in the
batch), so the server itself says how far it got: on every (re)open the sender continues after
that step and never resends what arrived, across processes too. Steps re-run after a resume from
an earlier checkpoint are bitwise identical (exact resume), so they are not sent again, unless the
resume was not exact (``rewind_to``: hyper-parameters changed with ``--allow-changes``, another
world size): then they trained to other values, the cursor goes back to the checkpoint's step and
they are sent again. MLflow cannot delete points, so it keeps both values at those steps (the tag
``pretrain.rewound`` says which steps and why); ``metrics.jsonl`` has the current ones. A copy of
the cursor is kept in ``RUN_DIR/mlflow_cursor.json`` (atomic write) for runs whose tag is missing
and for people reading the run dir. A point always carries the timestamp of its metrics.jsonl line
(live or replayed), and MLflow's SQL stores drop a metric identical in key, step, timestamp and
value, so a batch resent because its reply was lost (stored, tag not yet set) adds nothing either.

Bounded calls. Before the first client is made the process gets short HTTP settings (10 s
timeout, one retry) unless the user set them: MLflow's defaults retry for minutes per call.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.durable import atomic_write_json
from common.rundir import RunDir

CURSOR_TAG = "pretrain.metrics_through_step"
REWOUND_TAG = "pretrain.rewound"  # the last time steps were sent again after a resume that was not exact
# The columns of a metrics.jsonl line that become MLflow metrics (the rest: step, time, dt, sample, skipped).
TRACKED_KEYS = ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "val_loss")
MAX_BATCH_METRICS = 1000  # MLflow's log_batch limit
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
}
# Answers that retrying cannot change (the server is up and said no); anything else is an outage.
DEFINITIVE_CODES = frozenset({
    "RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "PERMISSION_DENIED", "UNAUTHENTICATED", "BAD_REQUEST",
})


def configure_http() -> None:
    """Short HTTP timeouts/retries for this process (MLflow reads them per request); user settings win."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def is_definitive(exc: BaseException) -> bool:
    """True for a refusal (bad URI, unknown run, no permission, mlflow not installed), not an outage."""
    return isinstance(exc, ImportError) or getattr(exc, "error_code", None) in DEFINITIVE_CODES


def describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:300]}"


@dataclass(frozen=True)
class Point:
    """One step of metrics.jsonl as MLflow sees it."""

    step: int
    timestamp_ms: int
    values: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, record: dict[str, Any]) -> Point:
        # a skipped step's non-finite loss is null in metrics.jsonl; live and replayed points agree
        values = tuple((k, float(record[k])) for k in TRACKED_KEYS if record.get(k) is not None and math.isfinite(float(record[k])))
        return cls(int(record["step"]), int(float(record.get("time") or 0) * 1000), values)


def read_points(metrics_path: Path, after: int, upto: int | None = None) -> list[Point]:
    """The points of metrics.jsonl with ``after < step <= upto`` (a torn last line is ignored)."""
    from trainer.metrics import read_metrics

    out = []
    for record in read_metrics(metrics_path):
        step = int(record["step"])
        if step > after and (upto is None or step <= upto):
            out.append(Point.of(record))
    return out


def read_run_file(run_dir: Path) -> dict[str, Any] | None:
    """``mlflow_run.json``: ``run_id``; ``uri`` as the run was created; ``sqlite`` (a local store's
    path relative to the run dir). ``uri`` is replaced by the store that belongs to this copy of
    the run dir (see ``recorded_uri``). None when there is none, or it is damaged: status and
    report then show no MLflow run, and a training with no run id in its checkpoint starts a new run."""
    path = RunDir(run_dir).tracking_run
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):  # none, or damaged (it is written atomically): nothing it can tell
        return None
    if not (isinstance(rec, dict) and all(isinstance(rec.get(k, ""), str) for k in ("run_id", "uri", "sqlite")) and rec.get("run_id")):
        return None
    rec["uri"] = recorded_uri(Path(run_dir), rec)
    return rec


def run_file_record(run_id: str, uri: str, run_dir: Path) -> dict[str, Any]:
    """What mlflow_run.json holds: a local sqlite store also relative to the run dir, so that a
    run dir copied or moved with its store (``runs/`` elsewhere) keeps writing into the copy."""
    rec: dict[str, Any] = {"run_id": run_id, "uri": uri}
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        rec["sqlite"] = os.path.relpath(db.resolve(), Path(run_dir).resolve())
    return rec


def recorded_uri(run_dir: Path, rec: dict[str, Any]) -> str:
    """The tracking URI a run file points at, from this run dir: its relative sqlite store when it
    exists here (a copy with its store), else the URI as recorded (older files, servers, a run dir
    copied without its store)."""
    rel = rec.get("sqlite")
    if rel:
        db = (Path(run_dir).resolve() / rel).resolve()
        if db.is_file():
            return f"sqlite:///{db}"
    return str(rec.get("uri", ""))


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    atomic_write_json(path, obj, create_parents=True)


class MlflowRun:
    """The MLflow run of one run dir. Every method may raise (an outage or a refusal); callers decide."""

    def __init__(self, uri: str, run_dir: str | Path, log: Callable[[str], None] = print) -> None:
        configure_http()
        from mlflow.tracking import MlflowClient  # lazy: rank 0 / report only

        self.uri = uri
        self.run_dir = Path(run_dir)
        self.log = log
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id: str | None = None
        self.cursor = 0  # every step <= cursor is in MLflow

    # ------------------------------------------------------------------ open

    def open(self, run_id: str | None, experiment: str, params: dict[str, Any], run_name: str,
             create: bool = True, mark_running: bool = True, rewind_to: int | None = None) -> bool:
        """Reopen the run (``run_id``, else the one in mlflow_run.json) or create it; False if none and not ``create``.
        ``rewind_to``: this start re-runs the steps after it with other values (see the module doc)."""
        recorded = read_run_file(self.run_dir)
        run_id = run_id or (recorded or {}).get("run_id")
        if run_id:
            run = self.client.get_run(run_id)  # RESOURCE_DOES_NOT_EXIST if it is gone: definitive
            if mark_running:
                self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            self._log_params(params, existing=run.data.params, tags=run.data.tags)
            self.cursor = self._cursor_of(run.data.tags)
            self.log(f"mlflow: continuing run {run_id} at {self.uri}")
            if rewind_to is not None and self.cursor > rewind_to:
                self._rewind(rewind_to)
            return True
        if not create:
            return False
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:///"):
                location = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
            exp_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        run = self.client.create_run(exp_id, run_name=run_name, tags={"run_dir": str(self.run_dir.resolve())})
        self.run_id = run.info.run_id
        # at once, before anything else can fail: a restart must continue this run, not make another
        _write_json_atomic(RunDir(self.run_dir).tracking_run, run_file_record(self.run_id, self.uri, self.run_dir))
        self._log_params(params, existing={})
        self.cursor = 0
        self.log(f"mlflow: created run {self.run_id} in experiment '{experiment}' at {self.uri}")
        return True

    def _rewind(self, step: int) -> None:
        """Send the steps after ``step`` again: a resume that is not exact trains them to other values.
        The lowered cursor is stored at once, so a process killed before it sent them still leaves
        them to be sent by the next start (exact or not)."""
        from mlflow.entities import RunTag

        first, last = step + 1, self.cursor
        note = (f"steps {first}-{last} trained again from step {step} with other settings "
                f"({time.strftime('%Y-%m-%d %H:%M:%S')}): MLflow has both values at those steps, metrics.jsonl the current ones")
        self.client.log_batch(self.run_id, tags=[RunTag(CURSOR_TAG, str(step)), RunTag(REWOUND_TAG, note)])
        self._set_cursor(step)
        self.log(f"mlflow: {note}")

    def _set_cursor(self, step: int) -> None:
        """MLflow has every step up to ``step`` (its tag already says so): keep it, and its copy in the run dir."""
        self.cursor = step
        _write_json_atomic(RunDir(self.run_dir).tracking_cursor, {"run_id": self.run_id, "step": step, "time": time.time()})

    def _cursor_of(self, tags: dict[str, str]) -> int:
        if CURSOR_TAG in tags:
            return int(tags[CURSOR_TAG])
        path = RunDir(self.run_dir).tracking_cursor
        try:
            saved = json.loads(path.read_text())
            return int(saved["step"]) if saved.get("run_id") == self.run_id else 0
        except (OSError, ValueError, KeyError):
            return 0

    def _log_params(self, params: dict[str, Any], existing: dict[str, str], tags: dict[str, str] | None = None) -> None:
        """New keys become params. MLflow params are immutable, so a value that differs from the
        run's param (a resume with ``--allow-changes``) is recorded as the tag ``resumed_with.<key>``;
        such a tag always holds the value of the latest start, also once it is back to the param's."""
        from mlflow.entities import Param, RunTag

        tags = tags or {}
        new, changed = [], []
        for k, v in params.items():
            text = str(v)[:6000]
            if k not in existing:
                new.append(Param(k, text))
            elif existing[k] != text or f"resumed_with.{k}" in tags:
                if tags.get(f"resumed_with.{k}") != text:
                    changed.append(RunTag(f"resumed_with.{k}", text))
        for i in range(0, max(len(new), len(changed)), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100], tags=changed[i : i + 100])

    def record_provenance(self, tags: dict[str, str], dataset_input: Any = None) -> None:
        """Set the provenance tags (see trainer.provenance) and log the data manifest as the run's input
        (MLflow keeps one input per dataset digest, so a resume adds none)."""
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i : i + 100])
        if dataset_input is not None:
            self.client.log_inputs(self.run_id, datasets=[dataset_input])

    # ------------------------------------------------------------------ metrics

    def send(self, points: list[Point]) -> int:
        """Log the points after the cursor, in order, in batches of whole steps; returns how many steps were sent."""
        from mlflow.entities import Metric, RunTag

        todo = [p for p in points if p.step > self.cursor]
        sent, i = 0, 0
        while i < len(todo):
            batch, n = [], 0
            while i < len(todo) and (not batch or n + len(todo[i].values) <= MAX_BATCH_METRICS):
                n += len(todo[i].values)
                batch.append(todo[i])
                i += 1
            last = batch[-1].step
            metrics = [Metric(k, v, p.timestamp_ms, p.step) for p in batch for k, v in p.values]
            self.client.log_batch(self.run_id, metrics=metrics, tags=[RunTag(CURSOR_TAG, str(last))])
            self._set_cursor(last)
            sent += len(batch)
        return sent

    def catch_up(self, metrics_path: Path, upto: int | None = None) -> int:
        """Send what metrics.jsonl holds after the cursor (up to ``upto``); returns how many steps."""
        return self.send(read_points(metrics_path, self.cursor, upto))

    # ------------------------------------------------------------------ the rest

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def terminate(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)
