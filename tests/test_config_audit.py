"""Regressions from an audit of the config and the CLI as a careless user meets them: each value here
was accepted (or crashed) before and is now refused up front with exit 2, naming the key or option."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.config import ConfigError, load_config

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, key", [
    ("train:\n  lr: 0.1\n  lr: 0.2\n", "'lr'"),  # the later one won silently
    ("train:\n  lr: 0.1\nmodel:\n  name: tiny\ntrain:\n  max_steps: 5\n", "'train'"),  # the first section was dropped
])
def test_duplicate_yaml_keys_are_refused(tmp_path, capsys, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=f"duplicate key {key}"):
        load_config(path)
    assert main(["config", "show", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_yaml_merge_keys_still_work(tmp_path):
    cfg = load_config(write(tmp_path, "slurm: &s\n  partition: gpu\neval:\n  slurm:\n    <<: *s\n    partition: cpu\n"))
    assert cfg.eval.slurm.partition == "cpu" and cfg.slurm.partition == "gpu"


def test_unquoted_times_and_numeric_strings_keep_their_text(tmp_path):
    # YAML 1.1 read 24:00:00 as the base-60 integer 86400 (then 86400 minutes = 60 days in #SBATCH --time)
    # and 0123 as the octal 83
    cfg = load_config(write(tmp_path, "slurm:\n  time: 24:00:00\nray:\n  time: 1:30:00\ndata:\n  source: 0123\n"))
    assert (cfg.slurm.time, cfg.ray.time, cfg.data.source) == ("24:00:00", "1:30:00", "0123")


@pytest.mark.parametrize("where", ["file", "override"])
def test_leading_zero_integers_are_refused_not_read_as_octal(tmp_path, where):
    path = write(tmp_path, "train:\n  max_steps: 010\n" if where == "file" else "")
    with pytest.raises(ConfigError, match="'train.max_steps' must be an integer, got '010'"):
        load_config(path, [] if where == "file" else ["train.max_steps=010"])


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_run_dir_is_refused(tmp_path, value):
    # an empty run_dir trained into the current directory
    with pytest.raises(ConfigError, match="run_dir must not be empty"):
        load_config(SMOKE, [f"run_dir={value}"])


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_tracking_experiment_is_refused(value):
    # MLflow refused it only once training started (after the data stage of `pretrain run`)
    with pytest.raises(ConfigError, match="tracking.experiment must not be empty"):
        load_config(SMOKE, [f"tracking.experiment={value}"])


def test_an_experiment_name_longer_than_mlflow_takes_is_refused_at_load():
    # MLflow refused it only once training started (exit 2 after the data stage of `pretrain run`)
    load_config(SMOKE, ["tracking.experiment=" + "e" * 500])
    with pytest.raises(ConfigError, match="tracking.experiment must be at most 500 characters"):
        load_config(SMOKE, ["tracking.experiment=" + "e" * 501])


@pytest.mark.parametrize("item, key", [
    ("--time=0", "slurm.time"),  # unlimited, which slurm.time refuses
    ("--nodes=9", "slurm.nodes"),  # the batch geometry is checked against slurm.nodes
    ("--output=/tmp/elsewhere.out", "run_dir"),  # `submit --wait` and `jobs` read the log from the run dir
    ("#SBATCH --signal=B:USR2@5", "slurm.signal_delay_s"),
    ("--requeue", None),
])
def test_slurm_extra_cannot_override_options_the_pipeline_sets(item, key):
    with pytest.raises(ConfigError, match="slurm.extra\\[1\\]") as e:
        load_config(SMOKE, [f'slurm.extra=["--exclusive", "{item}"]'])
    assert key is None or key in str(e.value)


@pytest.fixture
def no_training(monkeypatch):
    """`pretrain train` up to the launch: records what would have been started."""
    import trainer.launch

    calls = []
    monkeypatch.setattr(trainer.launch, "train_command", lambda *a, **k: calls.append(a) or 0)
    return calls


@pytest.mark.parametrize("args", [
    ["--nnodes", "0"],  # ran as one node
    ["--nnodes=-1"],
    ["--nnodes", "2"],  # no rendezvous endpoint: a ValueError traceback
    ["--nnodes", "2", "--rdzv-endpoint", "bad host"],  # torchrun's ValueError traceback, exit 1
    ["--nnodes", "2", "--rdzv-endpoint", "node1"],
])
def test_train_launch_options_are_checked_before_anything_starts(no_training, capsys, args):
    with pytest.raises(SystemExit) as e:
        main(["train", SMOKE, "train.nproc_per_node=1", *args])
    assert e.value.code == 2 and not no_training
    err = capsys.readouterr().err
    assert ("--nnodes" in err or "--rdzv-endpoint" in err) and "Traceback" not in err


def test_train_multi_node_options_still_pass(no_training):
    assert main(["train", SMOKE, "train.nproc_per_node=1", "--nnodes", "2", "--rdzv-endpoint", "node-1.cluster:29500"]) == 0
    assert no_training and no_training[0][1:3] == (2, "node-1.cluster:29500")


@pytest.mark.parametrize("tasks", [",,", " ", "a b", "arc_easy,$(id)"])
def test_eval_tasks_option_is_checked(tmp_path, monkeypatch, capsys, tasks):
    # ",," evaluated nothing and exited 0; "a b" failed after loading the model, exit 1 (retry may help)
    import evals.job
    from trainer.checkpoint import MARKER

    ckpt = tmp_path / "step_00000001"
    ckpt.mkdir()
    (ckpt / MARKER).write_text("{}")
    calls = []
    monkeypatch.setattr(evals.job, "evaluate_checkpoint", lambda *a, **k: calls.append(k))
    with pytest.raises(SystemExit) as e:
        main(["eval", str(ckpt), "--config", SMOKE, "--tasks", tasks])
    assert e.value.code == 2 and not calls and "--tasks" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["status"], ["jobs"], ["report"], ["evals", "watch"]])
def test_empty_run_dir_argument_is_refused(tmp_path, monkeypatch, capsys, command):
    # `pretrain status ""` showed the current directory as a run dir (`report ""` wrote its report there)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([*command, ""])
    assert e.value.code == 2 and "run_dir" in capsys.readouterr().err


def test_home_relative_paths_are_expanded_for_every_reader():
    # the data stage wrote to $HOME/d, then `pretrain run` looked for a literal "./~/d" (exit 1, every rerun)
    cfg = load_config(SMOKE, ["data.output_dir=~/d", "run_dir=~/r"])
    assert (cfg.data.output_dir, cfg.run_dir) == (str(Path.home() / "d"), str(Path.home() / "r"))


@pytest.mark.parametrize("override, named", [
    ("eval.hellaswag=false", "nothing to evaluate"),  # the watcher said so only after data and training, exit 1
    ("eval.hellaswag_path=/nonexistent/hellaswag.jsonl", "/nonexistent/hellaswag.jsonl does not exist"),
    ("eval.harness_tasks=[arc_easy,no_such_task]", "no_such_task: not a task of lm-evaluation-harness"),  # was retried
    ("eval.harness_tasks=[arc_easy,gsm8k]", "gsm8k: offline (eval.data_source=local) and no local copy"),  # smoke is offline
])
def test_pretrain_run_refuses_evals_that_could_never_run_before_any_stage(tmp_path, capsys, override, named):
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    rc = main(["run", SMOKE, f"run_dir={run_dir}", f"data.output_dir={data_dir}", override])
    err = capsys.readouterr().err
    assert rc == 2 and named in err and "harness_tasks: arc_easy" not in err, err  # a usable task is not named
    assert not run_dir.exists() and not data_dir.exists(), "refused before the data stage"
