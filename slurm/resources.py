"""Checking a job's resources against the cluster before submitting, so mistakes fail at once
with a readable message instead of sitting in the queue as "PD (ReqNodeNotAvail)" forever."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from slurm import validation
from slurm.config import SlurmConfig


class SlurmError(RuntimeError):
    """A SLURM problem the user must fix (unknown partition, request that cannot fit, no sbatch)."""


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: int
    cpus_per_node: int
    gpus_per_node: int
    default: bool
    mem_mb: int = 0


def parse_time_minutes(value: str) -> int:
    """SLURM time formats ("MM", "MM:SS", "HH:MM:SS", "D-HH[:MM[:SS]]") → whole minutes (rounded up)."""
    try:
        return validation.time_minutes("slurm.time", value)
    except ValueError as e:
        raise SlurmError(str(e)) from e


def _gpus(gres: str) -> int:
    total = 0
    for item in gres.split(","):
        m = re.match(r"gpu(?::[^:(]+)?:(\d+)", item)
        if m:
            total += int(m.group(1))
    return total


def partitions() -> list[Partition]:
    if shutil.which("sinfo") is None:
        raise SlurmError("SLURM is not available here (no `sinfo` on PATH); use --executor local")
    out = subprocess.run(["sinfo", "-h", "-o", "%P|%D|%c|%G|%m"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SlurmError(f"sinfo failed: {out.stderr.strip()}")
    found: dict[str, Partition] = {}
    for line in out.stdout.splitlines():
        name, nodes, cpus, gres, mem = line.split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        prev = found.get(name)
        p = Partition(name, int(nodes), int(cpus.rstrip("+")), _gpus(gres), default, int(mem.rstrip("+")))
        if prev:  # several node groups in one partition
            p = Partition(name, prev.nodes + p.nodes, max(prev.cpus_per_node, p.cpus_per_node), max(prev.gpus_per_node, p.gpus_per_node),
                          default, max(prev.mem_mb, p.mem_mb))
        found[name] = p
    return list(found.values())


def check_fits(cfg: SlurmConfig, gpus_per_node: int) -> Partition:
    """The partition the job goes to, after checking that the request can ever run there.

    ``slurm.partition`` may name several ("a,b"; SLURM starts the job in whichever has room):
    each must exist, and the request must fit at least one of them."""
    parts = partitions()
    if cfg.partition:
        candidates = []
        for name in cfg.partition.split(","):
            match = [p for p in parts if p.name == name]
            if not match:
                raise SlurmError(f"slurm.partition: unknown partition '{name}' (this cluster has: {', '.join(p.name for p in parts)})")
            candidates.append(match[0])
    else:
        defaults = [p for p in parts if p.default]
        if not defaults:
            raise SlurmError("slurm.partition is empty and the cluster has no default partition")
        candidates = defaults[:1]
    parse_time_minutes(cfg.time)
    problems = [_misfit(cfg, gpus_per_node, part) for part in candidates]
    for part, problem in zip(candidates, problems):
        if problem is None:
            return part
    raise SlurmError(problems[0] if len(problems) == 1 else "; ".join(problems))


def _misfit(cfg: SlurmConfig, gpus_per_node: int, part: Partition) -> str | None:
    """Why the request can never run in `part`, or None if it can."""
    if cfg.nodes > part.nodes:
        return f"slurm.nodes={cfg.nodes} does not fit partition '{part.name}', which has {part.nodes} node(s)"
    if gpus_per_node > part.gpus_per_node:
        return f"slurm.gpus_per_node={gpus_per_node} does not fit partition '{part.name}', whose nodes have {part.gpus_per_node} GPU(s)"
    if cfg.cpus_per_task > part.cpus_per_node:
        return f"slurm.cpus_per_task={cfg.cpus_per_task} does not fit partition '{part.name}', whose nodes have {part.cpus_per_node} CPUs"
    if cfg.mem_gb and part.mem_mb and cfg.mem_gb * 1024 > part.mem_mb:
        return f"mem_gb={cfg.mem_gb} does not fit partition '{part.name}', whose nodes have {part.mem_mb} MB"
    return None


def extra_parameters(lines: list[str]) -> dict[str, str | bool]:
    """slurm.extra items ("#SBATCH --exclusive", "--reservation=x") → submitit's additional
    parameters ({"exclusive": True, "reservation": "x"}), each checked (see validation.parse_extra)."""
    try:
        parsed = validation.parse_extra("slurm.extra", lines)
    except ValueError as e:
        raise SlurmError(str(e)) from e
    return {key.replace("-", "_"): True if value is None else value for key, value in parsed.items()}
