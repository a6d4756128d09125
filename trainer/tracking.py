"""MLflow tracking for rank 0: one run per training, continued across every resume, never in the way.

Rank 0 alone talks to MLflow (other ranks never import it), and only from one background daemon
thread: the training loop puts points, texts and artifacts on a bounded queue (``put_nowait``)
and never waits for the network. The run is created on the first start and its id written to
``RUN_DIR/mlflow_run.json`` at once and into every later checkpoint, so a restart, even one before
the first checkpoint, continues the same run. ``tracking.uri`` empty means a local sqlite store
next to the run dir (``sqlite:///<run_dir parent>/mlflow.db``, with artifacts in
``<run_dir parent>/mlartifacts``); ``none`` or ``off`` disables tracking.

Once the run is open, the thread also records its provenance (git commit, versions, GPUs, SLURM
job, the data manifest as a dataset input, system metrics: see ``trainer.provenance``).

``metrics.jsonl`` is the exact record; MLflow receives a copy, each step exactly once, replayed
from the file whenever it missed some (see ``trainer.tracking_mlflow``).

Failure policy (an outage of the tracking server must neither stop training nor delay a stop):

* Start: the first attempt to reopen or create the run gets ``START_WAIT_S`` (a local store, which
  creates its tables on first use, ``LOCAL_START_WAIT_S``). If the server
  answers with a refusal (the recorded run does not exist there, unsupported URI, no permission)
  the training is refused (exit 2): rerunning cannot help. If it is unreachable or slow, training
  starts untracked with a warning (at once when a stop signal comes during that wait); the thread keeps trying (backoff up to 5 s) and, once it has
  the run, writes ``mlflow_run.json`` (the trainer records the id in its next checkpoints) and
  replays metrics.jsonl.
* Running: a failed call is a warning; the thread reconnects with backoff and replays the missed
  steps from metrics.jsonl. When the queue is full (a long outage) new items are dropped: points
  come back from metrics.jsonl; only sample texts and artifacts of that time are lost. A refusal
  mid-run (say, the run was deleted) ends tracking for this process with an error message.
* Finish: the final flush, replay and ``set_terminated`` get ``FINISH_WAIT_S``; then the thread is
  abandoned (it is a daemon), so a stop signal is honoured within one step plus the checkpoint
  write whatever MLflow does. What did not arrive is replayed by the next ``pretrain train`` on
  the run dir or by ``pretrain report RUN_DIR``.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.rundir import RunDir
from trainer.provenance import SystemMetrics, manifest_dataset_input, provenance_tags
from trainer.tracking_mlflow import (
    MAX_BATCH_METRICS,
    MlflowRun,
    Point,
    describe,
    is_definitive,
    read_points,
)

__all__ = ["MlflowTracker", "NullTracker", "TrackingError", "resolve_uri", "start_tracking"]

DISABLED = ("none", "off", "false", "disabled")
START_WAIT_S = 15.0  # the first open of a tracking server
LOCAL_START_WAIT_S = 60.0  # a local store (sqlite, file) has no network to hang on, but creates its tables first
FINISH_WAIT_S = 5.0
FLUSH_EVERY_S = 2.0  # how stale MLflow's curve may get while training (at most one log_batch per 2 s)
QUEUE_SIZE = 10_000
BACKOFF_S = (1.0, 5.0)  # an attempt costs one request; the run should resume soon after the server does


class TrackingError(RuntimeError):
    """The tracking server refused the run (retrying cannot help): the training is refused."""


def resolve_uri(uri: str, run_dir: str | Path) -> str | None:
    if uri.strip().lower() in DISABLED:
        return None
    if uri:
        return uri
    parent = Path(run_dir).resolve().parent
    return f"sqlite:///{parent / 'mlflow.db'}"


class NullTracker:
    run_id: str | None = None

    def log_record(self, record: dict[str, Any]) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def finish(self, status: str, timeout: float = FINISH_WAIT_S) -> bool:
        return True


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)



@dataclass
class _Outbox:
    """Metric points not sent yet (one ``log_batch`` each flush) and when the last batch went out."""

    batch: list[Point] = field(default_factory=list)
    n_metrics: int = 0
    last_send: float = field(default_factory=time.monotonic)

    def flush(self, session: MlflowRun) -> None:
        session.send(self.batch)
        self.batch, self.n_metrics, self.last_send = [], 0, time.monotonic()


class MlflowTracker:
    """The training loop's side of MLflow: methods that only enqueue, and one thread that sends."""

    def __init__(self, uri: str, experiment: str, run_dir: str | Path, run_id: str | None, params: dict[str, Any],
                 run_name: str, flush_every_s: float = FLUSH_EVERY_S, queue_size: int = QUEUE_SIZE,
                 log: Callable[[str], None] = print, data_dir: str | Path | None = None,
                 rewind_to: int | None = None) -> None:
        self.uri = uri
        self.rewind_to = rewind_to  # a resume that was not exact: the steps after it are sent again (once)
        self.experiment = experiment
        self.run_dir = Path(run_dir)
        self.metrics_path = RunDir(self.run_dir).metrics
        self.params = params
        self.run_name = run_name
        self.data_dir = data_dir  # its manifest becomes the run's dataset input (trainer.provenance)
        self.flush_every_s = flush_every_s
        self.run_id = run_id  # known from the checkpoint, or None until the thread creates/reopens the run
        self.dropped = 0
        self._log = log
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=queue_size)
        self._session: MlflowRun | None = None
        self._started = threading.Event()  # the first open attempt ended (either way)
        self._connected = False
        self._refusal: str | None = None
        self._dead = False  # the thread has ended for good (refusal)
        self._finish_status: str | None = None
        self._wakeup = threading.Event()
        self._finished = threading.Event()
        self._waited = False
        self._quiet = False  # set once the trainer stopped waiting: the thread must not print during interpreter exit
        self._outage_since: float | None = None
        self._provenance_done = False
        self._system_metrics: SystemMetrics | None = None
        self._thread = threading.Thread(target=self._run, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ training-loop side: never blocks

    def log_record(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl line (already written): its tracked keys become the step's MLflow metrics."""
        self._put(("point", Point.of(record)))

    def log_text(self, text: str, name: str) -> None:
        self._put(("text", (text, name)))

    def log_artifact(self, path: str | Path) -> None:
        self._put(("artifact", str(path)))

    def _put(self, item: tuple[str, Any]) -> None:
        if self._dead or self._finish_status is not None:
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            if self.dropped == 0:
                _warn(f"mlflow: warning: tracking queue full ({self._queue.maxsize} items): dropping new items; "
                      "points are replayed from metrics.jsonl when the server answers, texts/artifacts of this time are lost")
            self.dropped += 1

    def wait_started(self, timeout: float, should_stop: Callable[[], bool] | None = None) -> bool:
        """Wait (bounded, and no longer than until ``should_stop()``) for the first open attempt;
        True if the run is open. Raises TrackingError on a refusal."""
        deadline = time.monotonic() + timeout
        while not self._started.wait(max(0.0, min(0.2, deadline - time.monotonic()))):
            if time.monotonic() >= deadline or (should_stop is not None and should_stop()):
                break
        self._waited = True  # from now on a refusal is reported by the thread (see _failed)
        if self._refusal:
            raise TrackingError(self._refusal)
        return self._connected

    def finish(self, status: str, timeout: float = FINISH_WAIT_S) -> bool:
        """status: FINISHED (max_steps reached), KILLED (stopped for requeue), FAILED. Waits at most ``timeout``."""
        self._finish_status = status
        self._wakeup.set()
        done = self._finished.wait(timeout) or self._dead
        if not done:
            self._quiet = True
            _warn(f"mlflow: warning: could not finish the run within {timeout:.0f} s ({self.uri} unreachable or slow); "
                  f"leaving it. The steps MLflow lacks are replayed from metrics.jsonl by the next `pretrain train` "
                  f"on {self.run_dir} or by `pretrain report {self.run_dir}`")
        return done

    # ------------------------------------------------------------------ the thread

    def _say(self, msg: str) -> None:
        if not self._quiet:
            self._log(msg)

    def _connect(self) -> bool:
        """(Re)open the run, then send what metrics.jsonl holds beyond what the server has."""
        try:
            if self._session is None:
                self._session = MlflowRun(self.uri, self.run_dir, log=self._say)
            self._session.open(self.run_id, self.experiment, self.params, self.run_name, rewind_to=self.rewind_to)
            self.rewind_to = None  # applied and stored: a reconnect must not send the new values twice
            self.run_id = self._session.run_id
            self._record_provenance()
            self._connected = True
        except Exception as e:  # noqa: BLE001 - any failure here is an outage or a refusal
            if self._session is not None and self._session.run_id:
                self.run_id = self._session.run_id  # created, then failed: reopen this one next time
            self._failed(e, opening=True)
            return False
        finally:
            self._started.set()
        try:
            sent = self._session.catch_up(self.metrics_path)
        except Exception as e:  # noqa: BLE001
            self._failed(e)
            return False
        if self._outage_since is not None or sent:
            gap = f" after {time.time() - self._outage_since:.0f} s" if self._outage_since is not None else ""
            self._say(f"mlflow: {self.uri} answers{gap}; replayed {sent} steps from metrics.jsonl "
                      f"(MLflow now has steps up to {self._session.cursor})")
        self._outage_since = None
        return True

    def _record_provenance(self) -> None:
        """Once per process, in this thread: tags, the dataset input, system metrics (trainer.provenance).

        An outage raises (the connect is retried, provenance with it); a refusal of one of these
        (a store without dataset support, say) is a warning: it must not end tracking."""
        if self._provenance_done:
            return
        dataset = None
        try:
            dataset = manifest_dataset_input(self.data_dir) if self.data_dir is not None else None
        except (OSError, ValueError) as e:  # the trainer checked the manifest; a vanished one is no reason to stop
            self._say(f"mlflow: warning: data manifest not recorded as the run's input: {describe(e)}")
        try:
            self._session.record_provenance(provenance_tags(), dataset)
        except Exception as e:
            if not is_definitive(e):
                raise
            self._say(f"mlflow: warning: provenance tags / dataset input refused: {describe(e)}")
        self._provenance_done = True
        try:
            self._system_metrics = SystemMetrics(self.uri, self.run_id)
        except Exception as e:  # noqa: BLE001 - optional
            self._say(f"mlflow: warning: system metrics not started: {describe(e)}")

    def _failed(self, exc: BaseException, opening: bool = False) -> None:
        self._connected = False
        if is_definitive(exc):
            what = "refused the run" if opening else "refused a request"
            unknown_run = opening and getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"
            hint = (f" (the run recorded in {RunDir(self.run_dir).tracking_run} or the checkpoint is not on this server? "
                    "point tracking.uri at the server that has it, or use tracking.uri=none)") if unknown_run else ""
            self._refusal = f"MLflow tracking at {self.uri} {what}: {describe(exc)}{hint}"
            self._dead = True
            if self._waited:
                _warn(f"mlflow: error: {self._refusal}; tracking stops for this process (metrics.jsonl stays complete)")
            self._finished.set()
            return
        if self._outage_since is None:
            self._outage_since = time.time()
            if not self._quiet:
                _warn(f"mlflow: warning: {self.uri}: {describe(exc)}; training goes on, untracked meanwhile; retrying in "
                      "the background, metrics.jsonl is replayed into the run once the server answers")

    def _sleep(self, seconds: float) -> None:
        self._wakeup.wait(seconds)
        self._wakeup.clear()

    def _run(self) -> None:
        backoff = BACKOFF_S[0]
        out = _Outbox()
        held: tuple[str, Any] | None = None  # a text/artifact whose send failed: first thing after reconnecting
        while not self._dead:
            if not self._connected:
                if not self._connect():
                    if self._dead:
                        return
                    self._sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_S[1])
                    continue
                backoff = BACKOFF_S[0]
                out = _Outbox()  # the catch-up sent everything metrics.jsonl holds
            session = self._session
            try:
                if held is not None:
                    self._send_item(session, held)
                    held = None
                finishing = self._finish_status is not None
                wait = 0.1 if finishing else max(0.05, min(0.5, out.last_send + self.flush_every_s - time.monotonic()))
                try:
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    item = None
                if item is None:
                    if self._idle(session, out, finishing):
                        return
                    continue
                if item[0] == "point":
                    self._add_point(session, out, item[1])
                else:
                    held = item
                    out.flush(session)  # keep the order the trainer logged in
                    self._send_item(session, item)
                    held = None
            except Exception as e:  # noqa: BLE001 - an outage: reconnect, then replay from metrics.jsonl
                self._failed(e)
                if self._dead:
                    return

    def _idle(self, session: MlflowRun, out: _Outbox, finishing: bool) -> bool:
        """Nothing queued: send a batch that is due; when finishing and drained, end the run (True)."""
        if out.batch and (finishing or time.monotonic() - out.last_send >= self.flush_every_s):
            out.flush(session)
        if not (finishing and self._queue.empty()):
            return False
        out.flush(session)
        session.catch_up(self.metrics_path)  # points dropped from a full queue
        if self._system_metrics is not None:
            self._system_metrics.stop()
        session.terminate(self._finish_status)
        self._finished.set()
        return True

    def _add_point(self, session: MlflowRun, out: _Outbox, point: Point) -> None:
        last = out.batch[-1].step if out.batch else session.cursor
        if point.step <= last:
            return  # in MLflow already (replayed, or re-run after a resume: identical values)
        if point.step > last + 1:  # dropped from a full queue meanwhile: take them from the file
            out.batch.extend(read_points(self.metrics_path, last, point.step - 1))
        out.batch.append(point)
        out.n_metrics += len(point.values)
        if out.n_metrics >= MAX_BATCH_METRICS:
            out.flush(session)

    def _send_item(self, session: MlflowRun, item: tuple[str, Any]) -> None:
        """A text or an artifact; one the server refuses is skipped (metrics go on)."""
        kind, payload = item
        try:
            if kind == "text":
                session.log_text(*payload)
            elif kind == "artifact" and Path(payload).exists():
                session.log_artifact(payload)
        except Exception as e:
            if not is_definitive(e):
                raise
            self._say(f"mlflow: warning: {kind} {payload if kind == 'artifact' else payload[1]} refused: {describe(e)}; skipped")


def start_wait_s(uri: str) -> float:
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    return LOCAL_START_WAIT_S if local else START_WAIT_S


def start_tracking(uri_cfg: str, experiment: str, run_dir: str | Path, run_id: str | None, params: dict[str, Any],
                   wait_s: float | None = None, data_dir: str | Path | None = None,
                   should_stop: Callable[[], bool] | None = None, rewind_to: int | None = None) -> NullTracker | MlflowTracker:
    """The tracker of this training; bounded by ``wait_s`` and cut short by ``should_stop`` (a
    stop signal: see the module doc). ``rewind_to``: the step of a resume that was not exact
    (:meth:`trainer.tracking_mlflow.MlflowRun.open`). Raises TrackingError on a refusal."""
    uri = resolve_uri(uri_cfg, run_dir)
    if uri is None:
        return NullTracker()
    wait_s = start_wait_s(uri) if wait_s is None else wait_s
    tracker = MlflowTracker(uri, experiment, run_dir, run_id, params, run_name=Path(run_dir).name, data_dir=data_dir,
                            rewind_to=rewind_to)
    if not tracker.wait_started(wait_s, should_stop) and not tracker._started.is_set():
        why = "a stop signal came first" if should_stop is not None and should_stop() else f"{uri} did not answer within {wait_s:.0f} s"
        _warn(f"mlflow: warning: {why}; training starts untracked; the run is "
              "opened (or created) in the background and metrics.jsonl replayed into it once the server answers")
    return tracker
