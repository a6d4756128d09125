"""Rules for every value that ends up in a SLURM batch script or on an `sbatch`/`srun` line.

Why this exists: an ``#SBATCH`` line is a shell comment, so a newline inside a value ends the
comment and the rest of the value runs as a command when the job starts. Quoting alone cannot
fix that (a quoted newline is still a newline), and ``sbatch`` reads ``#SBATCH`` lines with its
own word splitting, not the shell's. So values are checked first (this module, called when the
config loads) and quoted for the reader that will see them (:func:`sbatch_quote` for ``#SBATCH``
lines, :func:`shlex.quote` for shell lines).

SLURM documents no character set for partition, account and QOS names (slurm.conf only ends a
name at whitespace or ``#``); sites name them with letters, digits, ``_``, ``-`` and ``.``. We
accept exactly those, so such a value can never carry quotes, ``$``, ``;``, ``#`` or spaces. Every checker raises ``ValueError`` whose
message starts with the key relative to its config section (the loader prefixes the section).
"""

from __future__ import annotations

import re

# A SLURM entity name: letters, digits, "_", "-", "." (not starting with "-": it would read as an option).
NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*")
# One node feature in a --constraint expression, optionally with a node count ("intel*4").
_FEATURE = r"[A-Za-z0-9_.][A-Za-z0-9_.-]*(?:\*[0-9]+)?"
_CONSTRAINT_TOKEN = re.compile(rf"{_FEATURE}|[&|,()\[\]]|\*[0-9]+")
# An sbatch long option name as `sbatch --help` spells them (lower case, digits, dashes).
OPTION_KEY = re.compile(r"[a-z][a-z0-9-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Values sbatch reads verbatim without quotes (no space, quote, backslash or "#").
_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
# SLURM time formats: "MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS".
_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


def check_no_control(key: str, value: str) -> None:
    """Refuse control characters (newline, tab, escape, NUL...): they end script lines."""
    m = _CONTROL.search(value)
    if m:
        raise ValueError(f"{key} contains a control character ({m.group()!r}); not allowed in a SLURM value")


def check_name(key: str, value: str, allow_list: bool = False) -> None:
    """An optional SLURM name (partition, account, QOS); ``allow_list``: a comma-separated list
    (sbatch lets a job name several partitions and runs in the first that has room)."""
    if value == "":
        return
    check_no_control(key, value)
    names = value.split(",") if allow_list else [value]
    for name in names:
        if not NAME.fullmatch(name):
            allowed = "letters, digits, '_', '-' and '.'" + (" (several separated by ',')" if allow_list else "")
            raise ValueError(f"{key} must be a SLURM name made of {allowed}, got {value!r}")


def check_constraint(key: str, value: str) -> None:
    """A node-feature expression as ``sbatch --constraint`` takes it: features (with optional
    ``*count``) joined by ``&`` (and), ``|`` (or), ``,``, grouped with ``(...)`` and ``[...]``
    (matching or). Anything else (spaces, quotes, ``$``, ``;``, ``#``) is refused."""
    if value == "":
        return
    check_no_control(key, value)
    pos, depth = 0, []
    closing = {")": "(", "]": "["}
    while pos < len(value):
        m = _CONSTRAINT_TOKEN.match(value, pos)
        if not m:
            raise ValueError(f"{key}: {value!r} is not a SLURM feature expression (unexpected {value[pos]!r} at position {pos})")
        token = m.group()
        if token in ("(", "["):
            depth.append(token)
        elif token in (")", "]") and (not depth or depth.pop() != closing[token]):
            raise ValueError(f"{key}: {value!r} has an unbalanced {token!r}")
        pos = m.end()
    if depth:
        raise ValueError(f"{key}: {value!r} has an unclosed {depth[-1]!r}")


def time_minutes(key: str, value: str) -> int:
    """A SLURM time ("MM", "MM:SS", "HH:MM:SS", "D-HH[:MM[:SS]]") in whole minutes, rounded up."""
    m = _TIME.fullmatch(value.strip())
    if not m:
        raise ValueError(f"{key} must be a SLURM time such as 24:00:00, 2-00:00:00 or 90 (minutes), got {value!r}")
    days, a, b, c = (int(x) if x else 0 for x in m.groups())
    if m.group(1):  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + b * 60 + c
    elif m.group(4):  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif m.group(3):  # MM:SS
        seconds = a * 60 + b
    else:  # MM
        seconds = a * 60
    if seconds == 0:
        # sbatch reads 0 as "no limit", which we would write as 1 minute; ask for a real limit
        raise ValueError(f"{key} must be a time limit above 0 (SLURM reads 0 as unlimited; give the partition's "
                         f"limit, e.g. 2-00:00:00), got {value!r}")
    return -(-seconds // 60)


def port_range(key: str, value: str) -> tuple[int, int]:
    """A TCP port range "LOW-HIGH" (or one port) of unprivileged ports: 1024 <= LOW <= HIGH <= 65535."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(value))
    if not m:
        raise ValueError(f"{key} must be a port range such as 20000-29999, got {value!r}")
    low, high = int(m.group(1)), int(m.group(2) or m.group(1))
    if not 1024 <= low <= high <= 65535:
        raise ValueError(f"{key} must be LOW-HIGH with 1024 <= LOW <= HIGH <= 65535 (unprivileged ports), got {value!r}")
    return low, high


def check_at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{key} must be >= {minimum}, got {value}")


def parse_extra(key: str, items: list[str]) -> dict[str, str | None]:
    """``slurm.extra`` items → ``{option: value}`` (``None`` for a flag such as ``--exclusive``).

    Each item is exactly one long sbatch option, ``--key=value`` or ``--flag``, optionally
    written as a whole ``#SBATCH --key=value`` line. The value may contain spaces (it is quoted
    when written out) but no control character, no backslash (sbatch reads it as an escape, and
    submitit's quoting would lose it) and no second option ("--a=1 --b=2": one per item)."""
    out: dict[str, str | None] = {}
    for i, raw in enumerate(items):
        where = f"{key}[{i}]"
        check_no_control(where, raw)
        line = raw.strip()
        if line.startswith("#SBATCH"):
            line = line[len("#SBATCH"):].strip()
        if not line.startswith("--"):
            raise ValueError(f"{where} must be one long sbatch option (--name=value or --flag), got {raw!r}")
        name, sep, value = line[2:].partition("=")
        if not OPTION_KEY.fullmatch(name):
            raise ValueError(f"{where}: {name!r} is not an sbatch option name (lower-case letters, digits, '-'), in {raw!r}")
        if sep:
            if "\\" in value:
                raise ValueError(f"{where}: backslashes are not allowed in sbatch option values, got {raw!r}")
            if re.search(r"(^|\s)-", value):
                raise ValueError(f"{where} must hold a single option; put each option in its own item, got {raw!r}")
        out[name] = value if sep else None
    return out


def job_name(text: str, limit: int = 100) -> str:
    """``text`` made safe as a SLURM job name (and a log file name through ``%x``): every
    character outside letters, digits, ``_ . -`` becomes ``_``."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:limit].lstrip("-")
    return name or "job"


def sbatch_quote(value: str) -> str:
    """Quote ``value`` for an ``#SBATCH`` line, as sbatch's own parser reads them: inside double
    quotes a backslash escapes the next character (quote or backslash) and ``#`` is literal.
    (POSIX single quotes are not what sbatch reads: it would drop the backslashes in them.)"""
    check_no_control("an #SBATCH value", value)
    if _PLAIN.fullmatch(value):
        return value  # nothing sbatch would split or unescape: keep the script readable
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_slurm_path(key: str, path: str) -> None:
    """A path used in ``--output``/``--error``/``--chdir`` or submitit's log folder: SLURM expands
    ``%`` patterns in it and a backslash turns all expansion off, so neither may appear."""
    check_no_control(key, path)
    bad = sorted({c for c in path if c in "%\\"})
    if bad:
        raise ValueError(f"{key} {path!r} contains {' and '.join(repr(c) for c in bad)}, which SLURM reads as a file name pattern")
