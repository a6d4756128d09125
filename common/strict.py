"""The strict loader behind every config section: YAML/plain data → dataclasses, refusing mistakes.

Strictness is the point: a typo such as ``train.lr_min`` must fail before a multi-node job is
queued, not be ignored silently, so every unknown key and every value of the wrong type is a
:class:`ConfigError` naming the key and where it came from (a YAML file, a checkpoint's stored
config, or the command line). Sections are plain dataclasses owned by their stage
(``trainer.config.TrainConfig``, ``evals.config.EvalConfig``, ...); a section may define
``validate(self)`` raising ``ValueError("<key> <problem>")`` for rules that need no hardware.

This module knows no section: ``pipelines.config`` composes the whole run config from them, and
a stage reads its own sections of a resolved config with :func:`from_dict`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported to the user as-is (exit code 2)."""


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` less two YAML 1.1 surprises, and refusing duplicate keys.

    Plain scalars that YAML 1.1 reads as base-60 (``time: 24:00:00`` → 86400, which became
    86400 minutes in ``#SBATCH --time``) or octal numbers (``0123`` → 83) stay strings as
    written: a string key keeps its text, and an integer key refuses them. A key given twice
    in one mapping (a second ``train:`` section replaced the first whole) is an error."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: later keys override it
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:  # unhashable: the base class says so
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r} (the later one would silently replace the first)", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_NUMBER_RE = {  # YAML 1.1's int and float patterns without the base-60 and leading-0 octal forms
    "tag:yaml.org,2002:int": re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    "tag:yaml.org,2002:float": re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?"
                                          r"|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
}
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, _NUMBER_RE.get(tag, regexp)) for tag, regexp in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: ``{}``); an unreadable, non-UTF-8 or
    non-mapping file is a :class:`ConfigError` naming it, so every command refuses it with exit 2."""
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{where}: cannot read config file: {e.strerror or e}") from e
    except UnicodeDecodeError as e:  # a UTF-16 export or stray bytes: the user's file to fix, not a crash
        raise ConfigError(f"{where}: not UTF-8 text (byte {e.start}: {e.reason}); save the config as UTF-8") from e
    try:
        raw = _load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def from_dict(cls: type, raw: Any, prefix: str, where: str) -> Any:
    """A section (dataclass ``cls``) from plain data, strictly, and checked with its ``validate()``.

    ``prefix`` is the section's dotted name with a trailing dot (``"eval."``), used in messages."""
    obj = cls()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.')}' is a section and needs a mapping, got {raw!r}")
    merge(obj, raw, prefix, where)
    problems = section_problems(obj, prefix)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return obj


def apply_overrides(obj: Any, overrides: list[str] | tuple[str, ...], prefix: str = "",
                    problems: list[str] | None = None) -> None:
    """Apply ``key=value`` command-line overrides to ``obj``; with a ``prefix`` (a section such as
    ``"eval."``), every key must start with it, since the other sections are not read here.
    With ``problems``, a bad override is appended there and the others still applied; without,
    the first raises."""
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        try:
            if not sep or not key:
                raise ConfigError(f"command line: override '{item}' is not of the form section.key=value")
            if prefix and not key.startswith(prefix):
                raise ConfigError(f"command line override '{item}': only {prefix}* keys apply here")
            set_dotted(obj, key[len(prefix):], value, where=f"command line override '{item}'", prefix=prefix)
        except ConfigError as e:
            if problems is None:
                raise
            problems.append(str(e))


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (what is logged to MLflow and stored in checkpoints)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("internal"):
            continue
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, list) else v)
    return out


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


def section_problems(obj: Any, prefix: str = "") -> list[str]:
    """What ``validate()`` of ``obj`` and of its nested sections say (one message per section)."""
    problems: list[str] = []
    validate_sections(obj, prefix, problems)
    return problems


def validate_sections(obj: Any, prefix: str, problems: list[str]) -> set[str]:
    """Run every section's ``validate()``; append its message (key made absolute) to ``problems``
    and return the prefixes of the sections that failed."""
    failed: set[str] = set()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            failed |= validate_sections(value, f"{prefix}{f.name}.", problems)
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as e:
            problems.append(f"{prefix}{e}")
            failed.add(prefix)
    return failed


def _public_fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj) if not f.metadata.get("internal")}


def merge(obj: Any, raw: dict, prefix: str, where: str, problems: list[str] | None = None) -> None:
    """Set ``obj``'s fields from ``raw`` (recursing into sections); unknown keys and wrong types are errors.

    With ``problems``, each error is appended there (its text without ``where``) and the other keys
    are still merged, so a config's every mistake is reported in one round; without, they raise
    together at the end."""
    found: list[str] = [] if problems is None else problems
    fields = _public_fields(obj)
    hints = typing.get_type_hints(type(obj))
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            found.append(f"unknown key '{dotted}' (known keys here: {', '.join(sorted(fields))})")
            continue
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if isinstance(value, dict):
                merge(current, value, dotted + ".", where, found)
            else:
                found.append(f"'{dotted}' is a section and needs a mapping, got {value!r}")
            continue
        try:
            setattr(obj, key, _coerce(value, hints[key], dotted, where))
        except ConfigError as e:
            found.append(str(e).removeprefix(f"{where}: "))
    if problems is None and found:
        raise ConfigError(f"{where}: " + "; ".join(found))


def set_dotted(cfg: Any, dotted: str, text: str, where: str, prefix: str = "") -> None:
    """Set ``section.key`` (relative to ``cfg``; ``prefix`` only names it in messages) from command-line text."""
    parts = dotted.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        fields = _public_fields(obj)
        if part not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{where}: unknown key '{prefix}{'.'.join(parts[: i + 1])}' (known keys here: {known})")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                raise ConfigError(f"{where}: '{prefix}{dotted}' is a section; set one of its keys instead")
            hint = typing.get_type_hints(type(obj))[part]
            setattr(obj, part, _coerce(_parse_cli_value(text, hint), hint, prefix + dotted, where))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"{where}: '{prefix}{'.'.join(parts[: i + 1])}' is not a section")


def _parse_cli_value(text: str, hint: Any) -> Any:
    """Command-line values are YAML scalars/lists, except that string fields take the text verbatim."""
    if hint is str:
        return text
    try:
        return _load_yaml(text) if text != "" else ""
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
