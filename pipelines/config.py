"""Typed run configuration: YAML sections → dataclasses, with `section.key=value` overrides.

Every stage owns the dataclass of its own section (``dataprep.config``, ``trainer.config``, ...);
this module only composes them and does the strict loading. Strictness is the point: a typo such
as ``train.lr_min`` must fail before a multi-node job is queued, not be ignored silently, so every
unknown key and every value of the wrong type is an error that names the key and where it came
from (the YAML file or the command line).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from dataprep.config import DataConfig, RayConfig
from evals.config import EvalConfig
from slurm.config import SlurmConfig
from trainer.config import ModelConfig, TrainConfig


class ConfigError(ValueError):
    """A configuration problem, reported to the user as-is (exit code 2)."""


@dataclass
class TrackingConfig:
    """Experiment tracking (MLflow)."""

    # Empty: a local sqlite store next to the run dir (RUN_DIR/../mlflow.db).
    uri: str = ""
    experiment: str = "pretrain"


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
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{where}: cannot read config file: {e.strerror or e}") from e
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not valid YAML: {e}") from e
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: the top level must be a mapping of sections, got {type(raw).__name__}")
        _merge(cfg, raw, prefix="", where=where)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"command line: override '{item}' is not of the form section.key=value")
        _set_dotted(cfg, key.strip(), value, where=f"command line override '{item}'")
    cfg.source = where
    validate(cfg, where if not overrides else f"{where} with overrides {list(overrides)}")
    return cfg


# Characters that may appear in a string value: control characters end a line of a generated
# script (a newline in an ``#SBATCH`` comment runs the rest as a command) or corrupt logs.
_MULTILINE_OK = {"train.sample_prompt"}


def validate(cfg: PipelineConfig, where: str) -> None:
    """Checks that need no hardware, run on every load so that `sbatch`, `submit` and `run` refuse a
    bad config before anything is written or queued.

    Three kinds: no control characters in any string value (anywhere); each section's own rules,
    from its ``validate()`` method (a section raises ``ValueError("lr must be > 0, got -1")``, the
    message starting with its key relative to the section; this prefixes the section and the
    config's origin: "smoke.yaml: train.lr must be > 0, got -1"); and the rules that span sections
    (:func:`check_geometry` at world size 1). Every problem is reported at once (one per section:
    a section stops at its first), so a user fixes a config in one round, not one key per try.
    """
    problems: list[str] = []
    for dotted, value in flatten(to_dict(cfg)).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                allowed = "\n\t" if dotted in _MULTILINE_OK else ""
                bad = [c for c in text if (ord(c) < 32 or ord(c) == 127) and c not in allowed]
                if bad:
                    problems.append(f"'{dotted}' contains a control character ({bad[0]!r}); not allowed in config values")
                    break
    failed = _validate_sections(cfg, "", problems)
    problems.extend(geometry_problems(cfg, world_size=1, check_block="model." not in failed))
    if len(problems) == 1:
        raise ConfigError(f"{where}: {problems[0]}")
    if problems:
        raise ConfigError(f"{where}: {len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems))


def _validate_sections(obj: Any, prefix: str, problems: list[str]) -> set[str]:
    """Run every section's ``validate()``; append its message (key made absolute) to ``problems``
    and return the prefixes of the sections that failed."""
    failed: set[str] = set()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            failed |= _validate_sections(value, f"{prefix}{f.name}.", problems)
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as e:
            problems.append(f"{prefix}{e}")
            failed.add(prefix)
    return failed


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
                   f"({tc.micro_batch_size} * {tc.seq_len} * {world_size} = {per_step}); e.g. {example}")
    return out


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


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (what is logged to MLflow and stored in checkpoints)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("internal"):
            continue
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, list) else v)
    return out


def dump_yaml(cfg: PipelineConfig) -> str:
    """The resolved config as YAML that ``load_config`` reads back to the same config
    (``pretrain config show``; also what a run stores)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` → ``{"train.lr": 1}`` (for MLflow params and for diffs)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


# --------------------------------------------------------------------------------------------
# strict merging


def _public_fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj) if not f.metadata.get("internal")}


def _merge(obj: Any, raw: dict, prefix: str, where: str) -> None:
    fields = _public_fields(obj)
    hints = typing.get_type_hints(type(obj))
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{where}: unknown key '{dotted}' (known keys here: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{dotted}' is a section and needs a mapping, got {value!r}")
            _merge(current, value, dotted + ".", where)
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted, where))


def _set_dotted(cfg: Any, dotted: str, text: str, where: str) -> None:
    parts = dotted.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        fields = _public_fields(obj)
        if part not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{where}: unknown key '{'.'.join(parts[: i + 1])}' (known keys here: {known})")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                raise ConfigError(f"{where}: '{dotted}' is a section; set one of its keys instead")
            hint = typing.get_type_hints(type(obj))[part]
            setattr(obj, part, _coerce(_parse_cli_value(text, hint), hint, dotted, where))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"{where}: '{'.'.join(parts[: i + 1])}' is not a section")


def _parse_cli_value(text: str, hint: Any) -> Any:
    """Command-line values are YAML scalars/lists, except that string fields take the text verbatim."""
    if hint is str:
        return text
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _coerce(value: Any, hint: Any, dotted: str, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, dotted, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value for '{dotted}'")
    if origin is list:
        (item_type,) = typing.get_args(hint) or (Any,)
        if isinstance(value, str) and item_type is str:
            # "a,b,c" on the command line is a list too.
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{dotted}' must be a list, got {value!r}")
        return [_coerce(v, item_type, f"{dotted}[{i}]", where) for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: '{dotted}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: '{dotted}' must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "6e-4" as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: '{dotted}' must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: '{dotted}' must be a string, got {value!r}")
    raise ConfigError(f"{where}: '{dotted}' has an unsupported type {hint!r}")
