"""Config loading: typed sections, overrides, and errors that name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import ConfigError, PipelineConfig, dump_yaml, flatten, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["smoke.yaml", "gpt2-124m.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert isinstance(cfg, PipelineConfig) and cfg.source.endswith(name)
    assert cfg.data.shard_tokens > 0 and cfg.train.max_steps > 0


def test_real_config_matches_gpt2_124m_recipe():
    cfg = load_config(REPO / "configs" / "gpt2-124m.yaml")
    assert (cfg.data.source, cfg.data.source_config, cfg.data.shard_tokens) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", 100_000_000)
    assert cfg.model.name == "gpt2" and cfg.train.batch_tokens == 524_288 and cfg.train.seq_len == 1024
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_steps) == (6e-4, 6e-5, 715)


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        ["train.lr=3e-4", "data.minhash_dedup=false", "eval.harness_tasks=hellaswag,piqa", "data.source=0123", "eval.slurm.gpus=2"],
    )
    assert cfg.train.lr == 3e-4 and cfg.data.minhash_dedup is False
    assert cfg.eval.harness_tasks == ["hellaswag", "piqa"] and cfg.data.source == "0123" and cfg.eval.slurm.gpus == 2


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("data:\n  shard_tokenz: 5\n", "unknown key 'data.shard_tokenz'"),
        ("dataa:\n  shard_tokens: 5\n", "unknown key 'dataa'"),
        ("train:\n  max_steps: many\n", "'train.max_steps' must be an integer, got 'many'"),
        ("data:\n  minhash_dedup: 3\n", "'data.minhash_dedup' must be true or false"),
        ("eval:\n  slurm:\n    gpus: [1]\n", "'eval.slurm.gpus' must be an integer"),
        ("train: 5\n", "'train' is a section and needs a mapping"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("data: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_file_names_key_and_file(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.nope=1", "unknown key 'train.nope'"),
        ("train.lr=fast", "'train.lr' must be a number"),
        ("novalue", "is not of the form section.key=value"),
        ("model=gpt2", "'model' is a section"),
    ],
)
def test_bad_override_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "smoke.yaml", [override])


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(REPO / "configs" / "gpt2-124m.yaml", ["train.lr=1e-3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    again = load_config(path)
    assert to_dict(again) == to_dict(cfg)
    assert flatten(to_dict(cfg))["train.lr"] == 1e-3


def test_cli_takes_overrides_before_and_after_options(tmp_path):
    from pipelines.cli import build_parser, main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  shard_tokens: 5\n")
    # `pretrain sbatch CONFIG -o FILE key=value`: the override after the option still applies
    out = tmp_path / "job.sbatch"
    assert main(["sbatch", str(cfg), "train.max_steps=7", "-o", str(out), "slurm.partition=gpu-a"]) == 0
    text = out.read_text()
    assert "train.max_steps=7 slurm.partition=gpu-a" in text and "#SBATCH --partition=gpu-a" in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sbatch", str(cfg), "--bogus"])
    with pytest.raises(SystemExit):
        main(["sbatch", str(cfg), "-o", str(out), "--bogus"])
