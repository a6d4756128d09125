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


# ------------------------------------------------------------------ checks that span sections


def test_every_problem_is_reported_at_once_with_its_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  dtype: fp16\n  batch_tokens: 1000\n  micro_batch_size: 4\n  seq_len: 128\n"
                    "model:\n  name: gpt3\neval:\n  hellaswag_style: foo\n  order: newst\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = str(e.value)
    assert text.startswith(f"{path}: 4 problems:\n")
    for part in ("model.n_layer is not set and name 'gpt3' is not a preset", "train.dtype must be one of auto, bfloat16, float32, got 'fp16'",
                 "eval.hellaswag_style must be one of nanogpt, harness, got 'foo'", "train.batch_tokens (1000) must be a positive multiple"):
        assert part in text, text
    assert "eval.order" not in text  # a section reports its first problem only


def test_unknown_keys_and_wrong_types_are_reported_together_with_the_rest(tmp_path):
    """Not one unknown key per try: every misspelt key, wrong type and bad override in one message."""
    path = tmp_path / "typos.yaml"
    path.write_text("eval:\n  limt: 5\n  device: cpux\ntrain:\n  lr_min: 0.1\n  max_steps: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.nope=1", "train.seed=x"])
    text = str(e.value)
    assert "6 problems:" in text, text
    for part in ("unknown key 'eval.limt'", "unknown key 'train.lr_min'", "'train.max_steps' must be an integer, got 'many'",
                 "override 'train.nope=1': unknown key 'train.nope'", "override 'train.seed=x'", "eval.device"):
        assert part in text, text


@pytest.mark.parametrize("overrides, message", [
    (["train.seq_len=256"], "train.seq_len (256) exceeds the model's block_size (128, model.name 'tiny')"),
    (["model.block_size=64"], "train.seq_len (128) exceeds the model's block_size (64, model.name 'tiny')"),
    (["train.batch_tokens=768"], "train.batch_tokens (768) must be a positive multiple of micro_batch_size * seq_len * world_size (4 * 128 * 1 = 512); e.g. 1024"),
    (["model.n_head=3"], "model.n_embd (128) must be a multiple of n_head (3)"),
])  # fmt: skip
def test_geometry_needing_no_hardware_is_refused_at_load(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "smoke.yaml", overrides)
    assert message in str(e.value)


def test_world_size_is_the_one_of_how_training_runs():
    from pipelines.config import check_geometry, training_world_size

    cfg = load_config(REPO / "configs" / "smoke.yaml", ["slurm.nodes=2", "slurm.gpus_per_node=4"])
    assert training_world_size(cfg, on_slurm=False) == 2 and training_world_size(cfg, on_slurm=False, nnodes=3) == 6
    assert training_world_size(cfg, on_slurm=True) == 2 * 2  # train.device cpu: no GPU asked for, nproc_per_node ranks per node
    gpu = load_config(REPO / "configs" / "gpt2-124m.yaml", ["slurm.nodes=1", "slurm.gpus_per_node=8"])
    assert training_world_size(gpu, on_slurm=True) == 8
    check_geometry(gpu, on_slurm=True)  # 524288 = 64 * 1024 * 8: the 124M recipe on one 8-GPU node
    with pytest.raises(ConfigError, match=r"64 \* 1024 \* 16 = 1048576\); e.g. 1048576, or keep the batch \(and the recipe\) with train.micro_batch_size=32 "
                       r"\(world size 16 = slurm.nodes x slurm.gpus_per_node\)"):
        check_geometry(load_config(REPO / "configs" / "gpt2-124m.yaml", ["slurm.nodes=2", "slurm.gpus_per_node=8"]), on_slurm=True)


def test_config_knows_the_model_presets_shapes_without_torch():
    from trainer.config import PRESET_SHAPES
    from trainer.model import PRESETS, resolve_config

    assert PRESET_SHAPES == PRESETS
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["model.n_layer=3"])
    resolved = resolve_config(cfg.model)
    assert cfg.model.resolved_shape() == {k: getattr(resolved, k) for k in ("n_layer", "n_head", "n_embd", "block_size")}
