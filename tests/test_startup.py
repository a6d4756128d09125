"""common.startup: entry points import with the cyclic collector paused and resume it for their work.

Each case runs in a fresh interpreter: the collector's state is process-wide, and freezing pytest's
own objects would change every later test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python(*lines: str) -> subprocess.CompletedProcess:
    """``lines`` in a fresh interpreter, with ``gc`` and the two functions imported."""
    code = "\n".join(["import gc", "from common.startup import pause_collector, resume_collector", *lines])
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_paused_for_the_imports_then_collecting_again_with_the_set_up_frozen():
    r = python("pause_collector(); assert not gc.isenabled()",
               "import json, email.parser",  # objects of a set-up, kept for the process's life
               "resume_collector(); assert gc.isenabled() and gc.get_freeze_count() > 1000, gc.get_freeze_count()",
               "class Node: pass",
               "a, b = Node(), Node(); a.other, b.other = b, a; del a, b",  # a cycle made while working ...
               "assert gc.collect() >= 2")  # ... is collected again
    assert r.returncode == 0, r.stderr


def test_a_library_caller_is_left_alone():
    # resume without a pause (a worker run in-process, a bench) freezes nothing; a collector that
    # somebody else turned off stays off
    r = python("resume_collector(); assert gc.isenabled() and gc.get_freeze_count() == 0",
               "gc.disable(); pause_collector(); resume_collector()",
               "assert not gc.isenabled() and gc.get_freeze_count() == 0")
    assert r.returncode == 0, r.stderr


def test_a_normal_exit_after_a_frozen_torch_set_up_prints_no_leak_report():
    # torch._dynamo imports Triton, whose nanobind bindings report at exit every object of theirs
    # still alive: frozen ones were, until the exit handed them back (a crash's traceback must not
    # end in a screen of "nanobind: leaked ...")
    r = python("pause_collector()", "import torch, torch._dynamo", "resume_collector()", "raise SystemExit(3)")
    assert r.returncode == 3, r.stderr
    assert "leaked" not in r.stderr, r.stderr[-2000:]
