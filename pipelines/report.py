"""`pretrain report RUN_DIR`: loss and eval curves against steps and tokens, as a PNG and a CSV.

Reads only the run's files (metrics.jsonl, RUN_DIR/evals/step_*/*.json), so it works on a
finished run, a half-finished one, or a copy of a run dir on a laptop. For the GPT-2 124M
FineWeb-Edu config it draws the reference lines people compare against (build-nanogpt's numbers:
OpenAI GPT-2 124M reaches val loss 3.2924 on the FineWeb-Edu 10B val split and 0.2955
completion-style HellaSwag acc_norm; GPT-3 Small reports 0.337).

What the figure shows, and why:

* the raw train loss (thin, faint) under a smoothed one: a debiased exponential moving average
  (:func:`smooth`, span of about 1/20 of the logged steps, at least 5), so a trend is visible
  through per-batch noise without hiding spikes in the raw line;
* each eval point with a ±1 standard-error bar (the result files' ``stderr``: on 200 HellaSwag
  rows it is about ±0.03, often the whole height of the curve, which a bare line would hide);
* a dashed chance line for multiple-choice tasks whose number of choices is known
  (:data:`CHOICES`; HellaSwag has 4 endings, so 0.25); other tasks get none rather than a guess.

The CSV holds the run's own values, eval stderr included (``eval/<task>/<metric>_stderr``); the
smoothed line is derived from its ``train_loss`` column.

With tracking on, the report also brings the training's MLflow run up to date: the steps of
metrics.jsonl it lacks, then the eval results it lacks (those saved while tracking was off, say),
each point once (:func:`_send_eval_results`), then the PNG and CSV as artifacts.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.durable import atomic_output
from common.rundir import RunDir
from pipelines.config import PipelineConfig

if TYPE_CHECKING:
    from trainer.tracking_mlflow import MlflowRun

REFERENCES = {
    "val_loss": [("OpenAI GPT-2 124M", 3.2924)],
    "eval/hellaswag/acc_norm": [("OpenAI GPT-2 124M", 0.2955), ("GPT-3 Small (124M)", 0.337)],
}


# answer choices per example of the multiple-choice tasks we know (chance = 1 / choices for acc and
# acc_norm); ARC and MMLU-style tasks with a variable count are left out on purpose
CHOICES = {
    "hellaswag": 4, "lm_eval/hellaswag": 4, "lm_eval/piqa": 2, "lm_eval/winogrande": 2, "lm_eval/boolq": 2,
    "lm_eval/copa": 2, "lm_eval/openbookqa": 4, "lm_eval/sciq": 4,
}  # fmt: skip
CHANCE_METRICS = ("acc", "acc_norm")


def report_paths(run_dir: Path) -> tuple[Path, Path]:
    return RunDir(run_dir).report_png, RunDir(run_dir).report_csv


def collect(run_dir: Path) -> list[dict[str, Any]]:
    """One row per step that has anything: train loss, val loss, eval metrics (by `eval/<task>/<metric>`).
    Quick checks (``pretrain eval --limit N``, under ``checks/``) are no checkpoint's result: left out."""
    from evals.results import archived_results
    from trainer.metrics import read_metrics, with_numbers

    rows: dict[int, dict[str, Any]] = {}
    metrics_path = RunDir(run_dir).metrics
    if metrics_path.is_file():
        for r in map(with_numbers, read_metrics(metrics_path)):  # a damaged value is left out, not drawn
            row = rows.setdefault(r["step"], {"step": r["step"]})
            row["tokens"] = r.get("tokens")
            row["train_loss"] = r.get("loss")
            if r.get("val_loss") is not None:
                row["val_loss"] = r["val_loss"]
    for _, res in archived_results(run_dir):  # torn files, or not shaped like a result, are left out
        step = res["step"]
        row = rows.setdefault(step, {"step": step})
        task = res["task"]
        for name, value in res["metrics"].items():
            row[f"eval/{task}/{name}"] = value
        for name, value in (res.get("stderr") or {}).items():
            if isinstance(value, (int, float)) and math.isfinite(value):  # lm-eval writes NaN where it has none
                row[f"eval/{task}/{name}_stderr"] = value
    tokens_per_step = next((r["tokens"] / r["step"] for r in rows.values() if r.get("tokens") and r["step"]), None)
    for r in rows.values():
        if r.get("tokens") is None and tokens_per_step:
            r["tokens"] = int(r["step"] * tokens_per_step)
    return [rows[s] for s in sorted(rows)]


def is_reference_setup(cfg: PipelineConfig | None) -> bool:
    return cfg is not None and cfg.model.name == "gpt2" and "fineweb-edu" in cfg.data.source.lower()


def smooth(values: list[float]) -> list[float]:
    """Debiased exponential moving average (as TensorBoard draws it): the first points are not
    pulled towards 0. Span ``max(5, len // 20)`` points, i.e. weight ``2 / (span + 1)`` for the
    newest one."""
    span = max(5, len(values) // 20)
    beta = 1.0 - 2.0 / (span + 1)
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def chance_level(column: str) -> float | None:
    """1 / choices for ``eval/<task>/acc`` or ``acc_norm`` of a task in :data:`CHOICES`, else None."""
    task, _, metric = column.removeprefix("eval/").rpartition("/")
    choices = CHOICES.get(task)
    return 1.0 / choices if choices and metric in CHANCE_METRICS else None


def plot_series(rows: list[dict[str, Any]], cfg: PipelineConfig | None = None) -> dict[str, Any]:
    """What the figure draws, as data (x is tokens):

    ``loss``: ``train_loss`` and ``train_loss_smoothed`` (same x), ``val_loss``, each a list of
    (x, y); ``evals``: per eval column, ``points`` [(x, y)], ``stderr`` [e or None per point] and
    ``chance`` (float or None); ``references``: per column, [(name, value)] for the reference setup.
    """
    def points(col: str) -> list[tuple[float, float]]:
        return [(r.get("tokens") or 0, r[col]) for r in rows if r.get(col) is not None]

    train = points("train_loss")
    loss = {"train_loss": train, "train_loss_smoothed": list(zip([x for x, _ in train], smooth([y for _, y in train]))),
            "val_loss": points("val_loss")}
    evals = {}
    for col in sorted({k for r in rows for k in r if k.startswith("eval/") and not k.endswith("_stderr")}):
        have = [r for r in rows if r.get(col) is not None]
        evals[col] = {"points": points(col), "stderr": [r.get(f"{col}_stderr") for r in have], "chance": chance_level(col)}
    return {"loss": loss, "evals": evals, "references": REFERENCES if is_reference_setup(cfg) else {}}


def write_report(run_dir: str | Path, cfg: PipelineConfig | None = None, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Write RUN_DIR/report.csv and report.png (each atomically), then attach them to the MLflow run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.config import ConfigError
    from pipelines.status import run_dir_problem

    run_dir = Path(run_dir)
    if (problem := run_dir_problem(run_dir)) is not None:
        raise ConfigError(f"{problem}; no report written")  # a checkpoint, a data dir, '.': not where a report goes
    rows = collect(run_dir)
    png, csv_path = report_paths(run_dir)
    _write_csv(csv_path, rows)

    series = plot_series(rows, cfg)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    _draw_loss(axes[0], series["loss"], run_dir.name)
    _draw_evals(axes[1], series["evals"])
    for target, col in ((axes[0], "val_loss"), (axes[1], "eval/hellaswag/acc_norm")):
        for name, value in series["references"].get(col, []):
            target.axhline(value, linestyle="--", linewidth=0.8, color="gray")
            target.annotate(f"{name} {value}", (0.01, value), xycoords=("axes fraction", "data"), fontsize=7, color="gray")
    tokens_per_step = next((r["tokens"] / r["step"] for r in rows if r.get("tokens") and r["step"] and r.get("train_loss") is not None), None)
    _finish_axes(axes, tokens_per_step)
    fig.tight_layout()
    with atomic_output(png) as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    log(f"report: {png} and {csv_path} ({len(rows)} steps, {len(series['evals'])} eval series)")
    _log_artifacts(run_dir, cfg, [png, csv_path], log)
    return png, csv_path


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """The run's own values, one row per step (eval columns sorted, stderr included)."""
    columns = ["step", "tokens", "train_loss", "val_loss"] + sorted({k for r in rows for k in r if k.startswith("eval/")})
    with atomic_output(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _draw_loss(ax: Any, loss: dict[str, list[tuple[float, float]]], title: str) -> None:
    """Raw train loss (faint) under its EMA in the same colour, and val loss with markers."""
    if loss["train_loss"]:
        line = ax.plot(*zip(*loss["train_loss"]), "-", linewidth=0.7, alpha=0.35, label="train loss")[0]
        ax.plot(*zip(*loss["train_loss_smoothed"]), "-", linewidth=1.4, color=line.get_color(), label="train loss (EMA)")
    if loss["val_loss"]:
        ax.plot(*zip(*loss["val_loss"]), "o-", label="val loss", markersize=3, linewidth=1)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_title(f"{title}: loss")


def _draw_evals(ax: Any, evals: dict[str, dict[str, Any]]) -> None:
    """Each eval column with ±1 stderr bars; one dashed chance line per distinct chance level."""
    chance_drawn: set[float] = set()
    for col, data in evals.items():
        xs, ys = zip(*data["points"])
        errs = [e if e is not None else 0.0 for e in data["stderr"]]
        bar = ax.errorbar(xs, ys, yerr=errs if any(errs) else None, fmt="o-", label=col.removeprefix("eval/"),
                          markersize=4, capsize=3, linewidth=1)
        if data["chance"] is not None and data["chance"] not in chance_drawn:
            chance_drawn.add(data["chance"])
            ax.axhline(data["chance"], linestyle="--", linewidth=0.9, color=bar.lines[0].get_color(), alpha=0.7)
            ax.annotate(f"chance {data['chance']:.2f}", (0.99, data["chance"]), xycoords=("axes fraction", "data"),
                        ha="right", va="bottom", fontsize=7, color="gray")
    ax.set_xlabel("tokens")
    ax.set_ylabel("metric (±1 stderr)")
    ax.set_title("evals of saved checkpoints")
    if not evals:
        ax.text(0.5, 0.5, "no eval results yet", ha="center", va="center", transform=ax.transAxes)


def _finish_axes(axes: Any, tokens_per_step: float | None) -> None:
    """Steps on a top axis (tokens stay on the bottom one), grids, and legends where lines have labels."""
    if tokens_per_step:
        for a in axes:
            top = a.secondary_xaxis("top", functions=(lambda t: t / tokens_per_step, lambda s: s * tokens_per_step))
            top.set_xlabel("step", fontsize=8)
    for a in axes:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)


def _log_artifacts(run_dir: Path, cfg: PipelineConfig | None, paths: list[Path], log: Callable[[str], None]) -> None:
    """Bring the training's MLflow run up to date with metrics.jsonl, then attach the report to it."""
    from trainer.tracking import resolve_uri
    from trainer.tracking_mlflow import MlflowRun, describe, read_run_file

    if cfg is not None and resolve_uri(cfg.tracking.uri, run_dir) is None:  # over a recorded run too: a copy stays out of the original's
        log(f"report: tracking.uri={cfg.tracking.uri}: not logged to a tracking store; the files are written")
        return
    recorded = read_run_file(run_dir) or {}
    uri = recorded.get("uri") or resolve_uri(cfg.tracking.uri if cfg else "none", run_dir)
    if uri is None:
        return
    try:
        session = MlflowRun(uri, run_dir, log=log)
        if not _sync_run(session, run_dir, cfg, recorded.get("run_id"), log):
            return
        _send_eval_results(session, run_dir, log)
        for p in paths:
            session.log_artifact(p, artifact_path="report")
        log(f"report: logged to MLflow run {session.run_id} ({uri})")
    except Exception as e:  # noqa: BLE001 - the files are the report; MLflow is a copy
        log(f"report: could not log to MLflow ({describe(e)}); the files are written")


def _send_eval_results(session: MlflowRun, run_dir: Path, log: Callable[[str], None]) -> None:
    """Send the eval results the run lacks, as the steps of metrics.jsonl are replayed: results saved
    while tracking was off (``logged: "disabled"``), or whose logging failed and was never retried,
    or logged into another run. Without this, turning tracking on later brought the loss into MLflow
    but not one eval point. A point the run has (same key, step and value) is not sent again, so
    reports can run any number of times; result files are left as they are (their writer is the
    eval job, under the checkpoint's eval lock). Bounded: one history read per metric key, batches
    of 900 points, MLflow's short HTTP settings; a failure is reported and the report goes on."""
    from evals.results import archived_results, provenance_tags, result_points, send_points
    from trainer.tracking_mlflow import describe

    points: list[tuple[str, float, int, int]] = []
    tags: dict[str, set[str]] = {}
    unsent = 0
    for path, result in archived_results(run_dir):
        for key, value in provenance_tags(result).items():
            tags.setdefault(key, set()).add(value)
        target = result.get("mlflow") if isinstance(result.get("mlflow"), dict) else {}
        if result.get("logged") is not True or target.get("run_id") != session.run_id:
            unsent += 1
            points += result_points(result, when=path.stat().st_mtime)
    if not points and not tags:
        return
    try:
        sent = send_points(session.uri, session.run_id, points, tags)
    except Exception as e:  # noqa: BLE001 - the files hold the results; the next report sends them
        log(f"report: could not send eval results to MLflow ({describe(e)}); the next report tries again")
        return
    if unsent:
        log(f"report: {unsent} eval result(s) not logged into this MLflow run at eval time: {sent} point(s) sent")


def _sync_run(session: MlflowRun, run_dir: Path, cfg: PipelineConfig | None, run_id: str | None, log: Callable[[str], None]) -> bool:
    """Open the run and replay the steps it lacks; False if there is no run to log to.

    The run is the one in RUN_DIR/mlflow_run.json; with none (the server was unreachable for the
    whole training) and a config that tracks, it is created here. Steps are replayed exactly once
    (see trainer.tracking_mlflow), and only while no training holds the run dir: a live training's
    tracker replays by itself, and two senders could race.
    """
    from pipelines.config import flatten, to_dict
    from trainer.runlock import RunLock, RunLockHeld

    lock: RunLock | None = RunLock(run_dir, "train", wait_s=0)
    busy = ""
    try:
        lock.acquire()
    except RunLockHeld:
        lock, busy = None, "a training holds this run dir; it replays its own steps into MLflow"
    except OSError as e:  # a read-only copy of a run dir
        lock, busy = None, f"cannot lock the run dir ({e}), so steps MLflow missed are not replayed"
    try:
        # params only for a run created here: the report's config (with its overrides) is not what
        # the recorded run trained with, and logging it there would read as a resume with changes
        params = flatten(to_dict(cfg)) if cfg is not None and not run_id else {}
        experiment = cfg.tracking.experiment if cfg is not None else ""
        if not session.open(run_id, experiment, params, run_name=run_dir.name, create=lock is not None and cfg is not None,
                            mark_running=False):
            why = busy or "no config to create one with (--config)"
            log(f"report: no MLflow run recorded for this run dir and {why}; the files are written")
            return False
        if lock is None:
            log(f"report: {busy}")
        else:
            sent = session.catch_up(RunDir(run_dir).metrics)
            log(f"report: MLflow run {session.run_id} has every step up to {session.cursor} ({sent} replayed from metrics.jsonl)")
            _end_stale_run(session, cfg, log)
        return True
    finally:
        if lock is not None:
            lock.release()


def _end_stale_run(session: MlflowRun, cfg: PipelineConfig | None, log: Callable[[str], None]) -> None:
    """A run still RUNNING while the report holds the run dir's training lock is no training's: its
    process was killed, or its final status never reached the server (an outage at the end), or the
    report created it just now. It ends FINISHED when MLflow has every step up to ``train.max_steps``,
    else KILLED (stopped; the next `pretrain train` sets it RUNNING again). Without a config: left."""
    if cfg is None or session.client.get_run(session.run_id).info.status != "RUNNING":
        return
    status = "FINISHED" if session.cursor >= cfg.train.max_steps else "KILLED"
    session.terminate(status)
    log(f"report: no training holds this run dir; MLflow run {session.run_id} was still RUNNING, now {status}")
