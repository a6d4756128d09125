"""One eval job: every configured task on one committed checkpoint, results to disk and MLflow.

This is what ``pretrain eval CHECKPOINT`` runs in-process and what the watcher submits (through
submitit) per checkpoint. It never runs inside training, so a slow or failing eval cannot stall or
kill the training job.

Order of operations per task, chosen so that a crash or a retry never repeats work or loses it:
a complete result (file + MLflow) is skipped; a computed but unlogged one is only logged;
otherwise the task is computed, written (``logged: false``), logged, and rewritten
(``logged: true``). A task that fails does not stop the others; the job then raises, listing the
failures, so the watcher retries just those.

A checkpoint without its commit marker, or whose files do not match their committed hashes, is
refused before anything is read or written (:class:`trainer.checkpoint.CheckpointError`).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from common.strict import ConfigError, apply_overrides, from_dict, section_problems
from evals.config import EvalConfig
from evals.results import (
    all_complete,
    check_path,
    checkpoint_id,
    format_scores,
    is_complete,
    job_device_type,
    log_to_mlflow,
    metric_names,
    provenance_tags,
    read_result,
    run_dir_of,
    result_of,
    save_result,
    task_settings,
    tracking_target,
    write_json_atomic,
)
from trainer.checkpoint import MARKER, CheckpointError, read_meta, verify
from trainer.runlock import RunLock

HARNESS_PREFIX = "lm_eval/"
# How long a second eval of one checkpoint waits for the first (an eval job's own time limit is
# the real bound; this only stops a wedged holder from blocking a hand-run eval forever).
EVAL_LOCK_WAIT_S = 6 * 3600.0


class EvalJobError(RuntimeError):
    """Some tasks of a job failed (the others' results are saved). ``refused``: some failed on
    their configured data itself (:class:`evals.data.BadEvalData`), so a rerun cannot help."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused


class _Failures(dict):
    """What failed in one job (evaluator or task -> error text), and which of it was refused."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: set[str] = set()

    def add(self, what: str, error: BaseException) -> None:
        from evals.data import BadEvalData

        self[what] = f"{type(error).__name__}: {error}"
        if isinstance(error, BadEvalData):
            self.refused.add(what)

    def raise_if_any(self, ckpt: Path) -> None:
        if self:
            raise EvalJobError(f"{ckpt.name}: " + "; ".join(f"{k}: {v}" for k, v in self.items()), bool(self.refused))


def planned_tasks(cfg: EvalConfig) -> list[str]:
    """``hellaswag`` (our evaluator) if enabled, then ``lm_eval/<task>`` per harness task."""
    return (["hellaswag"] if cfg.hellaswag else []) + [HARNESS_PREFIX + t for t in cfg.harness_tasks]


def plan_problems(cfg: EvalConfig) -> list[str]:
    """Why ``cfg`` could evaluate no checkpoint at all: no task, a HellaSwag file that is not there,
    a harness task lm-evaluation-harness does not know. Checked before a workflow starts, so that it
    does not prepare data and train for days to fail at its first eval (loading the harness's task
    index costs a few seconds: only when harness tasks are set)."""
    problems = []
    if not planned_tasks(cfg):
        problems.append("eval.hellaswag is false and eval.harness_tasks is empty: nothing to evaluate")
    path = Path(cfg.hellaswag_path).expanduser()
    if cfg.hellaswag and cfg.hellaswag_path and not path.exists():
        problems.append(f"eval.hellaswag_path {cfg.hellaswag_path} does not exist")
    elif cfg.hellaswag and cfg.hellaswag_path and path.is_file() and path.suffix not in (".jsonl", ".json", ".arrow"):
        problems.append(f"eval.hellaswag_path {cfg.hellaswag_path}: expected a .jsonl file, an .arrow file or a save_to_disk directory")
    if cfg.harness_tasks:
        from evals.data import LOCAL_TASKS, offline_tasks_without_data
        from evals.harness import unknown_tasks

        unknown = unknown_tasks(list(cfg.harness_tasks))
        if unknown:
            problems.append(f"eval.harness_tasks: {', '.join(unknown)}: not a task of lm-evaluation-harness")
        no_data = [t for t in offline_tasks_without_data(list(cfg.harness_tasks), cfg.data_source, cfg.hellaswag_path) if t not in unknown]
        if no_data:
            problems.append(f"eval.harness_tasks: {', '.join(no_data)}: offline (eval.data_source={cfg.data_source}) and no "
                            f"local copy of its data (local copies exist for: {', '.join(sorted(LOCAL_TASKS))})")
    return problems


def normalise_tasks(names: list[str]) -> list[str]:
    """CLI task names: ``hellaswag`` is ours; any other name (or ``lm_eval/x``) is a harness task."""
    out = []
    for n in names:
        n = n.strip()
        if n:
            out.append(n if n == "hellaswag" or n.startswith(HARNESS_PREFIX) else HARNESS_PREFIX + n)
    return out


def config_from_checkpoint(meta: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> EvalConfig:
    """The ``eval`` section of the run config stored in the checkpoint, loaded strictly as the
    current schema, with ``eval.*`` overrides applied (other sections are not read here)."""
    stored = (meta.get("config") or {}).get("eval")
    cfg = from_dict(EvalConfig, stored, "eval.", "the checkpoint's stored config")
    apply_overrides(cfg, overrides, prefix="eval.")
    problems = section_problems(cfg, "eval.")
    if problems:
        raise ConfigError("command line: " + "; ".join(problems))
    return cfg


def _ours_hellaswag(model, enc, cfg: EvalConfig, limit: int, device) -> dict[str, Any]:
    from evals import data, hellaswag

    rows, source = data.load_hellaswag(cfg.hellaswag_path, cfg.data_source, limit)
    out = hellaswag.evaluate(model, enc, rows, batch_size=cfg.batch_size, device=device, dtype=cfg.dtype, style=cfg.hellaswag_style)
    out.pop("predictions")
    out.update(source=source, evaluator=f"pretrain hellaswag ({cfg.hellaswag_style} style, completion scoring)")
    return {"hellaswag": out}


def _harness(model, enc, cfg: EvalConfig, tasks: list[str], limit: int, device) -> dict[str, Any]:
    import lm_eval

    from common.scratch import owned_scratch_dir
    from evals.data import harness_include_dir
    from evals.harness import PretrainGPTLM, run_harness, task_metrics

    names = [t[len(HARNESS_PREFIX) :] for t in tasks]
    # the task dir is removed whatever fails (the adapter's construction included), by the next job if this one is SIGKILLed
    with owned_scratch_dir("pretrain-lm-eval-tasks-") as scratch:
        include, sources = harness_include_dir(names, cfg.data_source, cfg.hellaswag_path, into=scratch)
        lm = PretrainGPTLM(model=model, tokenizer=enc, device=str(device), batch_size=cfg.batch_size, dtype=cfg.dtype)
        res = run_harness(lm, names, limit=limit, num_fewshot=cfg.harness_num_fewshot, include_path=include)
    out = {}
    for name, task in zip(names, tasks):
        metrics, stderr, n = task_metrics(res, name)
        if not metrics:
            raise EvalJobError(f"lm-eval returned no metrics for {name}")
        out[task] = {
            "metrics": metrics,
            "stderr": stderr,
            "n": n,
            "elapsed_s": res["elapsed_s"],  # one simple_evaluate call for all harness tasks
            "source": sources[name],
            "evaluator": f"lm-eval {getattr(lm_eval, '__version__', '?')} ({cfg.harness_num_fewshot}-shot)",
        }
    return out


def evaluate_checkpoint(
    ckpt_dir: str | Path,
    cfg: EvalConfig,
    tasks: list[str] | None = None,
    limit: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate one committed checkpoint; returns ``{"status": "done"|"skipped", "step", "tasks": {...}}``.

    ``limit`` other than ``eval.limit`` (``pretrain eval --limit N``) makes it a quick check: the
    numbers are printed and kept under :func:`evals.results.check_path`, never taken as the
    checkpoint's result nor logged (see :mod:`evals.results`)."""
    ckpt = Path(ckpt_dir).resolve()
    tasks = list(tasks) if tasks is not None else planned_tasks(cfg)
    quick = limit is not None and limit != cfg.limit
    limit = cfg.limit if limit is None else limit
    if not (ckpt / MARKER).is_file():
        if not ckpt.exists() and ckpt.parent.is_dir():
            log(f"eval: {ckpt} no longer exists (deleted by retention?): skipped")
            return {"status": "skipped", "step": None, "tasks": {}}
        raise CheckpointError(f"{ckpt}: not a committed checkpoint (no {MARKER}); refusing to evaluate it")
    try:
        verify(ckpt)  # re-hash every file before reading weights or writing anything: refuse corrupt ones
        meta = read_meta(ckpt)
        ckpt_id = checkpoint_id(ckpt)
    except (CheckpointError, OSError):
        if (ckpt / MARKER).is_file():
            raise
        return _deleted(ckpt, None, log)  # retention removed it while its files were hashed
    step = int(meta["step"])
    if quick:
        return _quick_check(_Target.of(ckpt, meta, cfg, tasks, limit, None, None), cfg, tasks, log)
    if all_complete(ckpt, cfg, tasks, ckpt_id):  # not quick: limit is eval.limit
        log(f"eval: {ckpt.name}: all of {tasks} already evaluated and logged")
        return {"status": "done", "step": step, "tasks": {t: "already done" for t in tasks}}
    # One job per checkpoint at a time (a hand-run `pretrain eval` next to the watcher's job): the
    # second waits, then finds the first one's results complete and logs nothing twice.
    with RunLock(run_dir_of(ckpt), f"eval-{ckpt.name}", wait_s=EVAL_LOCK_WAIT_S, log=log):
        try:
            current = _still_the_checkpoint(ckpt, ckpt_id, meta)
            return _deleted(ckpt, step, log) if current is None else _evaluate_locked(ckpt, cfg, tasks, limit, current, log)
        except (CheckpointError, FileNotFoundError):  # its files could not be read: gone meanwhile, or really unloadable
            if (ckpt / MARKER).is_file():
                raise
            return _deleted(ckpt, step, log)


def _deleted(ckpt: Path, step: int | None, log: Callable[[str], None]) -> dict[str, Any]:
    """A checkpoint that retention removed (marker first) after this eval was asked for: skipped,
    as one already gone when the eval started is, never an error for the files it no longer finds."""
    log(f"eval: {ckpt} was deleted (retention?) while this eval waited for or read it: skipped")
    return {"status": "skipped", "step": step, "tasks": {}}


def _still_the_checkpoint(ckpt: Path, ckpt_id: str, meta: dict[str, Any]) -> dict[str, Any] | None:
    """After the wait for the eval lock (up to hours, behind another eval of it): None if retention
    removed the checkpoint meanwhile (a skip, not a refusal), else its metadata, re-verified if the
    step was re-written with other weights (what is scored must be what the result names)."""
    try:
        current = checkpoint_id(ckpt)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        current = None  # a damaged marker: verify() below names it
    if current != ckpt_id:
        verify(ckpt)
        return read_meta(ckpt)
    return meta


@dataclass(frozen=True)
class _Target:
    """What one locked eval job is about: the checkpoint, its identity, and where metrics go."""

    ckpt: Path
    ckpt_id: str
    step: int
    limit: int
    uri: str | None
    run_id: str | None
    settings: dict[str, dict[str, Any]]  # task -> evals.results.task_settings (the dtype that runs here)
    dtype_setting: str  # eval.dtype as configured ("auto"): the settings hold what it resolved to

    @classmethod
    def of(cls, ckpt: Path, meta: dict[str, Any], cfg: EvalConfig, tasks: list[str], limit: int,
           uri: str | None, run_id: str | None) -> "_Target":
        device_type = job_device_type(cfg)  # as _compute resolves eval.device, on this machine
        settings = {t: task_settings(cfg, t, limit, device_type) for t in tasks}
        return cls(ckpt, checkpoint_id(ckpt), int(meta["step"]), limit, uri, run_id, settings, cfg.dtype)

    def complete(self, task: str) -> bool:
        return is_complete(self.ckpt, task, self.ckpt_id, self.settings[task])

    def record(self, task: str, out: dict[str, Any], device: Any) -> dict[str, Any]:
        """A fresh result file's content (``logged: false`` until MLflow has its metrics)."""
        return {
            "task": task,
            "step": self.step,
            "checkpoint": str(self.ckpt),
            "checkpoint_id": self.ckpt_id,
            "limit": self.limit or 0,
            "settings": self.settings[task],  # its dtype: the one that ran (float32 | bfloat16)
            "dtype_setting": self.dtype_setting,
            "device": str(device),
            "host": socket.gethostname(),
            "time": time.time(),
            "mlflow": {"uri": self.uri, "run_id": self.run_id},
            "logged": False,
            **out,
        }


def _evaluate_locked(
    ckpt: Path, cfg: EvalConfig, tasks: list[str], limit: int, meta: dict[str, Any], log: Callable[[str], None]
) -> dict[str, Any]:
    """The body of :func:`evaluate_checkpoint`, run while holding the checkpoint's eval lock."""
    uri, run_id = tracking_target(meta, ckpt, cfg.tracking_uri)
    target = _Target.of(ckpt, meta, cfg, tasks, limit, uri, run_id)
    todo = [t for t in tasks if not target.complete(t)]
    summary: dict[str, Any] = {"status": "done", "step": target.step, "tasks": {t: "already done" for t in tasks if t not in todo}}
    if not todo:
        log(f"eval: {ckpt.name}: all of {tasks} already evaluated and logged")
        return summary

    pending = _unlogged_results(target, todo)
    compute = [t for t in todo if t not in pending]
    failures = _Failures()
    if compute:
        pending.update(_compute(target, cfg, compute, failures, log, lambda result: save_result(ckpt, result, log)))
    for task, result in pending.items():
        if _log_result(target, task, result, failures, log):
            summary["tasks"][task] = result["metrics"]
    failures.raise_if_any(ckpt)
    return summary


def _unlogged_results(target: _Target, todo: list[str]) -> dict[str, dict[str, Any]]:
    """Results computed earlier whose MLflow logging failed: they are logged, not recomputed."""
    pending: dict[str, dict[str, Any]] = {}
    for t in todo:
        res = read_result(target.ckpt, t)
        if result_of(res, target.ckpt_id, target.settings[t]) and res.get("logged") is False:
            pending[t] = res
    return pending


def _quick_check(target: _Target, cfg: EvalConfig, tasks: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    """``pretrain eval --limit N``: compute and show, keep the file apart, log nothing."""
    failures = _Failures()

    def keep(result: dict[str, Any]) -> None:
        path = check_path(run_dir_of(target.ckpt), target.step, result["task"], target.limit)
        write_json_atomic(path, {**result, "logged": "quick check: not logged"})
        log(f"eval: {target.ckpt.name} quick check ({target.limit} rows; not the checkpoint's result, not logged): "
            f"{format_scores(result)}; kept in {path}")

    computed = _compute(target, cfg, tasks, failures, log, keep)
    failures.raise_if_any(target.ckpt)
    return {"status": "done", "step": target.step, "tasks": {t: r["metrics"] for t, r in computed.items()}}


def _evaluators(model: Any, enc: Any, cfg: EvalConfig, compute: list[str], limit: int, device: Any
                ) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    """(what, run) per evaluator: ours for ``hellaswag``, one lm-eval call for all harness tasks."""
    groups: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if "hellaswag" in compute:
        groups.append(("hellaswag", lambda: _ours_hellaswag(model, enc, cfg, limit, device)))
    harness = [t for t in compute if t.startswith(HARNESS_PREFIX)]
    if harness:
        groups.append((", ".join(harness), lambda: _harness(model, enc, cfg, harness, limit, device)))
    return groups


def _compute(
    target: _Target, cfg: EvalConfig, compute: list[str], failures: _Failures, log: Callable[[str], None],
    save: Callable[[dict[str, Any]], None],
) -> dict[str, dict[str, Any]]:
    """Run the evaluators for `compute` and ``save`` each result (not yet logged); an evaluator
    that fails goes into `failures` without losing the others' results."""
    import torch

    from dataprep.tokenizer import get_gpt2
    from evals.scoring import resolve_device
    from trainer.checkpoint import load_model_for_eval

    ckpt, limit = target.ckpt, target.limit
    device = resolve_device(cfg.device)
    _check_device(device, cfg.device)
    t0 = time.time()
    model, _ = load_model_for_eval(ckpt, device, check=False)  # verified above
    enc = get_gpt2()
    log(f"eval: {ckpt.name} (step {target.step}) on {device}: {', '.join(compute)}" + (f" (limit {limit})" if limit else ""))
    computed: dict[str, dict[str, Any]] = {}
    for what, fn in _evaluators(model, enc, cfg, compute, limit, device):
        try:
            with torch.inference_mode():
                outcomes = fn()
        except Exception as e:  # noqa: BLE001 - one failing evaluator must not lose the others
            failures.add(what, e)
            trace = "" if what in failures.refused else f"\n{traceback.format_exc()}"  # the data's fault: the message says it all
            log(f"eval: {ckpt.name}: {what} failed: {failures[what]}{trace}")
            continue
        for task, out in outcomes.items():
            result = target.record(task, out, device)
            save(result)
            computed[task] = result
    log(f"eval: {ckpt.name}: computed in {time.time() - t0:.1f}s")
    return computed


def _check_device(device: Any, configured: str) -> None:
    """A CUDA device this machine does not have is the config's fault (or the job's request, say an
    eval job submitted without GPUs): refused, never retried, instead of torch's assertion deep
    inside the model load, which a watcher would retry ``eval.max_retries`` times."""
    import torch

    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (device.index or 0) >= count:
        raise EvalJobError(f"eval.device={configured}, but this machine has {count} CUDA device(s) "
                           "(set eval.device, or give the eval job GPUs: eval.slurm.gpus)", refused=True)


def _log_result(target: _Target, task: str, result: dict[str, Any], failures: _Failures,
                log: Callable[[str], None]) -> bool:
    """Send one result's metrics to MLflow, then rewrite its file as logged. False (the failure
    noted, the file kept with ``logged: false`` so a retry only re-logs it) if MLflow refused."""
    if target.uri is None:
        result["logged"] = "disabled"
    else:
        try:
            values = metric_names(task, result["metrics"], result.get("stderr", {}))
            log_to_mlflow(target.uri, target.run_id, target.step, values, when=float(result["time"]), tags=provenance_tags(result))
            result["logged"] = True
        except Exception as e:  # noqa: BLE001 - keep the result; a retry only re-logs it
            failures[task] = f"MLflow logging to {target.uri} failed: {type(e).__name__}: {e}"
            log(f"eval: {target.ckpt.name}: {failures[task]}")
            return False
    save_result(target.ckpt, result, log)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
    log(f"eval: {target.ckpt.name} step {target.step} {task}: {shown} (n={result['n']}, {result['source']})")
    return True


def run_job(ckpt_dir: str, cfg: EvalConfig, cpu_threads: int = 0, status_path: str = "") -> dict[str, Any]:
    """Entry point of a submitted job (pickled by submitit; runs in a fresh process).

    ``cpu_threads``: local jobs sharing one machine split its cores instead of oversubscribing them.
    ``status_path``: where to write ``{"status", "error"}`` as JSON when the job ends. The watcher
    reads that (and the results files), never submitit's result pickle, which sits in the run dir
    where anyone able to write there could plant one that runs code when loaded.
    """
    if cpu_threads > 0:
        import torch

        torch.set_num_threads(cpu_threads)
    try:
        summary = evaluate_checkpoint(ckpt_dir, cfg, log=lambda m: print(m, flush=True, file=sys.stdout))
    except KeyboardInterrupt as e:  # cancelled (by the watcher's own stop, or scancel): not a failure
        _write_status(status_path, {"status": "stopped", "error": f"stopped ({type(e).__name__})"})
        raise
    except BaseException as e:
        # the eval data or the checkpoint's content is wrong: retrying cannot help, the watcher does
        # not (a checkpoint that could not be read, an I/O error on a shared filesystem, is retried)
        refused = bool(getattr(e, "refused", False)) or (isinstance(e, CheckpointError) and not isinstance(e.__cause__, OSError))
        _write_status(status_path, {"status": "failed", "error": f"{type(e).__name__}: {e}", "refused": refused})
        raise
    _write_status(status_path, {"status": summary["status"], "step": summary["step"]})
    return summary


def _write_status(path: str, status: dict[str, Any]) -> None:
    if path:
        from evals.results import write_json_atomic

        write_json_atomic(Path(path), {**status, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
