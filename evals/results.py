"""Eval results on disk and in the training's MLflow run.

Layout (one JSON per task; ``<task>`` is ``hellaswag`` for our evaluator, ``lm_eval/<name>``
for harness tasks)::

    RUN_DIR/checkpoints/step_00001000/evals/<task>.json   next to the weights it scores
    RUN_DIR/evals/step_00001000/<task>.json               same content; survives keep-last-K
    RUN_DIR/evals/watch.json                              the watcher's state

Writing into a committed checkpoint is safe: ``COMMITTED.json`` lists the files it hashes and
``verify()`` checks only those, so an ``evals/`` subdirectory never makes a checkpoint "corrupt"
(a test pins this). Retention deletes the whole step directory, results included, hence the copy
under ``RUN_DIR/evals``. Each result records the checkpoint's identity (the committed sha256 of
``model.pt``): a step directory re-written after a resume is a new checkpoint, never "already
evaluated" by an older file.

A result is complete when its file exists for this checkpoint identity and the same settings
(:func:`task_settings`: row limit, dtype, prompt style, data file, few-shot count; a result
computed under other settings is not this config's result, so changing them re-evaluates) AND
its metrics reached MLflow (``logged`` true, or tracking disabled for the run). Files are written
atomically (temporary file, fsync, rename, fsync of the directory): a reader sees the old or the
new file.

Precision. The dtype in the settings is the one that *ran* (``float32`` or ``bfloat16``), not the
config's word: ``eval.dtype: auto`` is bf16 autocast on CUDA and fp32 on CPU, so the same config
gives other numbers on another machine. A result computed in fp32 on a laptop is therefore not
the result a GPU eval of that config (bf16) would give, and the GPU eval computes its own (it
replaces the file, as any change of settings does: one result per checkpoint and task, the one of
the latest settings, as lm-eval keys its outputs by its model arguments, dtype included). An
explicit ``bfloat16`` and ``auto`` on a GPU are the same arithmetic, hence the same result. Files
written before this recorded ``auto``; every result has always recorded the ``device`` it ran on,
and ``auto`` has always meant the same per device, so such a file reads as exactly the precision it
ran in (:func:`result_dtype`): nothing already computed is recomputed, nor taken for the other
precision. Who decides "already done" must know where the job computes: the job and local
executors resolve ``eval.device`` on this machine; a SLURM watcher on a login node without GPUs
takes the job's node to have CUDA when ``eval.slurm.gpus`` > 0 (:func:`job_device_type`). The
precision and the device also reach MLflow as the run tags ``eval/<task>/dtype`` and
``eval/<task>/device`` (every value the run's results used, comma separated: a run whose
checkpoints were scored at two precisions says so).

A quick check (``pretrain eval --limit N``) is not the checkpoint's result: it goes to
``RUN_DIR/evals/step_X/checks/<task>.limit<N>.json`` (:func:`check_path`) and never to MLflow,
so it can neither replace a full result nor add a second value at the checkpoint's step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from common.durable import atomic_write_json
from common.rundir import RunDir, step_dirname
from evals.config import EvalConfig
from trainer.checkpoint import MARKER, MODEL_FILE
from trainer.metrics import is_number

RESULTS_SUBDIR = "evals"


def write_json_atomic(path: Path, obj: Any, create_parents: bool = True) -> None:
    """Write JSON so that a crash leaves either the old or the new file, never a torn one."""
    if create_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


def checkpoint_id(ckpt_dir: Path) -> str:
    """The committed sha256 of the weights: what a result is a result *of*."""
    return json.loads((Path(ckpt_dir) / MARKER).read_text())["files"][MODEL_FILE]


def run_dir_of(ckpt_dir: Path) -> Path:
    return Path(ckpt_dir).resolve().parent.parent  # RUN_DIR/checkpoints/step_X


def result_path(ckpt_dir: Path, task: str) -> Path:
    return Path(ckpt_dir) / RESULTS_SUBDIR / f"{task}.json"


def archive_path(run_dir: Path, step: int, task: str) -> Path:
    return RunDir(run_dir).evals / step_dirname(step) / f"{task}.json"


def check_path(run_dir: Path, step: int, task: str, limit: int) -> Path:
    """Where a quick check (``pretrain eval --limit N``) of ``task`` on ``limit`` rows is kept."""
    return RunDir(run_dir).evals / step_dirname(step) / "checks" / f"{task}.limit{limit}.json"


def job_device_type(cfg: EvalConfig, executor: str = "local") -> str:
    """``cuda`` or ``cpu``: where an eval job of ``cfg`` computes, hence what ``eval.dtype: auto`` means.

    ``local`` (this process, or a job on this machine) resolves ``eval.device`` here, as the job
    does. ``slurm``: the job runs on another node; ``auto`` finds CUDA there when the job asks for
    GPUs (``eval.slurm.gpus``), which a watcher on a login node without GPUs cannot see itself."""
    if cfg.device != "auto":
        return "cuda" if cfg.device.startswith("cuda") else "cpu"
    if executor == "slurm":
        return "cuda" if cfg.slurm.gpus > 0 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolved_dtype(setting: str, device_type: str) -> str:
    """``float32`` or ``bfloat16``: what ``eval.dtype`` ``setting`` computes in on ``device_type``
    (:func:`trainer.precision.compute_dtype` decides, for the scorer as for training)."""
    from trainer.precision import compute_dtype

    return str(compute_dtype(setting, device_type, key="eval.dtype")).removeprefix("torch.")


def task_settings(cfg: EvalConfig, task: str, limit: int | None = None, device_type: str | None = None) -> dict[str, Any]:
    """The eval settings that shape ``task``'s numbers: what a result is a result *under*.

    Rows (``limit``, default ``eval.limit``; 0 = all), the dtype that computes (``eval.dtype``
    resolved on ``device_type``, default :func:`job_device_type` here: see the module doc), and per
    evaluator the prompt style and data file (HellaSwag) or the few-shot count (lm-eval).
    Scheduling and hardware knobs (device, batch size, retries, order) do not change what is
    measured beyond the dtype and are left out, as the workflow leaves them out of the eval stage's
    fingerprint."""
    dtype = resolved_dtype(cfg.dtype, device_type or job_device_type(cfg))
    settings: dict[str, Any] = {"limit": int(cfg.limit if limit is None else limit), "dtype": dtype}
    if task == "hellaswag":
        settings.update(hellaswag_style=cfg.hellaswag_style, hellaswag_path=cfg.hellaswag_path)
    else:
        settings["num_fewshot"] = cfg.harness_num_fewshot
        if task.endswith("/hellaswag"):  # lm-eval's hellaswag reads eval.hellaswag_path when set
            settings["hellaswag_path"] = cfg.hellaswag_path
    return settings


def result_of(result: Any, ckpt_id: str, settings: dict[str, Any]) -> bool:
    """Whether ``result`` (a results file's content) scores checkpoint ``ckpt_id`` under
    ``settings``. A result written before settings were recorded is compared on its row limit
    only (what was recorded then)."""
    if not isinstance(result, dict) or result.get("checkpoint_id") != ckpt_id:
        return False
    if isinstance(result.get("settings"), dict):
        return {**result["settings"], "dtype": result_dtype(result)} == settings
    return int(result.get("limit") or 0) == settings["limit"]


def result_dtype(result: dict[str, Any]) -> str | None:
    """The dtype ``result`` was computed in: its settings' ``dtype``, where an older file's
    ``auto`` is resolved on the ``device`` it records (what ``auto`` has always meant there);
    None if the file does not say (then it is no result of any precision, and is recomputed)."""
    settings = result.get("settings")
    dtype = settings.get("dtype") if isinstance(settings, dict) else None
    if dtype != "auto":
        return dtype if dtype in ("float32", "bfloat16") else None
    device = result.get("device")
    if not isinstance(device, str) or not device:
        return None
    return resolved_dtype("auto", "cuda" if device.startswith("cuda") else "cpu")


def _is_int(value: Any) -> bool:
    return is_number(value) and isinstance(value, int)


def _scores(value: Any, allow_none: bool = False) -> bool:
    """Whether ``value`` maps names to numbers (``allow_none``: or to null, a stderr lm-eval lacks)."""
    return isinstance(value, dict) and all(
        isinstance(k, str) and (is_number(v) or (allow_none and v is None)) for k, v in value.items())


def well_formed(result: Any) -> bool:
    """Whether ``result`` (a results file's content) has the shape this package writes: an object
    with an integer ``step``, ``metrics`` of numbers, and, where present, ``stderr`` of numbers,
    an integer ``n`` and ``limit`` and a text ``task``. One that parses but has another shape (edited
    by hand, written by another tool) is treated as a torn file is, as no result at all, so every
    reader (status, report, the eval job and the watcher) can use its fields without checking them."""
    if not isinstance(result, dict) or not _is_int(result.get("step")) or not _scores(result.get("metrics")):
        return False
    optional = (("stderr", lambda v: _scores(v, allow_none=True)), ("n", _is_int), ("limit", _is_int),
                ("task", lambda v: isinstance(v, str)))
    return all(result.get(key) is None or ok(result[key]) for key, ok in optional)


def read_result_file(path: Path) -> dict[str, Any] | None:
    """A results file's content, or None when it is missing, unreadable or not :func:`well_formed`."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # ValueError: torn JSON, or bytes that are not UTF-8
        return None
    return result if well_formed(result) else None


def read_result(ckpt_dir: Path, task: str) -> dict[str, Any] | None:
    """``task``'s result in the checkpoint, or None (then it is evaluated again, and rewritten)."""
    return read_result_file(result_path(ckpt_dir, task))


def is_complete(ckpt_dir: Path, task: str, ckpt_id: str, settings: dict[str, Any]) -> bool:
    """Result file of this checkpoint, computed under ``settings`` (:func:`task_settings`), and logged."""
    res = read_result(ckpt_dir, task)
    return result_of(res, ckpt_id, settings) and res.get("logged") in (True, "disabled")


def all_complete(ckpt_dir: Path, cfg: EvalConfig, tasks: list[str], ckpt_id: str | None = None,
                 device_type: str | None = None) -> bool:
    """Whether every one of ``tasks`` has a complete result for this checkpoint under ``cfg``, as a
    job on ``device_type`` (default: this machine's, :func:`job_device_type`) computes it."""
    ckpt_id = ckpt_id or checkpoint_id(ckpt_dir)
    return all(is_complete(ckpt_dir, t, ckpt_id, task_settings(cfg, t, device_type=device_type)) for t in tasks)


def save_result(ckpt_dir: Path, result: dict[str, Any], log: Callable[[str], None] = print) -> None:
    """Write the result into the checkpoint (if it still exists) and into the run's archive."""
    task, step = result["task"], result["step"]
    archive = archive_path(run_dir_of(ckpt_dir), step, task)
    write_json_atomic(archive, result)
    target = result_path(ckpt_dir, task)
    try:
        # Never re-create a deleted checkpoint dir (it would look like a partial checkpoint): no
        # `parents=True`, and nothing once retention has begun (it removes the marker first).
        if not (Path(ckpt_dir) / MARKER).is_file():
            raise FileNotFoundError(ckpt_dir)
        target.parent.mkdir(exist_ok=True)
        write_json_atomic(target, result, create_parents=False)
    except FileNotFoundError:
        log(f"eval: {ckpt_dir} was deleted meanwhile (retention); result kept in {archive}")


def format_scores(result: dict[str, Any]) -> str:
    """``hellaswag: acc_norm 0.2891 ± 0.0143, acc 0.2790 ± 0.0142 (n=1000)``: a result as a person reads it
    (the stderr is what tells two checkpoints apart, or not; ``pretrain status`` and the watcher's log).
    Only numbers are shown: what a damaged file holds otherwise is left out rather than raising."""
    stderr = result.get("stderr") if isinstance(result.get("stderr"), dict) else {}
    metrics = result.get("metrics") if isinstance(result.get("metrics"), dict) else {}
    parts = []
    for k, v in metrics.items():
        if k.endswith("stderr") or not isinstance(v, (int, float)):
            continue
        se = stderr.get(k)
        parts.append(f"{k} {v:.4f}" + (f" ± {se:.4f}" if isinstance(se, (int, float)) and math.isfinite(se) else ""))
    n = f" (n={result['n']})" if result.get("n") else ""
    return f"{result.get('task', '?')}: {', '.join(parts)}{n}"


# ------------------------------------------------------------------ MLflow


def tracking_target(meta: dict[str, Any], ckpt_dir: Path, override: str = "") -> tuple[str | None, str | None]:
    """(tracking uri, run id) of the training that wrote the checkpoint; (None, None) if untracked,
    (uri, None) while a tracked training has no MLflow run yet (its server was unreachable so far):
    then logging fails and is retried, never taken as "tracking disabled".

    The uri follows trainer.tracking's rule, applied to the run dir the checkpoint lives in (the
    config's ``run_dir`` may be relative to wherever training was launched). ``override``
    (``eval.tracking_uri``) replaces the uri; "none" disables logging.
    """
    from trainer.tracking import resolve_uri

    run_id = meta.get("mlflow_run_id")
    if not run_id:
        # a checkpoint written while the tracking server was unreachable has no run id; the run
        # created later (in the background, see trainer.tracking) is recorded in the run dir
        try:
            run_id = json.loads(RunDir(run_dir_of(ckpt_dir)).tracking_run.read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            run_id = None
    cfg_uri = override or (meta.get("config") or {}).get("tracking", {}).get("uri", "")
    uri = resolve_uri(cfg_uri, run_dir_of(ckpt_dir))
    if uri is None:
        return None, None
    return uri, run_id or None


def metric_names(task: str, metrics: dict[str, float], stderr: dict[str, float]) -> dict[str, float]:
    """MLflow keys: ``eval/hellaswag/acc_norm``, ``eval/lm_eval/arc_easy/acc_stderr``, ..."""
    out = {f"eval/{task}/{k}": v for k, v in metrics.items()}
    out.update({f"eval/{task}/{k}_stderr": v for k, v in stderr.items() if v == v})  # drop NaN
    return out


def provenance_tags(result: dict[str, Any]) -> dict[str, str]:
    """The run tags that say how ``result`` was computed: ``eval/<task>/dtype`` (the dtype that ran,
    :func:`result_dtype`) and ``eval/<task>/device`` (``cuda`` or ``cpu``); what is unknown is left out."""
    task, tags = result.get("task"), {}
    dtype, device = result_dtype(result), result.get("device")
    if isinstance(task, str) and dtype:
        tags[f"eval/{task}/dtype"] = dtype
    if isinstance(task, str) and isinstance(device, str) and device:
        tags[f"eval/{task}/device"] = "cuda" if device.startswith("cuda") else device.split(":")[0]
    return tags


def result_points(result: dict[str, Any], when: float) -> list[tuple[str, float, int, int]]:
    """``result``'s MLflow points (key, value, timestamp in ms, step); ``when`` is used where the
    file has no ``time`` of its own (the timestamp is what makes a resend one point, not two)."""
    t = result.get("time")
    ms = int((t if is_number(t) else when) * 1000)
    values = metric_names(result["task"], result["metrics"], result.get("stderr") or {})
    return [(k, float(v), ms, int(result["step"])) for k, v in values.items() if is_number(v)]


def log_to_mlflow(uri: str, run_id: str, step: int, values: dict[str, float], when: float,
                  tags: dict[str, str] | None = None) -> None:
    """Log into the (possibly finished) training run at the checkpoint's step; raises on failure.

    ``when`` (seconds since the epoch) is the result's own time, not the time of logging: a job
    killed after MLflow took the metrics but before the file said so logs them again on retry,
    and the same (key, value, timestamp, step) is then one point, not a second one. A value the
    run already has at ``step`` (a checkpoint evaluated again: a damaged result file,
    ``--restart-from eval``) is not logged again either. ``tags``: see :func:`send_points`."""
    send_points(uri, run_id, [(k, float(v), int(when * 1000), step) for k, v in values.items()], tags or {})


def send_points(uri: str, run_id: str | None, points: list[tuple[str, float, int, int]],
                tags: dict[str, str] | dict[str, set[str]]) -> int:
    """Log the (key, value, ms, step) ``points`` the run lacks (one history read per key, batches
    of at most 900) and merge ``tags`` into the run's (a tag keeps every value it was given,
    sorted and comma separated). Returns how many points were new; raises on any failure."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    from trainer.tracking_mlflow import configure_http

    if not run_id:
        raise RuntimeError("the training has no MLflow run yet (its tracking server was unreachable so far); "
                           "the result is kept and logged by a later attempt")
    configure_http()  # minutes of MLflow's default retries would hold the eval job (and its lock) hostage
    client = MlflowClient(tracking_uri=uri)
    have = {key: {(m.step, m.value) for m in client.get_metric_history(run_id, key)} for key in {p[0] for p in points}}
    new = [Metric(k, v, ms, step) for k, v, ms, step in points if (step, v) not in have[k]]
    existing = client.get_run(run_id).data.tags if tags else {}
    run_tags = []
    for key, values in tags.items():
        merged = set(filter(None, existing.get(key, "").split(", "))) | ({values} if isinstance(values, str) else set(values))
        if ", ".join(sorted(merged)) != existing.get(key):
            run_tags.append(RunTag(key, ", ".join(sorted(merged))))
    for i in range(0, max(len(new), 1 if run_tags else 0), 900):
        client.log_batch(run_id, metrics=new[i : i + 900], tags=run_tags if i == 0 else [])
    return len(new)


def archived_results(run_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every checkpoint result in ``RUN_DIR/evals`` (the copies that outlive retention), with its
    path; quick checks (``checks/``: never a checkpoint's result) and unreadable files left out."""
    found = []
    root = RunDir(run_dir).evals
    for path in sorted(root.glob("step_*/**/*.json")):
        parts = path.relative_to(root).with_suffix("").parts[1:]  # ("hellaswag",), ("lm_eval", "arc_easy")
        if parts[0] == "checks" and len(parts) > 1:
            continue
        result = read_result_file(path)
        if result is not None and result.get("logged") != "quick check: not logged":
            found.append((path, {**result, "task": result.get("task") or "/".join(parts)}))
    return found
