"""The `pretrain` command line as a user meets it: help, version, refusals with exit 2 that name
what to fix and write nothing, and `pretrain report` (its overrides, error bars, chance line,
smoothed loss).

Everything runs in-process through ``pipelines.cli.main`` (the console script's entry point):
no subprocess, no torchrun, no scheduler is started, because every refusal here must happen
before any of them would.
"""

from __future__ import annotations

import csv
import json
import math
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from pipelines.config import load_config, to_dict
from pipelines.report import chance_level, collect, plot_series, smooth, write_report

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# ------------------------------------------------------------------ help, version


def test_bare_pretrain_prints_the_command_list_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    for command in ("run", "status", "report", "data", "train", "submit", "sbatch", "eval", "evals", "config"):
        assert f"\n    {command} " in err, err
    assert main(["evals"]) == 2  # a bare group lists its actions too
    assert "watch" in capsys.readouterr().err


def test_version_is_the_installed_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"pretrain {version('pretrain')}"


# ------------------------------------------------------------------ config show


def test_config_show_prints_yaml_that_loads_back_to_the_same_config(tmp_path, capsys):
    overrides = ["train.lr=3e-4", "eval.harness_tasks=piqa,arc_easy", "train.sample_prompt=Once upon", "slurm.extra=--exclusive"]
    assert main(["config", "show", SMOKE, *overrides]) == 0
    shown = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(shown)
    expected = to_dict(load_config(SMOKE, overrides))
    assert to_dict(load_config(tmp_path / "resolved.yaml")) == expected
    assert yaml.safe_load(shown) == expected  # every key, defaults included
    assert expected["train"]["lr"] == 3e-4 and expected["eval"]["harness_tasks"] == ["piqa", "arc_easy"]


def test_config_show_refuses_a_bad_value_with_exit_2(capsys):
    assert main(["config", "show", SMOKE, "eval.order=newst"]) == 2
    captured = capsys.readouterr()
    assert "eval.order must be one of newest, oldest, got 'newst'" in captured.err and captured.out == ""


# ------------------------------------------------------------------ refused before anything is written


def test_sbatch_names_every_bad_key_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "train.sbatch"
    bad = ["train.dtype=fp16", "model.name=gpt3", "train.batch_tokens=1000", "eval.hellaswag_style=foo"]
    assert main(["sbatch", SMOKE, *bad, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    for key in ("train.dtype", "name 'gpt3'", "train.batch_tokens (1000)", "eval.hellaswag_style"):
        assert key in err, err
    assert "Traceback" not in err
    assert tree(tmp_path) == []


@pytest.mark.parametrize("override, message", [
    ("eval.order=newst", "eval.order must be one of newest, oldest"),
    ("slurm.time=25h", "slurm.time must be a SLURM time"),
    ("train.seq_len=256", "train.seq_len (256) exceeds the model's block_size (128"),
])  # fmt: skip
def test_sbatch_and_submit_refuse_a_bad_value_before_anything_is_written(tmp_path, capsys, override, message):
    run_dir = tmp_path / "run"
    for command in (["sbatch", SMOKE, override, "-o", str(tmp_path / "x.sbatch")], ["submit", SMOKE, override]):
        assert main([*command, f"run_dir={run_dir}"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert tree(tmp_path) == []


def test_batch_geometry_is_checked_for_the_ranks_the_launch_will_start(tmp_path, capsys):
    """A batch must split over the world size of how training runs, and only that one: a SLURM job
    has slurm.nodes x gpus_per_node ranks, a local run nodes x train.nproc_per_node."""
    out = tmp_path / "train.sbatch"
    # 4 * 128 * 2 GPUs = 1024 divides it; 3 local ranks (1536) do not
    slurm_ok = ["train.device=auto", "slurm.gpus_per_node=2", "train.nproc_per_node=3", "train.batch_tokens=2048"]
    assert main(["sbatch", SMOKE, *slurm_ok, "-o", str(out)]) == 0
    assert "--gpus-per-node=2" in out.read_text()
    capsys.readouterr()
    run_dir = tmp_path / "local"
    assert main(["train", SMOKE, *slurm_ok, f"run_dir={run_dir}"]) == 2  # refused before torchrun starts
    err = capsys.readouterr().err
    assert "(4 * 128 * 3 = 1536)" in err and "world size 3 = nnodes x train.nproc_per_node" in err, err
    assert not run_dir.exists()
    assert main(["run", SMOKE, *slurm_ok, f"run_dir={run_dir}"]) == 2
    assert "1536" in capsys.readouterr().err and not run_dir.exists()
    # and the other way round: fine on the smoke config's 2 local ranks, not on 2 nodes x 3 GPUs
    slurm_bad = ["train.device=auto", "slurm.nodes=2", "slurm.gpus_per_node=3"]
    out2 = tmp_path / "bad.sbatch"
    assert main(["sbatch", SMOKE, *slurm_bad, "-o", str(out2)]) == 2
    assert "(4 * 128 * 6 = 3072)" in capsys.readouterr().err and not out2.exists()


def test_evals_watch_refuses_a_missing_run_dir_and_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    assert main(["evals", "watch", str(missing), "--once"]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evals", "watch", str(empty), "--once"]) == 2  # no checkpoint to read a config from, no --config
    err = capsys.readouterr().err
    assert "no committed checkpoint" in err and "--config" in err
    assert tree(empty) == []
    # the newest checkpoint's meta.json, where the eval config comes from, is torn: refused, not a traceback
    from trainer.checkpoint import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "run", 20, {}, {"state": {}}, {"step": 20}, {"step": 20, "config": {}})
    (ckpt / "meta.json").write_text('{"step": 20, "con')
    assert main(["evals", "watch", str(tmp_path / "run"), "--once"]) == 2
    err = capsys.readouterr().err
    assert "meta.json is unreadable" in err and "Traceback" not in err, err


def test_sbatch_to_an_unwritable_path_is_exit_2_without_traceback(tmp_path, capsys):
    assert main(["sbatch", SMOKE, "-o", str(tmp_path / "no-such-dir" / "train.sbatch")]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "Traceback" not in err


# ------------------------------------------------------------------ report


def fake_run(run_dir: Path, steps: int = 60) -> None:
    """A run dir as training and evals leave it: metrics.jsonl (one skipped step with a null
    loss) and eval result files with their stderr (the shapes evals.results writes)."""
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        loss = None if step == 30 else 10.0 * math.exp(-step / 20) + 3.0 + (0.4 if step % 2 else -0.4)
        lines.append(json.dumps({"step": step, "loss": loss, "tokens": step * 1024, **({"val_loss": 4.0} if step % 20 == 0 else {})}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for step, acc in ((20, 0.27), (40, 0.29), (60, 0.31)):
        d = run_dir / "evals" / f"step_{step:08d}"
        (d / "lm_eval").mkdir(parents=True)
        (d / "hellaswag.json").write_text(json.dumps({"task": "hellaswag", "step": step, "metrics": {"acc": acc, "acc_norm": acc + 0.01},
                                                      "stderr": {"acc": 0.031, "acc_norm": 0.032}, "n": 200}))
        (d / "lm_eval" / "arc_easy.json").write_text(json.dumps({"task": "lm_eval/arc_easy", "step": step, "metrics": {"acc": 0.4},
                                                                 "stderr": {"acc": float("nan")}}))


def test_report_has_stderr_columns_chance_lines_and_a_smoothed_loss(tmp_path):
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    png, csv_path = write_report(run_dir, None, log=lambda _: None)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rows = list(csv.DictReader(csv_path.open()))
    assert float(rows[19]["eval/hellaswag/acc_norm_stderr"]) == 0.032 and float(rows[19]["eval/hellaswag/acc"]) == 0.27
    assert "eval/lm_eval/arc_easy/acc_stderr" not in rows[0]  # lm-eval's NaN stderr is no number

    series = plot_series(collect(run_dir))
    hs = series["evals"]["eval/hellaswag/acc_norm"]
    assert hs["points"] == [(20 * 1024, 0.28), (40 * 1024, 0.3), (60 * 1024, 0.32)] and hs["stderr"] == [0.032] * 3
    assert hs["chance"] == 0.25 and series["evals"]["eval/lm_eval/arc_easy/acc"]["chance"] is None
    assert series["evals"]["eval/lm_eval/arc_easy/acc"]["stderr"] == [None] * 3
    raw, smoothed = series["loss"]["train_loss"], series["loss"]["train_loss_smoothed"]
    assert len(raw) == len(smoothed) == 59 and [x for x, _ in raw] == [x for x, _ in smoothed]  # the null step is left out

    def roughness(points):  # summed |second differences|: the zig-zag, not the smooth trend
        ys = [y for _, y in points]
        return sum(abs(a - 2 * b + c) for a, b, c in zip(ys, ys[1:], ys[2:]))

    assert roughness(smoothed) < roughness(raw) / 4  # the ±0.4 alternation is averaged out...
    assert smoothed[-1][1] < smoothed[0][1] - 3  # ...the downward trend is kept


def test_smoothing_is_debiased_and_chance_needs_a_known_number_of_choices():
    assert smooth([2.0] * 7) == pytest.approx([2.0] * 7)  # no pull towards 0 at the start
    assert smooth([]) == []
    assert chance_level("eval/lm_eval/piqa/acc_norm") == 0.5 and chance_level("eval/hellaswag/acc") == 0.25
    assert chance_level("eval/hellaswag/n") is None and chance_level("eval/lm_eval/mystery/acc") is None


def test_report_overrides_are_validated_and_used(tmp_path, capsys):
    run_dir = tmp_path / "run"
    fake_run(run_dir, steps=20)
    db = tmp_path / "mlflow.db"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(run_dir), "model": {"name": "micro"}, "train": {"seq_len": 64},
                                      "tracking": {"uri": f"sqlite:///{db}"}}))
    (run_dir / "workflow.json").write_text(json.dumps({"config_path": str(config), "overrides": []}))
    assert main(["report", str(run_dir), "bogus.key=1"]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err and not (run_dir / "report.png").exists()
    # the override reaches the report: with tracking off it never opens the config's MLflow store
    assert main(["report", str(run_dir), "tracking.uri=none"]) == 0
    assert (run_dir / "report.png").is_file() and not db.exists()
    assert "MLflow" not in capsys.readouterr().out
    (run_dir / "workflow.json").unlink()
    assert main(["report", str(run_dir), "tracking.uri=none"]) == 2  # nothing to apply it to: say so
    assert "pass --config CONFIG" in capsys.readouterr().err


def test_only_the_first_stop_signal_interrupts_a_command_and_its_cleanup_runs_to_the_end():
    """SLURM and `kill -- -PGID` often deliver a stop signal twice, or SIGTERM after SIGUSR2: the
    second one must not cut short what unwinds the first (cancelling eval jobs, saving their state,
    stopping Ray). Real signals, to this process."""
    import os
    import signal
    import time

    from pipelines.stopping import StopRequested, stop_signals

    received: list[int] = []
    cleaned_up = False
    with pytest.raises(StopRequested):
        with stop_signals(received.append):
            try:
                os.kill(os.getpid(), signal.SIGUSR2)
                time.sleep(5)  # interrupted at once
            finally:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler runs in here
                cleaned_up = True
    assert cleaned_up and received == [signal.SIGUSR2, signal.SIGTERM]


def test_a_stop_signal_while_the_handlers_are_put_back_cannot_leave_them_installed(monkeypatch):
    """The first stop signal arriving just as the block ends raised inside the loop that puts the
    handlers back: ours stayed installed, Python reset them to the default action at exit, and the
    next SIGTERM killed a process whose outcome was decided (CI: `pretrain train` exit 3 became -15).
    The signal is sent from inside the first restore, the moment that window opens."""
    import os
    import signal

    from pipelines import stopping

    real_signal = signal.signal
    sent: list[int] = []

    def restore_with_a_signal_arriving(signum, handler):
        if not sent and handler is signal.SIG_IGN:  # the first handler put back
            sent.append(signum)
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before the next line
        return real_signal(signum, handler)

    received: list[int] = []
    saved = {s: real_signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        raised = None
        try:
            with stopping.stop_signals(received.append):
                monkeypatch.setattr(stopping.signal, "signal", restore_with_a_signal_arriving)
        except stopping.StopRequested as e:  # what it did: out of the middle of the restore
            raised = e
        monkeypatch.undo()
        assert sent and received == [signal.SIGTERM] and raised is None, "recorded, not raised: the block had ended"
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
    finally:
        monkeypatch.undo()
        for s, h in saved.items():
            real_signal(s, h)
