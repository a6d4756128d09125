"""The whole run's configuration: one section per stage, composed from the stages' own dataclasses.

Every stage owns the dataclass of its own section (``dataprep.config``, ``trainer.config``,
``evals.config``, ``slurm.config``); this module composes them into :class:`PipelineConfig`, loads
a YAML file plus ``section.key=value`` overrides strictly (``common.strict``: every unknown key and
wrong type is an error naming the key and its origin), and checks the rules that span sections.
Stages never import this module: the layer above hands them their resolved sections (the training
worker gets the resolved config as a file, see ``trainer.config.TrainJob``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.strict import ConfigError, apply_overrides, flatten, merge, read_yaml_mapping, to_dict, validate_sections
from dataprep.config import DataConfig, RayConfig
from evals.config import EvalConfig
from slurm.config import SlurmConfig
from trainer.config import ModelConfig, TrackingConfig, TrainConfig

__all__ = ["ConfigError", "PipelineConfig", "TrackingConfig", "check_geometry", "dump_yaml", "flatten", "load_config",
           "to_dict", "training_world_size"]


@dataclass
class PipelineConfig:
    """The whole run: one section per stage, plus where the run lives on disk."""

    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # Where this config was loaded from (not a YAML key; filled in by load_config).
    source: str = field(default="<defaults>", metadata={"internal": True})


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load ``path`` (or the defaults when None) and apply ``section.key=value`` overrides."""
    cfg = PipelineConfig()
    where = "<defaults>"
    problems: list[str] = []  # unknown keys and wrong types, reported with validate()'s in one round
    if path is not None:
        where = str(path)
        merge(cfg, read_yaml_mapping(path), prefix="", where=where, problems=problems)
    apply_overrides(cfg, overrides, problems=problems)
    # "~/..." as the shell means it, for every reader: the data stage expanded data.output_dir but the
    # trainer and the workflow did not (the finished data "not found" after the whole data stage),
    # and run_dir became a directory named "~" under the current one
    cfg.run_dir, cfg.data.output_dir = os.path.expanduser(cfg.run_dir), os.path.expanduser(cfg.data.output_dir)
    cfg.source = where
    validate(cfg, where if not overrides else f"{where} with overrides {list(overrides)}", problems)
    return cfg


# Characters that may appear in a string value: control characters end a line of a generated
# script (a newline in an ``#SBATCH`` comment runs the rest as a command) or corrupt logs.
_MULTILINE_OK = {"train.sample_prompt"}


def validate(cfg: PipelineConfig, where: str, earlier: list[str] | tuple[str, ...] = ()) -> None:
    """Checks that need no hardware, run on every load so that `sbatch`, `submit` and `run` refuse a
    bad config before anything is written or queued.

    Three kinds: no control characters in any string value (anywhere); each section's own rules,
    from its ``validate()`` method (a section raises ``ValueError("lr must be > 0, got -1")``, the
    message starting with its key relative to the section; this prefixes the section and the
    config's origin: "smoke.yaml: train.lr must be > 0, got -1"); and the rules that span sections
    (:func:`check_geometry` at world size 1). Every problem is reported at once (one per section:
    a section stops at its first), so a user fixes a config in one round, not one key per try.
    ``earlier``: what loading found already (unknown keys, wrong types), listed first.
    """
    problems: list[str] = list(earlier)
    for dotted, value in flatten(to_dict(cfg)).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                allowed = "\n\t" if dotted in _MULTILINE_OK else ""
                bad = [c for c in text if (ord(c) < 32 or ord(c) == 127) and c not in allowed]
                if bad:
                    problems.append(f"'{dotted}' contains a control character ({bad[0]!r}); not allowed in config values")
                    break
    if not cfg.run_dir.strip():  # else the run's files land in the current directory, unasked
        problems.append("run_dir must not be empty (give the run's directory; '.' if you mean the current one)")
    failed = validate_sections(cfg, "", problems)
    problems.extend(ray_job_problems(cfg) if "ray." not in failed else [])
    problems.extend(geometry_problems(cfg, world_size=1, check_block="model." not in failed))
    if len(problems) == 1:
        raise ConfigError(f"{where}: {problems[0]}")
    if problems:
        raise ConfigError(f"{where}: {len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems))


def ray_job_problems(cfg: PipelineConfig) -> list[str]:
    """The ``ray`` section's SLURM names and time reach the data job's ``#SBATCH`` lines: the same
    rules as ``slurm.*`` (checked here because dataprep/, which owns the section, does not import slurm/)."""
    from slurm import validation

    r = cfg.ray
    try:
        validation.check_name("partition", r.partition, allow_list=True)
        validation.check_name("account", r.account)
        validation.check_name("qos", r.qos)
        validation.time_minutes("time", r.time)
    except ValueError as e:
        return [f"ray.{e}"]
    return []


def geometry_problems(cfg: PipelineConfig, world_size: int, check_block: bool = True) -> list[str]:
    """The batch shape rules that need no hardware, for a training of ``world_size`` ranks.

    ``train.batch_tokens`` must split into whole micro-batches on every rank (the trainer's
    ``grad_accum = batch_tokens / (micro_batch_size * seq_len * world_size)``), and a sequence must
    fit the model's context (``train.seq_len <= block_size``, the preset's unless ``model.block_size``
    is set). At load the world size is not known (a local run has ``train.nproc_per_node`` ranks, a
    SLURM job ``slurm.nodes`` x its GPUs per node), so :func:`validate` checks world size 1, which
    every launch needs; the commands that know how training runs call this with
    :func:`training_world_size`.
    """
    tc = cfg.train
    out = []
    block = cfg.model.resolved_shape()["block_size"] if check_block else 0
    if block > 0 and tc.seq_len > block:
        out.append(f"train.seq_len ({tc.seq_len}) exceeds the model's block_size ({block}, model.name '{cfg.model.name}')")
    per_step = tc.micro_batch_size * tc.seq_len * world_size
    if per_step > 0 and tc.batch_tokens > 0 and tc.batch_tokens % per_step:  # < 1: train.validate says so
        example = max(1, round(tc.batch_tokens / per_step)) * per_step
        out.append(f"train.batch_tokens ({tc.batch_tokens}) must be a positive multiple of micro_batch_size * seq_len * world_size "
                   f"({tc.micro_batch_size} * {tc.seq_len} * {world_size} = {per_step}); e.g. {example}"
                   + _same_batch_hint(tc.batch_tokens, tc.micro_batch_size, tc.seq_len, world_size))
    return out


def _same_batch_hint(batch_tokens: int, micro: int, seq_len: int, world_size: int) -> str:
    """The largest ``train.micro_batch_size`` below ``micro`` that splits ``batch_tokens`` over
    ``world_size`` ranks, as advice: unlike another ``batch_tokens`` (with ``max_steps`` unchanged,
    a run of other length and another recipe), it trains the same math with more accumulation."""
    for m in range(min(micro - 1, batch_tokens // max(1, seq_len * world_size)), 0, -1):
        if batch_tokens % (m * seq_len * world_size) == 0:
            return f", or keep the batch (and the recipe) with train.micro_batch_size={m}"
    return ""


def training_world_size(cfg: PipelineConfig, on_slurm: bool, nnodes: int = 1) -> int:
    """How many ranks the training will have: ``nnodes`` x ``train.nproc_per_node`` when
    ``pretrain train``/``pretrain run`` starts torchrun here, and for a SLURM job (``submit``,
    ``sbatch``, ``run --executor slurm``) ``slurm.nodes`` x one rank per GPU it asks for
    (``slurm.gpus_per_node``; a CPU job, or one asking for no GPU, keeps ``train.nproc_per_node``:
    see ``pipelines.launching.train_argv``)."""
    if on_slurm:
        gpus = cfg.slurm.gpus_per_node if cfg.train.device != "cpu" else 0
        return cfg.slurm.nodes * (gpus or cfg.train.nproc_per_node)
    return max(1, nnodes) * cfg.train.nproc_per_node


def check_geometry(cfg: PipelineConfig, on_slurm: bool, nnodes: int = 1) -> None:
    """ConfigError (exit 2) if the batch does not split over the ranks the training will have."""
    world = training_world_size(cfg, on_slurm, nnodes)
    problems = geometry_problems(cfg, world)
    if problems:
        how = "slurm.nodes x slurm.gpus_per_node" if on_slurm else "nnodes x train.nproc_per_node"
        raise ConfigError(f"{cfg.source}: " + "; ".join(problems) + f" (world size {world} = {how})")


def dump_yaml(cfg: PipelineConfig) -> str:
    """The resolved config as YAML that ``load_config`` reads back to the same config
    (``pretrain config show``; also what a run stores)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
