"""Process-group setup: one code path for torchrun workers and for a plain single process.

Under torchrun (env RANK/WORLD_SIZE/LOCAL_RANK) the default process group is NCCL on CUDA and
gloo on CPU; a plain ``python -m trainer.train`` runs as world size 1 without a process group,
and the collective helpers below become no-ops, so the loop has no ``if distributed`` branches.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from trainer import under_torchrun


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def uses_cuda(device_pref: str) -> bool:
    """Whether `train.device` (auto|cpu|cuda) means CUDA on this machine (NCCL across ranks)."""
    if device_pref not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got '{device_pref}'")
    return torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"


def init_distributed(device_pref: str) -> DistEnv:
    """Pick the device (`train.device`: auto|cpu|cuda) and join the process group if under torchrun."""
    use_cuda = uses_cuda(device_pref)
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available")
    if not under_torchrun():
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return DistEnv(0, 0, 1, device, None)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if use_cuda and local_rank >= torch.cuda.device_count():  # else "invalid device ordinal", exit 1: "retry"
        raise ValueError(f"local rank {local_rank} has no GPU: train.nproc_per_node is one rank per GPU and this node has "
                         f"{torch.cuda.device_count()} visible CUDA device(s); set train.nproc_per_node to at most that")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=30)}
    if use_cuda:
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    return DistEnv(rank, local_rank, world, device, backend)


def all_reduce_sum(env: DistEnv, t: torch.Tensor) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(env: DistEnv, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (one tiny all-reduce)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(env: DistEnv, obj: Any) -> Any:
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(env: DistEnv, obj: Any) -> list[Any]:
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
