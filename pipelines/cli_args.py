"""Argument types of the `pretrain` CLI: each refuses a value argparse would pass on (an empty run
dir, a node count of 0, a rendezvous endpoint torchrun cannot parse, a task list with no task) with
exit 2 and the option named, before any work starts, instead of a later traceback or a silent
default."""

from __future__ import annotations

import argparse
import re


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def rendezvous_endpoint(text: str) -> str:
    """HOST:PORT (``[IPv6]:PORT``), as torchrun's c10d rendezvous takes it; "" = none (one node)."""
    if text and not re.fullmatch(r"(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}", text):
        raise argparse.ArgumentTypeError(f"must be HOST:PORT (e.g. node01:29500), got {text!r}")
    return text


def task_list(text: str) -> str:
    """``--tasks a,b``: at least one task name, each as ``eval.harness_tasks`` takes them."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if not re.fullmatch(r"[\w.\-/]+", n)]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of task names (letters, digits, _ . - /), got {text!r}")
    return ",".join(names)


def run_dir_arg(text: str) -> str:
    if not text.strip():  # "" is the current directory to Path: never what was meant
        raise argparse.ArgumentTypeError("must not be empty (a run directory; '.' for the current one)")
    return text


def check_launch_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`pretrain train --nnodes N`: a multi-node launch needs the rendezvous endpoint (else a traceback)."""
    if getattr(args, "nnodes", 1) > 1 and not args.rdzv_endpoint:
        parser.error(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (the first node's address, the same on every node)")
