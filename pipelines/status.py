"""`pretrain status RUN_DIR`: where a run stands, readable at a glance."""

from __future__ import annotations

import json
import time
from pathlib import Path


def _ago(t: float | None) -> str:
    if not t:
        return ""
    s = time.time() - t
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


def _duration(a: float | None, b: float | None) -> str:
    return f"{(b or time.time()) - a:.0f}s" if a else ""


def status_text(run_dir: str | Path) -> str:
    from evals.results import RESULTS_SUBDIR
    from trainer.checkpoint import list_committed, read_meta
    from trainer.metrics import read_metrics
    from trainer.tracking import RUN_FILE

    run_dir = Path(run_dir).resolve()
    lines = [f"run dir   {run_dir}"]
    wf_path = run_dir / "workflow.json"
    if wf_path.is_file():
        from pipelines.workflow import Workflow

        wf = json.loads(wf_path.read_text())
        if wf.get("executor") == "slurm":
            try:
                from pipelines.config import load_config

                w = Workflow(wf["config_path"], wf.get("overrides", []), load_config(wf["config_path"], wf.get("overrides", [])), log=lambda m: None)
                w.refresh_slurm()
                wf = json.loads(wf_path.read_text())
            except Exception as e:  # noqa: BLE001 - status must show what it can
                lines.append(f"(could not refresh SLURM states: {e})")
        lines.append(f"workflow  {wf.get('executor', 'local')} executor, config {wf.get('config_path')} {' '.join(wf.get('overrides', []))}")
        from pipelines.workflow import STAGES

        for name in STAGES:
            st = wf["stages"][name]
            jobs = f" jobs {','.join(st['job_ids'])}" if st.get("job_ids") else ""
            extra = f"  {st['error']}" if st.get("error") else ""
            when = _duration(st.get("started"), st.get("ended")) if st["status"] != "pending" else ""
            lines.append(f"  {name:<7} {st['status']:<11} attempts {st.get('attempts', 0)} {when:>6}{jobs}{extra}")
    metrics = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    if metrics:
        last = metrics[-1]
        vals = [m for m in metrics if m.get("val_loss") is not None]
        val = f", val loss {vals[-1]['val_loss']:.4f} (step {vals[-1]['step']})" if vals else ""
        mfu = f", MFU {last['mfu'] * 100:.1f}%" if last.get("mfu") else ""
        loss = "skipped (non-finite)" if last.get("loss") is None else f"{last['loss']:.4f}"
        lines.append(
            f"training  step {last['step']}, loss {loss}{val}, {last.get('tokens', 0):,} tokens, "
            f"{last.get('tokens_per_s', 0):,.0f} tokens/s{mfu}, last step {_ago(last.get('time'))}"
        )
    else:
        lines.append("training  no steps yet")
    ckpts = list_committed(run_dir)
    lines.append(f"checkpoints ({len(ckpts)} committed)")
    for c in ckpts:
        results = []
        for f in sorted((c / RESULTS_SUBDIR).rglob("*.json")) if (c / RESULTS_SUBDIR).is_dir() else []:
            try:
                r = json.loads(f.read_text())
            except ValueError:
                continue
            shown = ", ".join(f"{k} {v:.4f}" for k, v in r.get("metrics", {}).items() if not k.endswith("stderr"))
            results.append(f"{r.get('task', f.stem)}: {shown}")
        try:
            step = read_meta(c)["step"]
        except (OSError, ValueError, KeyError):
            step = "?"
        lines.append(f"  {c.name} (step {step})  {'; '.join(results) or 'not evaluated yet'}")
    run_file = run_dir / RUN_FILE
    if run_file.is_file():
        rec = json.loads(run_file.read_text())
        uri = rec.get("uri", "")
        lines.append(f"mlflow    run {rec.get('run_id')} at {uri}")
        if uri.startswith("sqlite:") or uri.startswith("file:"):
            lines.append(f"          see it with: mlflow ui --backend-store-uri {uri}")
        elif uri.startswith("http"):
            lines.append(f"          {uri.rstrip('/')}/#/runs/{rec.get('run_id')}")
    slurm_jobs = run_dir / "slurm" / "jobs.jsonl"
    if slurm_jobs.is_file():
        from pipelines.launching import list_jobs

        lines.append("slurm jobs")
        for j in list_jobs(run_dir):
            restarts = "-" if j["restarts"] is None else j["restarts"]
            lines.append(f"  {j['job_id']:>8} {j.get('name', ''):<24} {j['state']:<11} restarts {restarts}  {j.get('stdout', '')}")
    report = run_dir / "report.png"
    if report.exists():
        lines.append(f"report    {report}")
    return "\n".join(lines)
