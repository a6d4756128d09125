"""Every file name under a run directory, in one place: the layout is a contract between stages.

The trainer writes checkpoints and metrics, the eval watcher writes results next to them, the
workflow records its progress, and ``pretrain status``/``report`` read all of it, each through
this object rather than its own string literals, so a name changes in one place and a reader can
see the whole layout at a glance::

    RUN_DIR/
      config.yaml, config.prev.yaml   the resolved config of the latest start (and the one before)
      metrics.jsonl                   one JSON line per optimizer step (rank 0)
      checkpoints/step_00001000/      committed checkpoints (COMMITTED.json last)
      evals/step_00001000/<task>.json eval results (a copy survives checkpoint retention)
      evals/watch.json, evals/jobs/   the eval watcher's state and its jobs' logs
      mlflow_run.json, mlflow_cursor.json   the tracking run id and how far metrics were sent
      workflow.json                   `pretrain run`'s stages and their outputs
      report.png, report.csv          `pretrain report`
      slurm/jobs.jsonl, slurm/logs/   submitted jobs and their logs
      errors/train-<time>-rank<R>.txt the traceback of each rank that crashed (trainer.failure_log)
      .locks/<role>.lock              one writer per role (trainer.runlock)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS = "checkpoints"
EVALS = "evals"


def step_dirname(step: int) -> str:
    """``step_00001000``: zero-padded so names sort in step order."""
    return f"step_{step:08d}"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (nothing is created or read here)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    # ---- training
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def prev_config(self) -> Path:
        return self.root / "config.prev.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_dirname(step)

    # ---- tracking
    @property
    def tracking_run(self) -> Path:
        return self.root / "mlflow_run.json"

    @property
    def tracking_cursor(self) -> Path:
        return self.root / "mlflow_cursor.json"

    # ---- evals
    @property
    def evals(self) -> Path:
        return self.root / EVALS

    @property
    def eval_watch_state(self) -> Path:
        return self.evals / "watch.json"

    @property
    def eval_jobs(self) -> Path:
        return self.evals / "jobs"

    # ---- workflow, report, launching
    @property
    def workflow_state(self) -> Path:
        return self.root / "workflow.json"

    @property
    def report_png(self) -> Path:
        return self.root / "report.png"

    @property
    def report_csv(self) -> Path:
        return self.root / "report.csv"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def slurm_logs(self) -> Path:
        return self.slurm / "logs"

    @property
    def errors(self) -> Path:
        return self.root / "errors"

    @property
    def archive(self) -> Path:
        """Where `pretrain run --restart-from train` moves the previous training's outputs."""
        return self.root / "archive"

    def lock(self, role: str) -> Path:
        return self.root / ".locks" / f"{role}.lock"
