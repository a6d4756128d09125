"""What an eval result records about how it was computed, and how it reaches MLflow.

``eval.dtype: auto`` is fp32 on CPU and bf16 on CUDA: a result must say which ran, and a result of
one precision must not pass for the other's. Results saved while tracking was off must reach the
training's MLflow run once `pretrain report` runs with tracking on, as its loss steps do.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import yaml

from evals.config import EvalConfig
from evals.job import config_from_checkpoint, evaluate_checkpoint
from evals.results import all_complete, archive_path, read_result, result_path, write_json_atomic
from pipelines.cli import main
from tests.evals_helpers import hellaswag_rows, mlflow_server, write_jsonl
from tests.test_evals_audit import _checkpoint
from trainer.checkpoint import read_meta

TASKS = ["hellaswag"]


def _evaluated(tmp_path: Path, *overrides: str) -> tuple[Path, EvalConfig]:
    """A committed checkpoint of a tiny untracked run (step 2), evaluated on CPU with ``overrides``."""
    ckpt = _checkpoint(tmp_path / "run", 0, write_jsonl(tmp_path / "hs.jsonl", hellaswag_rows(8)))
    cfg = config_from_checkpoint(read_meta(ckpt), list(overrides))
    evaluate_checkpoint(ckpt, cfg, log=lambda m: None)
    return ckpt, cfg


def test_a_result_records_the_precision_that_ran_and_is_not_taken_for_the_other(tmp_path, gpt2_ranks):
    ckpt, cfg = _evaluated(tmp_path)  # eval.dtype: auto, on CPU
    res = read_result(ckpt, "hellaswag")
    assert res["settings"]["dtype"] == "float32" and res["dtype_setting"] == "auto" and res["device"] == "cpu", res
    assert all_complete(ckpt, cfg, TASKS, device_type="cpu")
    # the same checkpoint and config on a GPU computes in bf16: this fp32 number is not its result
    assert not all_complete(ckpt, cfg, TASKS, device_type="cuda")
    # a SLURM watcher on a login node without GPUs asks as the job's GPU node (eval.device: auto) would
    from evals.results import job_device_type

    auto = replace(cfg, device="auto", slurm=replace(cfg.slurm, gpus=1))
    assert job_device_type(auto, "slurm") == "cuda" and job_device_type(auto, "local") == "cpu"
    assert job_device_type(replace(auto, slurm=replace(cfg.slurm, gpus=0)), "slurm") == "cpu"

    # a file written before the dtype was resolved says "auto"; its device says what auto ran as
    for device, cpu_done, gpu_done in (("cpu", True, False), ("cuda:0", False, True)):
        old = {**res, "settings": {**res["settings"], "dtype": "auto"}, "device": device}
        old.pop("dtype_setting")
        write_json_atomic(result_path(ckpt, "hellaswag"), old)
        assert all_complete(ckpt, cfg, TASKS, device_type="cpu") is cpu_done, device
        assert all_complete(ckpt, cfg, TASKS, device_type="cuda") is gpu_done, device
    # a CPU eval after that GPU (bf16) result computes its own fp32 one, rather than reporting done
    summary = evaluate_checkpoint(ckpt, cfg, log=lambda m: None)
    assert summary["tasks"]["hellaswag"] != "already done", summary
    assert read_result(ckpt, "hellaswag")["settings"]["dtype"] == "float32"


def test_results_saved_with_tracking_off_reach_mlflow_with_the_report(tmp_path, gpt2_ranks):
    """Eval with tracking off, then `pretrain report` with tracking on: the MLflow run it creates
    gets the eval points (once, however often the report runs) and the precision they ran in."""
    from mlflow.tracking import MlflowClient

    ckpt, cfg = _evaluated(tmp_path)
    run_dir = ckpt.parent.parent
    res = json.loads(archive_path(run_dir, 2, "hellaswag").read_text())
    assert res["logged"] == "disabled"
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s, "tokens": 64 * s}) + "\n" for s in (1, 2)))
    (tmp_path / "mlflow").mkdir()
    with mlflow_server(tmp_path / "mlflow") as uri:
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump({"run_dir": str(run_dir), "model": {"name": "micro"}, "train": {"seq_len": 32},
                                          "tracking": {"uri": uri, "experiment": "eval-provenance"}}))
        for _ in range(2):  # a second report sends nothing twice
            assert main(["report", str(run_dir), "--config", str(config)]) == 0
        run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
        client = MlflowClient(tracking_uri=uri)
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
        acc = client.get_metric_history(run_id, "eval/hellaswag/acc")
        assert [(m.step, m.value) for m in acc] == [(2, res["metrics"]["acc"])], acc
        tags = client.get_run(run_id).data.tags
        assert tags["eval/hellaswag/dtype"] == "float32" and tags["eval/hellaswag/device"] == "cpu", tags

        # the same checkpoint scored in bf16 and logged by the eval job: the run says both ran
        bf16 = config_from_checkpoint(read_meta(ckpt), ["eval.dtype=bfloat16", f"eval.tracking_uri={uri}"])
        evaluate_checkpoint(ckpt, bf16, log=lambda m: None)
        assert read_result(ckpt, "hellaswag")["logged"] is True
        assert client.get_run(run_id).data.tags["eval/hellaswag/dtype"] == "bfloat16, float32"


def test_a_quick_check_is_not_drawn_as_the_checkpoints_result(tmp_path, gpt2_ranks):
    """`pretrain eval --limit 3` keeps its numbers under checks/, apart from the checkpoint's result:
    the report (PNG, CSV) and its MLflow sync must not take 3 rows for the checkpoint's score."""
    from pipelines.report import collect

    ckpt = _checkpoint(tmp_path / "run", 0, write_jsonl(tmp_path / "hs.jsonl", hellaswag_rows(8)))
    cfg = config_from_checkpoint(read_meta(ckpt))
    evaluate_checkpoint(ckpt, cfg, limit=3, log=lambda m: None)
    assert list((tmp_path / "run" / "evals").rglob("checks/*.json"))
    assert not any(k.startswith("eval/") for row in collect(tmp_path / "run") for k in row)


def test_a_slurm_workflow_on_a_login_node_without_gpus_counts_the_gpu_jobs_results_as_done(tmp_path, gpt2_ranks):
    """`pretrain run --executor slurm` checks the eval stage from a login node without GPUs, while the
    eval jobs ran on GPU nodes (`eval.slurm.gpus: 1`, `eval.dtype: auto`: bf16 there). Their results
    are the stage's output: judged as this machine would compute them (fp32), every checkpoint would
    look unevaluated and the stage would never be done. A local workflow still wants its own fp32 result."""
    from pipelines.config import load_config
    from pipelines.stages import StageContext, unevaluated

    ckpt, _ = _evaluated(tmp_path)
    run_dir = ckpt.parent.parent
    gpu_result = {**read_result(ckpt, "hellaswag"), "device": "cuda:0"}
    gpu_result["settings"] = {**gpu_result["settings"], "dtype": "bfloat16"}
    write_json_atomic(result_path(ckpt, "hellaswag"), gpu_result)
    cfg = load_config(None, [f"run_dir={run_dir}", f"eval.hellaswag_path={tmp_path / 'hs.jsonl'}", "eval.harness_tasks=[]",
                             "eval.device=auto", "eval.slurm.gpus=1", "eval.batch_size=4"])
    ctx = StageContext(cfg, run_dir, "run.yaml", [])
    assert unevaluated(replace(ctx, executor="slurm")) == []
    assert unevaluated(replace(ctx, executor="local")) == [ckpt.name]  # this CPU computes fp32: not its result
