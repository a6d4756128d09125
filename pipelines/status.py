"""`pretrain status RUN_DIR [--json]`: where a run stands, readable at a glance (or by a script).

``status_data`` gathers everything from the run dir's files (and SLURM, for a SLURM workflow);
``status_text`` renders it. ``--json`` prints ``status_data`` as one JSON object with these keys
(a key is null or absent when the run dir does not have it yet):

* ``run_dir``: absolute path.
* ``workflow``: ``executor``, ``config_path``, ``overrides``, ``stages`` (per stage: ``status``,
  ``attempts``, ``job_ids``, ``error``, ``started``, ``ended``, ``exit_code``, ``log``, ``meaning``;
  a field of the wrong type is null). For a stage that ended failed or stopped, ``meaning`` is
  ``refused`` (exit 2: fix the config or data), ``failed`` (a rerun may help) or ``stopped`` (3 or
  130: resumable), and a local run records why: ``exit_code`` (what `pretrain run` exited with),
  ``error`` (the line that says why, e.g. the launcher's "pretrain train: exit 2: refused: ..." or
  an eval job's error) and ``log`` (the file that holds it, e.g. the eval job's stderr; null when
  it went to the terminal only, as training's does); a SLURM stage's jobs say why under
  ``slurm_jobs``, and a failed one takes ``meaning``, ``exit_code`` and ``log`` from its last job's
  exit line (``exit_status``), with ``why_job`` naming that job. The workflow's own ``error``: SLURM
  refresh failure, or what of workflow.json is unreadable (with none of it readable, ``executor``
  is null).
  A local workflow's stage also has ``running``: true only while a live `pretrain run` holds the run
  dir (``RUN_DIR/.locks/workflow.lock``), null when that holder is on another host (a shared
  filesystem: its pid cannot be checked from here), false otherwise; a SLURM workflow's has none
  (its jobs' states say). A stage recorded running has ``driver`` (the lock's record: ``host``,
  ``pid``, ``since``; null when it names no one). One whose `pretrain run` is gone (killed without
  cleanup: SIGKILL, the OOM killer, a reboot; workflow.json still says running) is shown with
  ``status`` ``interrupted``, ``meaning`` ``stopped`` (resumable: run the same command again),
  ``exit_code`` null, ``recorded_status`` ``running`` (what workflow.json says) and ``last_seen``
  (unix seconds: the newest of its start, the last training step, the last checkpoint).
* ``training``: ``step``, ``max_steps``, ``percent``, ``loss`` (null for a skipped step),
  ``val_loss`` and ``val_step`` (the newest validation), ``tokens``, ``tokens_per_s``, ``mfu``,
  ``last_step_time`` (unix seconds), ``last_step_age_s``, ``running`` (a live process holds the run
  dir's train lock; null when its holder is on another host), ``time_left_s`` (median recent step
  time × steps left; null when done or unknown), ``eta_s`` (the same, null too when not running:
  stopped, failed, killed or queued), ``done``.
* ``last_checkpoint``: ``name``, ``step``, ``committed_time`` (unix seconds), ``age_s``.
* ``checkpoints``: per committed checkpoint ``name``, ``step``, ``evals`` (per task: ``metrics``,
  ``stderr``, ``n``).
* ``latest_evals``: the newest step with results (from ``RUN_DIR/evals/``, which outlives
  checkpoint retention): ``step``, ``tasks`` (per task: ``metrics``, ``stderr``, ``n``).
* ``mlflow``: ``run_id``, ``uri`` (a local store resolved from this run dir), ``ui`` (a command
  or a link).
* ``slurm_jobs``: ``job_id``, ``name``, ``state``, ``restarts``, ``stdout``; for a job that ended
  failed (FAILED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, ...) also why: ``exit_code`` (SLURM's
  ``code:signal``), ``reason`` (SLURM's), ``exit_line`` (the exit line its logs end with, any node's:
  a refusal on one node is the one shown), ``exit_status`` (that line's code: 2 refused, 1 failed)
  and ``log`` (the log that holds it, else the first node's stderr).
* ``report``: path of report.png.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from common.rundir import RunDir
from slurm.submit import JOBS_FILE


def _ago(t: float | None) -> str:
    if not t:
        return ""
    s = time.time() - t
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


def _clock(t: float | None) -> str:
    """Local date and time of unix time ``t`` ("?" when unknown)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "?"


def _duration(a: float | None, b: float | None) -> str:
    return f"{(b or time.time()) - a:.0f}s" if a else ""


def run_dir_problem(run_dir: Path) -> str | None:
    """Why the existing directory ``run_dir`` is not a run directory (None: it is one, maybe one
    that has just started): a checkpoint (its run dir is named), or none of what a run writes first
    (`pretrain run`: workflow.json; `train`: config.yaml, .locks/; `submit`: slurm/). `status` would
    show it as a run with no steps and `report` would draw an empty report into it."""
    from trainer.checkpoint import MARKER

    if (run_dir / MARKER).is_file():
        return (f"{run_dir}: is a checkpoint, not a run directory (it has {MARKER}); "
                f"its run directory is {run_dir.resolve().parent.parent}")
    rd = RunDir(run_dir)
    markers = (rd.workflow_state, rd.config, rd.metrics, rd.checkpoints, rd.evals, rd.tracking_run, rd.slurm, rd.lock("x").parent)
    if any(p.exists() for p in markers):
        return None
    return f"{run_dir}: not a run directory (none of {', '.join(p.name for p in markers)} is there)"


def _max_steps(run_dir: Path, newest_meta: dict[str, Any] | None) -> int | None:
    """train.max_steps of the run: RUN_DIR/config.yaml (written by each start), else the newest checkpoint's."""
    import yaml

    try:
        return int(yaml.safe_load(RunDir(run_dir).config.read_text())["train"]["max_steps"])
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        pass
    try:
        return int((newest_meta or {})["config"]["train"]["max_steps"])
    except (KeyError, TypeError, ValueError):
        return None


def _results(directory: Path) -> dict[str, dict[str, Any]]:
    """task -> {metrics, stderr, n} of the result files under ``directory`` (``lm_eval/<name>`` nested);
    a file that is torn or not shaped like a result is left out (:func:`evals.results.well_formed`)."""
    from evals.results import read_result_file

    out: dict[str, dict[str, Any]] = {}
    for f in sorted(directory.rglob("*.json")) if directory.is_dir() else []:
        r = read_result_file(f)
        if r is not None:
            task = r.get("task") or f.relative_to(directory).with_suffix("").as_posix()
            out[task] = {"metrics": r["metrics"], "stderr": r.get("stderr") or {}, "n": r.get("n")}
    return out


STAGE_FIELDS: dict[str, Any] = {  # a stage's field -> the type it must have to be shown (else null)
    "status": str, "attempts": int, "job_ids": list, "error": str, "started": (int, float), "ended": (int, float),
    "exit_code": int, "log": str,  # absent (null) in a run dir of a version that did not record them
}
MEANINGS = {"failed": "failed", "interrupted": "stopped"}  # a stage's status -> what its end means (refused: exit 2)


def _stage(raw: Any) -> dict[str, Any]:
    """One stage of workflow.json as shown: a field of the wrong type is null (shown as unknown)."""
    raw = raw if isinstance(raw, dict) else {}
    out: dict[str, Any] = {}
    for key, kind in STAGE_FIELDS.items():
        value = raw.get(key)
        out[key] = value if isinstance(value, kind) and not isinstance(value, bool) else None
    if out["job_ids"] is not None and not all(isinstance(j, str) for j in out["job_ids"]):
        out["job_ids"] = None
    out["log"] = out["log"] or None
    meaning = MEANINGS.get(out["status"] or "")
    out["meaning"] = "refused" if meaning == "failed" and out["exit_code"] == 2 else meaning
    return out


def _read_workflow(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """workflow.json's object (None: none of it is readable) and what of it is unreadable (None:
    nothing). ``status`` only reads it, so a torn or hand-edited file is shown as far as it goes,
    as a checkpoint with a torn meta.json is (``step ?``)."""
    try:
        wf = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: torn JSON, or bytes that are not UTF-8
        return None, f"{path} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(wf, dict):
        return None, f"{path} is unreadable (a JSON {type(wf).__name__}, not an object)"
    if not isinstance(wf.get("stages", {}), dict):
        return wf, f"{path}: 'stages' is unreadable (not an object)"
    return wf, None


def _refresh_slurm(run_dir: Path, wf: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The SLURM workflow's record with the jobs' states now (never written: `status` holds no lock)."""
    try:
        from pipelines.config import load_config
        from pipelines.workflow import Workflow

        cfg = load_config(wf["config_path"], wf.get("overrides", []))
        # the run dir asked about, not the config's run_dir read from here: a relative one
        # names another directory (maybe another run's) when status runs from elsewhere
        cfg.run_dir = str(Path(run_dir).resolve())
        w = Workflow(wf["config_path"], wf.get("overrides", []), cfg, log=lambda m: None)
        w.refresh_slurm(save=False)
        return w.state_record(), None
    except Exception as e:  # noqa: BLE001 - status must show what it can
        return wf, f"could not refresh SLURM states: {e}"


def _workflow_record(run_dir: Path) -> dict[str, Any] | None:
    """workflow.json as shown (a SLURM workflow's stages refreshed from SLURM); None: there is none."""
    wf_path = RunDir(run_dir).workflow_state
    if not wf_path.is_file():
        return None
    wf, error = _read_workflow(wf_path)
    if wf is None:
        return {"executor": None, "config_path": None, "overrides": [], "stages": {}, "error": error}
    if error is None and wf.get("executor") == "slurm":
        wf, error = _refresh_slurm(run_dir, wf)
    from pipelines.stages import STAGE_NAMES

    stages = wf.get("stages") if isinstance(wf.get("stages"), dict) else {}
    overrides = wf.get("overrides", [])
    executor, config_path = wf.get("executor", "local"), wf.get("config_path")
    return {
        "executor": executor if isinstance(executor, str) else "?",
        "config_path": config_path if isinstance(config_path, str) else None,
        "overrides": overrides if isinstance(overrides, list) and all(isinstance(o, str) for o in overrides) else [],
        "stages": {name: _stage(stages[name]) for name in STAGE_NAMES if name in stages},
        "error": error,
    }


def _lock_holder(run_dir: Path, role: str) -> dict[str, Any]:
    """Who holds the run dir's ``role`` lock (``workflow``: a local `pretrain run`, for all of its
    stages; ``train``: rank 0 of a training): ``holder`` (its lock record: host, pid, since; None:
    the lock names no one) and ``alive`` (see :func:`common.locking.holder_alive`). Read only: no
    lock is taken."""
    from common.locking import holder_alive, read_holder

    path = RunDir(run_dir).lock(role)
    info = read_holder(path)
    holder = {k: info.get(k) for k in ("host", "pid", "since")} if info else None
    if holder is not None and not (isinstance(holder["since"], (int, float)) and not isinstance(holder["since"], bool)):
        holder["since"] = None  # a hand-edited record: shown as far as it goes
    return {"holder": holder, "alive": holder_alive(path, info)}


def _workflow(run_dir: Path) -> dict[str, Any] | None:
    """:func:`_workflow_record`, and for a local workflow whether a stage recorded ``running`` runs:
    only while a live `pretrain run` holds the run dir. One killed without cleanup (SIGKILL, the OOM
    killer, a reboot) left its stage ``running`` for ever; it is shown ``interrupted`` instead."""
    wf = _workflow_record(run_dir)
    if wf is None or wf["executor"] != "local":
        return wf
    if not any(st["status"] == "running" for st in wf["stages"].values()):
        for st in wf["stages"].values():
            st["running"] = False
        return wf
    driver = _lock_holder(run_dir, "workflow")
    if driver["alive"] is False:  # it may have ended since the first read: it records its end before it lets go
        wf = _workflow_record(run_dir) or wf
    for st in wf["stages"].values():
        st["running"] = driver["alive"] if st["status"] == "running" else False
        if st["status"] == "running":
            st["driver"] = driver["holder"]
        if st["status"] == "running" and driver["alive"] is False:
            st.update(status="interrupted", recorded_status="running", meaning=MEANINGS["interrupted"])
    return wf


def _training(run_dir: Path, max_steps: int | None) -> dict[str, Any] | None:
    from trainer.metrics import read_metrics, with_numbers
    from trainer.progress import eta_from_records

    metrics = [with_numbers(m) for m in read_metrics(RunDir(run_dir).metrics)] if RunDir(run_dir).metrics.is_file() else []
    if not metrics:
        return None
    last = metrics[-1]
    vals = [m for m in metrics if m.get("val_loss") is not None]
    step = int(last["step"])
    done = max_steps is not None and step >= max_steps
    return {
        "step": step, "max_steps": max_steps,
        "percent": round(100.0 * step / max_steps, 1) if max_steps else None,
        "loss": last.get("loss"),
        "val_loss": vals[-1]["val_loss"] if vals else None, "val_step": vals[-1]["step"] if vals else None,
        "tokens": last.get("tokens"), "tokens_per_s": last.get("tokens_per_s"), "mfu": last.get("mfu"),
        "last_step_time": last.get("time"), "last_step_age_s": time.time() - last["time"] if last.get("time") else None,
        "eta_s": None if done or max_steps is None else eta_from_records(metrics, max_steps),
        "done": done,
    }


def status_data(run_dir: str | Path) -> dict[str, Any]:
    """Everything `pretrain status` shows, as plain data (the keys are in the module doc);
    ConfigError for a directory that is no run dir (:func:`run_dir_problem`)."""
    from evals.results import RESULTS_SUBDIR
    from pipelines.config import ConfigError
    from trainer.checkpoint import MARKER, CheckpointError, list_committed, read_meta
    from trainer.tracking_mlflow import read_run_file

    if (problem := run_dir_problem(Path(run_dir))) is not None:
        raise ConfigError(problem)  # exit 2 from the CLI
    run_dir = Path(run_dir).resolve()
    data: dict[str, Any] = {"run_dir": str(run_dir), "workflow": _workflow(run_dir)}
    checkpoints = []
    newest_meta: dict[str, Any] | None = None
    for c in list_committed(run_dir):
        try:
            meta = read_meta(c)
            step, newest_meta = int(meta["step"]), meta
        except CheckpointError:
            if not (c / MARKER).is_file():  # pruned by retention since the listing: no longer a checkpoint
                continue
            step = None  # committed, but its meta.json is unreadable: shown as `step ?`
        except (OSError, ValueError, KeyError, TypeError):  # TypeError: a meta.json that is no object
            step = None
        try:
            committed = (c / MARKER).stat().st_mtime
        except OSError:
            committed = None
        checkpoints.append({"name": c.name, "step": step, "committed_time": committed, "evals": _results(c / RESULTS_SUBDIR)})
    data["training"] = _training(run_dir, _max_steps(run_dir, newest_meta))
    data["checkpoints"] = [{k: v for k, v in c.items() if k != "committed_time"} for c in checkpoints]
    newest = checkpoints[-1] if checkpoints else None
    data["last_checkpoint"] = None if newest is None else {
        "name": newest["name"], "step": newest["step"], "committed_time": newest["committed_time"],
        "age_s": time.time() - newest["committed_time"] if newest["committed_time"] else None,
    }
    _gone_stages(data)
    _training_liveness(data["training"], run_dir)
    data["latest_evals"] = None
    archive = RunDir(run_dir).evals
    steps = sorted((p for p in archive.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), key=lambda p: p.name) if archive.is_dir() else []
    for p in reversed(steps):
        tasks = _results(p)
        if tasks:
            data["latest_evals"] = {"step": int(p.name.split("_")[1]), "tasks": tasks}
            break
    recorded = read_run_file(run_dir)
    data["mlflow"] = None
    if recorded:
        uri, run_id = recorded.get("uri", ""), recorded.get("run_id")
        ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith(("sqlite:", "file:")) else \
            f"{uri.rstrip('/')}/#/runs/{run_id}" if uri.startswith("http") else None
        data["mlflow"] = {"run_id": run_id, "uri": uri, "ui": ui}
    data["slurm_jobs"] = _slurm_jobs(run_dir, data["workflow"])
    report = RunDir(run_dir).report_png
    data["report"] = str(report) if report.exists() else None
    return data


def _gone_stages(data: dict[str, Any]) -> None:
    """A stage whose `pretrain run` is gone (see :func:`_workflow`) gets ``last_seen``: the last sign
    of its run (its start, the last training step, the last checkpoint)."""
    stages = (data["workflow"] or {}).get("stages", {})
    lc, t = data["last_checkpoint"] or {}, data["training"] or {}
    for name, st in stages.items():
        if st.get("running") is not False or st.get("recorded_status") != "running":
            continue
        signs = [st.get("started"), (st.get("driver") or {}).get("since"), t.get("last_step_time"), lc.get("committed_time")]
        st["last_seen"] = max((x for x in signs if isinstance(x, (int, float)) and not isinstance(x, bool)), default=None)


def _training_liveness(t: dict[str, Any] | None, run_dir: Path) -> None:
    """``running``: whether a live process holds the run dir's ``train`` lock (rank 0 of a training,
    however it was started; None when the holder is on another host). A training that does not run
    (stopped, failed, killed, queued) has no ETA; ``time_left_s`` keeps the time its steps left
    would take at the recent step time."""
    if t is None:
        return
    t["running"] = _lock_holder(run_dir, "train")["alive"]
    t["time_left_s"] = t["eta_s"]
    if t["running"] is False:
        t["eta_s"] = None


def _slurm_jobs(run_dir: Path, workflow: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The run's SLURM jobs (None when it submitted none); a SLURM workflow's failed stage takes its
    meaning and exit code from its last job's own exit line (:func:`_slurm_stage_outcome`)."""
    if not (RunDir(run_dir).slurm / JOBS_FILE).is_file():
        return None
    from pipelines.launching import list_jobs

    jobs = [_slurm_job(j) for j in list_jobs(run_dir)]
    if workflow and workflow.get("executor") == "slurm":
        by_id = {str(j["job_id"]): j for j in jobs}
        for st in workflow.get("stages", {}).values():
            _slurm_stage_outcome(st, by_id.get((st.get("job_ids") or [""])[-1]))
    return jobs


def _slurm_stage_outcome(st: dict[str, Any], job: dict[str, Any] | None) -> None:
    """A failed stage's ``meaning`` and ``exit_code`` from its last job's exit line ("... exited with
    code 2": refused, as everywhere), with ``why_job`` naming that job; SLURM's own state (FAILED)
    says only that the batch script ended non-zero. A job that wrote no exit line (killed, timed
    out) leaves the stage "failed"."""
    if st.get("status") != "failed" or not job or job.get("exit_status") is None:
        return
    code = job["exit_status"]
    st.update(exit_code=code, meaning="refused" if code == 2 else "failed", log=job.get("log"), why_job=str(job["job_id"]))


def _slurm_job(job: dict[str, Any]) -> dict[str, Any]:
    """One job as shown; one that ended failed also says why (see the module doc). SLURM is asked
    again only for those, and within slurm.jobs' time bound (a controller that does not answer costs
    one timeout per `status`, not one per job)."""
    from slurm.joblogs import final_exit
    from slurm.jobs import FAILED_STATES, job_state

    out = {k: job.get(k) for k in ("job_id", "name", "state", "restarts", "stdout")}
    if (str(job.get("state") or "").split() or [""])[0] not in FAILED_STATES:  # "CANCELLED by 0": its first word
        return out
    state = job_state(str(job["job_id"]))
    first_log = job.get("stderr") or job.get("stdout")
    found = final_exit(first_log) if first_log else None
    out.update(exit_code=state.exit_code or None, reason=state.reason or None, exit_line=found.line if found else None,
               exit_status=found.code if found else None, log=str(found.path) if found else first_log)
    return out


def _why_line(j: dict[str, Any], no_log: str = "?") -> str | None:
    """The indented line under a failed job (or a local stage that failed or stopped) in
    ``status_text``, or None for any other: what it means, its exit code, SLURM's reason, the line
    that says why and the log that holds it (``no_log`` when there is none)."""
    if "log" not in j:
        return None
    parts = [j.get("meaning") or "", f"exit code {j['exit_code']}" if j.get("exit_code") else "",
             f"reason {j['reason']}" if j.get("reason") else "", j.get("exit_line") or "no exit line in its logs"]
    return f"           {'; '.join(p for p in parts if p)}  (log: {j.get('log') or no_log})"


def _stage_why(st: dict[str, Any]) -> str | None:
    """A stage's why-line (see :func:`_why_line`; a SLURM stage's points at its job's); None for a
    stage that did not fail or stop, or with no exit code known (an older version's run dir, a SLURM
    job that wrote no exit line)."""
    if st.get("meaning") is None or st.get("exit_code") is None:
        return None
    if st.get("why_job"):  # a SLURM stage: its job's lines below say why, and where
        return f"           {st['meaning']}; exit code {st['exit_code']}: see job {st['why_job']} under slurm jobs"
    return _why_line({"meaning": st["meaning"], "exit_code": st["exit_code"], "exit_line": st.get("error"), "log": st.get("log")},
                     no_log="none kept: it went to the terminal that ran it")


def _scores(tasks: dict[str, dict[str, Any]]) -> str:
    from evals.results import format_scores

    return "; ".join(format_scores({"task": t, **r}) for t, r in tasks.items())


def _liveness_lines(name: str, st: dict[str, Any], lc: dict[str, Any] | None) -> list[str]:
    """The lines under a local stage recorded running whose `pretrain run` is gone (how to resume),
    or runs on another host (unknown from here); none for one that runs here."""
    driver = st.get("driver") or {}
    if st.get("running") is None and driver.get("host"):
        since = _clock(driver.get("since"))
        return [f"           running on {driver['host']} (cannot check from here): pid {driver.get('pid', '?')}, since {since}"]
    if st.get("recorded_status") != "running":
        return []
    who = f" (host {driver.get('host', '?')}, pid {driver.get('pid', '?')})" if driver else ""
    seen = _clock(st.get("last_seen"))
    at = f" from the last checkpoint (step {'?' if lc['step'] is None else lc['step']})" if name == "train" and lc else ""
    return [f"           not running: the `pretrain run` that ran it{who} is gone (killed without cleanup?); "
            f"last seen {seen} ({_ago(st.get('last_seen')) or '?'})",
            f"           run the same command again to resume{at}"]


def _workflow_lines(wf: dict[str, Any], lc: dict[str, Any] | None = None) -> list[str]:
    """The workflow's lines of ``status_text``: an unreadable workflow.json is said to be so;
    ``lc``: the last checkpoint (a killed training resumes from it)."""
    if wf.get("executor") is None:
        return [f"workflow  {wf.get('error')}"]
    lines = [f"({wf['error']})"] if wf.get("error") else []
    lines.append(f"workflow  {wf['executor']} executor, config {wf.get('config_path')} {' '.join(wf.get('overrides', []))}")
    for name, st in wf["stages"].items():
        jobs = f" jobs {','.join(st['job_ids'])}" if st.get("job_ids") else ""
        why = _stage_why(st)
        extra = f"  {st['error']}" if st.get("error") and (why is None or st.get("why_job")) else ""
        status = st.get("status") or "?"
        when = _duration(st.get("started"), st.get("ended") or st.get("last_seen")) if status != "pending" else ""
        lines.append(f"  {name:<7} {status:<11} attempts {st.get('attempts') or 0} {when:>6}{jobs}{extra}")
        lines += ([why] if why else []) + _liveness_lines(name, st, lc)
    return lines


def _train_gone(d: dict[str, Any]) -> bool:
    """Whether the train stage was recorded running by a `pretrain run` that is gone (:func:`_workflow`)."""
    train = ((d["workflow"] or {}).get("stages") or {}).get("train") or {}
    return train.get("running") is False and train.get("recorded_status") == "running"


def status_text(run_dir: str | Path, data: dict[str, Any] | None = None) -> str:
    from trainer.progress import format_duration

    d = data or status_data(run_dir)
    lines = [f"run dir   {d['run_dir']}"]
    if d["workflow"]:
        lines += _workflow_lines(d["workflow"], d["last_checkpoint"])
    t = d["training"]
    if t:
        of = f"/{t['max_steps']} ({t['percent']:.1f}%)" if t.get("max_steps") else ""
        val = f", val loss {t['val_loss']:.4f} (step {t['val_step']})" if t.get("val_loss") is not None else ""
        mfu = f", MFU {t['mfu'] * 100:.1f}%" if t.get("mfu") else ""
        loss = "skipped (non-finite)" if t.get("loss") is None else f"{t['loss']:.4f}"
        lines.append(
            f"training  step {t['step']}{of}, loss {loss}{val}, {t.get('tokens') or 0:,} tokens, "
            f"{t.get('tokens_per_s') or 0:,.0f} tokens/s{mfu}, last step {_ago(t.get('last_step_time'))}"
        )
        if t.get("done"):
            lines.append("          done (train.max_steps reached)")
        elif _train_gone(d):
            lines.append("          not running (its `pretrain run` is gone, see the train stage): no ETA")
        elif t.get("running") is False and t.get("time_left_s") is not None:
            lines.append(f"          not running now: {format_duration(t['time_left_s'])} of training left at the recent step time")
        elif t.get("eta_s") is not None:
            lines.append(f"          ETA {format_duration(t['eta_s'])} at the recent step time (while it runs)")
    else:
        lines.append("training  no steps yet")
    lc = d["last_checkpoint"]
    since = f", last committed step {'?' if lc['step'] is None else lc['step']} {_ago(lc.get('committed_time'))}" if lc else ""
    lines.append(f"checkpoints ({len(d['checkpoints'])} committed{since})")
    for c in d["checkpoints"]:
        step = "?" if c["step"] is None else c["step"]
        lines.append(f"  {c['name']} (step {step})  {_scores(c['evals']) or 'not evaluated yet'}")
    le = d["latest_evals"]
    if le:
        lines.append(f"evals     latest at step {le['step']}: {_scores(le['tasks'])}")
    m = d["mlflow"]
    if m:
        lines.append(f"mlflow    run {m['run_id']} at {m['uri']}")
        if m.get("ui"):
            lines.append(f"          {'see it with: ' if m['ui'].startswith('mlflow ui') else ''}{m['ui']}")
    if d["slurm_jobs"] is not None:
        lines.append("slurm jobs")
        for j in d["slurm_jobs"]:
            restarts = "-" if j["restarts"] is None else j["restarts"]
            lines.append(f"  {j['job_id']:>8} {j.get('name') or '':<24} {j.get('state') or '?':<11} restarts {restarts}  {j.get('stdout') or ''}")
            if (why := _why_line(j)) is not None:
                lines.append(why)
    if d["report"]:
        lines.append(f"report    {d['report']}")
    return "\n".join(lines)


def _strict(obj: Any) -> Any:
    """JSON has no NaN/inf (a stderr of one row is NaN): null instead, so any JSON reader takes it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def status_json(run_dir: str | Path) -> str:
    return json.dumps(_strict(status_data(run_dir)), indent=2, allow_nan=False, default=str)
