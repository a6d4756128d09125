"""End to end: a real tiny training logging to a real MLflow server, then eval jobs per checkpoint.

The watcher runs as a user runs it (`pretrain evals watch RUN_DIR --once`, submitit local
executor); results must land next to each checkpoint and in the training's MLflow run at the
checkpoint's step, exactly once, and broken checkpoints must fail without touching anything else.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from common.scratch import owner_prefix
from evals.config import EvalConfig
from evals.results import archive_path, read_result, result_path
from evals.watch import Watcher, training_finished
from tests.evals_helpers import hellaswag_rows, mlflow_server, run_cli, train_tiny_run, write_jsonl
from tests.signal_helpers import run_signalled
from tests.trainer_helpers import dead_pid
from trainer.checkpoint import MARKER, MODEL_FILE, list_committed, read_meta, verify

pytestmark = pytest.mark.slow

STEPS = ["step_00000002", "step_00000004"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="module")
def run(tmp_path_factory, server, gpt2_ranks):
    work = tmp_path_factory.mktemp("evals")
    hs = write_jsonl(work / "hellaswag_val.jsonl", hellaswag_rows(24, seed=11))
    run_dir, config = train_tiny_run(work, hs, server)
    assert [c.name for c in list_committed(run_dir)] == STEPS
    return run_dir


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every eval result file (not the watcher's state, nor its job logs and status files)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*.json"))
        if "evals" in p.parts and "jobs" not in p.parts and p.name != "watch.json"
    }


def _copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("jobs", ".locks"))
    return dest


def _mid_training(run: Path, tmp_path: Path, poll_s: float) -> tuple[Path, Path, Path, EvalConfig]:
    """A copy of the run with no eval results, as training leaves it before its final checkpoint:
    (copy, where the final checkpoint goes, where it waits meanwhile, a polling eval config)."""
    copy = _copy_run(run, tmp_path / "run")
    for name in STEPS:
        shutil.rmtree(copy / "checkpoints" / name / "evals", ignore_errors=True)
    shutil.rmtree(copy / "evals", ignore_errors=True)
    final = copy / "checkpoints" / STEPS[1]
    aside = tmp_path / STEPS[1]
    final.rename(aside)  # training has committed step 2 only
    hs = read_meta(copy / "checkpoints" / STEPS[0])["config"]["eval"]["hellaswag_path"]
    return copy, final, aside, EvalConfig(hellaswag_path=hs, device="cpu", poll_s=poll_s, tracking_uri="none", max_parallel=1)


def test_watcher_evaluates_each_checkpoint_exactly_once_into_the_training_mlflow_run(run, server, tmp_path):
    from mlflow.tracking import MlflowClient

    assert training_finished(run)  # final checkpoint at train.max_steps
    log = tmp_path / "watch.log"
    rc, out = run_cli("evals", "watch", str(run), "--once", log=log)
    assert rc == 0, out
    assert out.index("submitted step_00000004") < out.index("submitted step_00000002"), "eval.order newest first"
    first = _snapshot(run)

    rc, out = run_cli("evals", "watch", str(run), "--once", log=log)
    assert rc == 0, out
    assert "submitted" not in out, f"second watcher run re-evaluated something:\n{out}"
    assert _snapshot(run) == first, "results files must not be rewritten"
    assert len(list((run / "evals" / "jobs").glob("*_submitted.pkl"))) == 2

    state = json.loads((run / "evals" / "watch.json").read_text())["checkpoints"]
    assert {k: (v["status"], v["attempts"]) for k, v in state.items()} == {s: ("done", 1) for s in STEPS}

    run_id = read_meta(list_committed(run)[-1])["mlflow_run_id"]
    client = MlflowClient(tracking_uri=server)
    for name in STEPS:
        ckpt = run / "checkpoints" / name
        verify(ckpt)  # an evals/ subdirectory does not break the commit marker
        res = read_result(ckpt, "hellaswag")
        assert res["logged"] is True and res["n"] == 24 and res["mlflow"]["run_id"] == run_id
        assert res["source"].startswith("file:") and res["elapsed_s"] > 0
        assert json.loads(archive_path(run, res["step"], "hellaswag").read_text()) == res
    for metric in ("acc", "acc_norm", "acc_stderr"):
        history = client.get_metric_history(run_id, f"eval/hellaswag/{metric}")
        assert sorted(m.step for m in history) == [2, 4], f"{metric}: each checkpoint's step exactly once"
        if metric != "acc_stderr":
            for m in history:
                res = read_result(run / "checkpoints" / f"step_{m.step:08d}", "hellaswag")
                assert m.value == pytest.approx(res["metrics"][metric])
    assert {m.step for m in client.get_metric_history(run_id, "loss")} == {1, 2, 3, 4}, "same run as the loss curve"
    assert client.get_run(run_id).info.status == "FINISHED"

    # by hand: an lm-eval task on the newest checkpoint (offline: the run's local HellaSwag rows).
    # Its task dir (in the temp dir) is removed after it, and so is one an eval job killed with
    # SIGKILL left: they used to pile up in /tmp
    tmp = tmp_path / "tmp"
    killed = tmp / f"{owner_prefix('pretrain-lm-eval-tasks-')}{dead_pid()}-abcd1234"
    killed.mkdir(parents=True)
    (killed / "hellaswag.yaml").write_text("task: hellaswag\n")
    rc, out = run_cli("eval", "--tasks", "hellaswag,lm_eval/hellaswag", str(run / "checkpoints" / STEPS[1]), log=log,
                      env={"TMPDIR": str(tmp)})
    assert rc == 0, out
    assert not list(tmp.glob("pretrain-lm-eval-tasks-*")), list(tmp.iterdir())
    assert "already evaluated" not in out and "hellaswag: acc" in out
    res = read_result(run / "checkpoints" / STEPS[1], "lm_eval/hellaswag")
    assert res["n"] == 24 and res["logged"] is True and res["source"].startswith("file:")
    assert {m.step for m in client.get_metric_history(run_id, "eval/lm_eval/hellaswag/acc")} == {4}
    assert len(client.get_metric_history(run_id, "eval/hellaswag/acc")) == 2, "ours was complete: not re-run"


def test_corrupt_or_uncommitted_checkpoint_fails_cleanly(run, tmp_path):
    copy = _copy_run(run, tmp_path / "run")
    good, bad = copy / "checkpoints" / STEPS[0], copy / "checkpoints" / STEPS[1]
    shutil.rmtree(bad / "evals", ignore_errors=True)
    blob = bytearray((bad / MODEL_FILE).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / MODEL_FILE).write_bytes(bytes(blob))
    (good / MARKER).unlink()  # an uncommitted checkpoint: refused before anything is read
    before = _snapshot(copy)
    log = tmp_path / "eval.log"

    rc, out = run_cli("eval", str(good), log=log)
    assert rc == 2 and "not a committed checkpoint" in out, out
    assert _snapshot(copy) == before

    rc, out = run_cli("eval", str(bad), "--limit", "5", log=log)
    assert rc == 2 and "model.pt is corrupt" in out, out  # refused: a rerun cannot fix it
    assert not (bad / "evals").exists() and _snapshot(copy) == before

    # the watcher passes over the uncommitted one and does not retry the corrupt one (it retries
    # what may pass later): reported, exit 2
    rc, out = run_cli("evals", "watch", "--once", str(copy), "eval.max_retries=1", log=log)
    assert rc == 2, out
    assert out.count("submitted step_00000004") == 1 and "submitted step_00000002" not in out
    assert "FAILED: step_00000004" in out
    entry = json.loads((copy / "evals" / "watch.json").read_text())["checkpoints"][STEPS[1]]
    assert entry["status"] == "failed" and entry["attempts"] == 1 and entry["refused"] and "corrupt" in entry["errors"][-1]
    assert not (bad / "evals").exists() and _snapshot(copy) == before


def test_checkpoint_deleted_while_queued_is_skipped(run, tmp_path):
    copy = _copy_run(run, tmp_path / "run")
    for name in STEPS:
        shutil.rmtree(copy / "checkpoints" / name / "evals", ignore_errors=True)
    shutil.rmtree(copy / "evals", ignore_errors=True)
    # a job that fails fast and logs nothing (missing data file), one at a time, oldest first
    cfg = EvalConfig(hellaswag_path=str(tmp_path / "missing.jsonl"), device="cpu", order="oldest", max_parallel=1, max_retries=0)
    messages: list[str] = []
    first = Watcher(copy, cfg, executor="local", log=messages.append)
    first.scan()
    assert list(first.jobs) == [STEPS[0]] and first.entries[STEPS[1]].status == "new"  # queued behind step 2
    # a restarted watcher follows the running job instead of submitting a twin
    w = Watcher(copy, cfg, executor="local", log=messages.append)
    w.scan()
    assert list(w.jobs) == [STEPS[0]] and any("following step_00000002" in m for m in messages), messages
    ckpt = copy / "checkpoints" / STEPS[1]
    (ckpt / MARKER).unlink()  # what retention does: un-commit, then delete
    shutil.rmtree(ckpt)
    deadline = time.time() + 120
    while w.pending() and time.time() < deadline:
        time.sleep(0.5)
        w.scan()
    assert len(list((copy / "evals" / "jobs").glob("*_submitted.pkl"))) == 1
    assert w.entries[STEPS[1]].status == "skipped"
    assert any("step_00000004 was deleted" in m for m in messages), messages
    assert w.entries[STEPS[0]].status == "failed" and "missing.jsonl" in w.entries[STEPS[0]].errors[-1]
    assert not ckpt.exists(), "the watcher must never re-create a deleted checkpoint"
    assert not result_path(copy / "checkpoints" / STEPS[0], "hellaswag").exists()


def test_polling_watcher_follows_training_until_the_final_checkpoint(run, tmp_path):
    """Without --once: evaluate checkpoints as they are committed, exit once training is over."""
    import threading

    copy, final, aside, cfg = _mid_training(run, tmp_path, poll_s=0.5)
    messages: list[str] = []
    w = Watcher(copy, cfg, executor="local", log=messages.append)
    assert not training_finished(copy)
    outcome: dict[str, int] = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("rc", w.run()), daemon=True)
    thread.start()
    first = result_path(copy / "checkpoints" / STEPS[0], "hellaswag")
    deadline = time.time() + 90
    while not (first.exists() and read_result(first.parent.parent, "hellaswag")["logged"] == "disabled"):
        assert time.time() < deadline, messages
        time.sleep(0.3)
    time.sleep(1.5)  # a few polls with nothing to do: still watching, training is not over
    assert thread.is_alive() and "rc" not in outcome, messages
    aside.rename(final)  # the trainer commits its final checkpoint (step == train.max_steps)
    thread.join(timeout=90)
    assert outcome.get("rc") == 0, messages
    assert read_result(final, "hellaswag")["logged"] == "disabled"
    assert {k: e.status for k, e in w.entries.items()} == {s: "done" for s in STEPS}


def test_a_final_checkpoint_committed_just_after_a_scan_is_still_evaluated(run, tmp_path):
    """The trainer may commit its final checkpoint between the watcher's listing and its "is
    training over?" check; the watcher must not take that as "over, nothing left" and exit."""
    copy, final, aside, cfg = _mid_training(run, tmp_path, poll_s=0.2)

    class CommitAfterListing(Watcher):
        def scan(self, only=None):
            seen = super().scan(only)
            first_done = self.entries.get(STEPS[0]) is not None and self.entries[STEPS[0]].status == "done"
            if first_done and aside.exists():
                aside.rename(final)  # committed right after this scan listed the checkpoints
            return seen

    messages: list[str] = []
    w = CommitAfterListing(copy, cfg, executor="local", log=messages.append)
    assert w.run() == 0, messages
    assert read_result(final, "hellaswag") is not None, messages
    assert {k: e.status for k, e in w.entries.items()} == {s: "done" for s in STEPS}


def test_unreachable_tracking_keeps_the_result_and_a_retry_only_logs_it(run, tmp_path, monkeypatch):
    from evals.job import EvalJobError, config_from_checkpoint, evaluate_checkpoint
    from tests.evals_helpers import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    copy = _copy_run(run, tmp_path / "run")
    ckpt = copy / "checkpoints" / STEPS[0]
    shutil.rmtree(ckpt / "evals")
    cfg = config_from_checkpoint(read_meta(ckpt), [f"eval.tracking_uri=http://127.0.0.1:{free_port()}"])
    messages: list[str] = []
    with pytest.raises(EvalJobError, match="MLflow logging to http://127.0.0.1"):
        evaluate_checkpoint(ckpt, cfg, log=messages.append)
    res = read_result(ckpt, "hellaswag")
    assert res["logged"] is False and res["n"] == 24 and set(res["metrics"]) == {"acc", "acc_norm"}

    messages.clear()
    cfg.tracking_uri = "none"
    evaluate_checkpoint(ckpt, cfg, log=messages.append)
    assert not any("computed in" in m for m in messages), f"a logging retry must not recompute: {messages}"
    again = read_result(ckpt, "hellaswag")
    assert again["logged"] == "disabled" and again["metrics"] == res["metrics"] and again["time"] == res["time"]


def test_watcher_never_unpickles_a_planted_result_and_one_watcher_per_run_dir(run, tmp_path):
    """A run dir is writable by others: a result pickle planted where submitit keeps its results,
    with watch.json pointing at it, must not run (the watcher reads only JSON); and a second
    watcher of the same run dir is refused with exit 2, naming the holder."""
    import os
    import pickle

    from trainer.runlock import RunLock

    copy = _copy_run(run, tmp_path / "run")
    for name in STEPS:
        shutil.rmtree(copy / "checkpoints" / name / "evals", ignore_errors=True)
    shutil.rmtree(copy / "evals", ignore_errors=True)
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    jobs = copy / "evals" / "jobs"
    jobs.mkdir(parents=True)
    planted_id = "999999"  # no such process: the job looks finished, its "result" is the planted file
    (jobs / f"{planted_id}_0_result.pkl").write_bytes(pickle.dumps(("success", Payload())))
    cid = json.loads((copy / "checkpoints" / STEPS[0] / MARKER).read_text())["files"][MODEL_FILE]
    state = {"checkpoints": {STEPS[0]: {"step": 2, "ckpt_id": cid, "status": "running", "attempts": 1, "job_id": planted_id}}}
    (copy / "evals" / "watch.json").write_text(json.dumps(state))
    log = tmp_path / "watch.log"
    overrides = ["eval.tracking_uri=none", "eval.max_parallel=1"]

    with RunLock(copy, "evals-watch"):  # a watcher that is running already (this test process)
        rc, out = run_cli("evals", "watch", str(copy), "--once", *overrides, log=log)
    assert rc == 2, out
    assert f"pid {os.getpid()}" in out and "in use (evals-watch)" in out, out
    assert json.loads((copy / "evals" / "watch.json").read_text()) == state, "a refused watcher changes nothing"

    rc, out = run_cli("evals", "watch", str(copy), "--once", *overrides, log=log)
    assert not marker.exists(), "the watcher unpickled a file from the run dir"
    assert rc == 0, out
    assert f"following {STEPS[0]}'s job {planted_id}" in out and "without complete results" in out, out
    entries = json.loads((copy / "evals" / "watch.json").read_text())["checkpoints"]
    assert {k: v["status"] for k, v in entries.items()} == {s: "done" for s in STEPS}
    for name in STEPS:
        assert read_result(copy / "checkpoints" / name, "hellaswag")["logged"] == "disabled"


def test_two_evals_of_one_checkpoint_log_once(run, server, tmp_path):
    """`pretrain eval` twice at once on one checkpoint: the second waits for the first, then finds
    its results complete and logs nothing: every MLflow point exactly once."""
    from mlflow.tracking import MlflowClient

    from tests.trainer_helpers import kill_tree, pretrain_cmd, start
    from trainer.runlock import RunLock

    copy = _copy_run(run, tmp_path / "run")
    ckpt = copy / "checkpoints" / STEPS[0]
    shutil.rmtree(ckpt / "evals")
    shutil.rmtree(copy / "evals")
    run_id = read_meta(ckpt)["mlflow_run_id"]
    client = MlflowClient(tracking_uri=server)
    before = [m.step for m in client.get_metric_history(run_id, "eval/hellaswag/acc")]

    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    holder = RunLock(copy, f"eval-{STEPS[0]}").acquire()  # line both up behind a lock we hold
    procs = [start(pretrain_cmd("eval", str(ckpt)), log) for log in logs]
    try:
        deadline = time.time() + 120
        while True:
            texts = [log.read_text(errors="replace") if log.exists() else "" for log in logs]
            if all("held by" in t for t in texts):
                break  # both wait for the lock
            assert time.time() < deadline and all(p.poll() is None for p in procs), texts
            time.sleep(0.3)
        holder.release()
        rcs = [p.wait(timeout=240) for p in procs]
    finally:
        holder.release()
        for p in procs:
            kill_tree(p)
    outs = [log.read_text(errors="replace") for log in logs]
    assert rcs == [0, 0], outs
    assert sum("computed in" in o for o in outs) == 1, outs
    assert sum("already evaluated and logged" in o for o in outs) == 1, outs
    # the copy shares the original's MLflow run, which has this checkpoint's value at step 2 already
    # (same weights, same rows): a value the run has at that step is never logged again
    assert 2 in before
    after = [m.step for m in client.get_metric_history(run_id, "eval/hellaswag/acc")]
    assert sorted(after) == sorted(before), f"step 2 logged {after.count(2) - before.count(2)} more times"


def test_eval_logs_into_the_run_created_after_the_checkpoint(tmp_path):
    """A checkpoint written while MLflow was unreachable carries no run id; the run the trainer created
    later is in RUN_DIR/mlflow_run.json, and eval results must go there rather than nowhere."""
    import json

    from evals.results import tracking_target

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    meta = {"step": 4, "mlflow_run_id": None, "config": {"tracking": {"uri": ""}}}
    # tracked, but no run yet: the target is the store, and logging waits until the run exists
    assert tracking_target(meta, ckpt) == (f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}", None)
    (tmp_path / "run" / "mlflow_run.json").write_text(json.dumps({"run_id": "abc123", "uri": "x"}))
    uri, run_id = tracking_target(meta, ckpt)
    assert run_id == "abc123" and uri == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    assert tracking_target({**meta, "mlflow_run_id": "own"}, ckpt)[1] == "own"  # the checkpoint's own id wins
    assert tracking_target(meta, ckpt, override="none") == (None, None)


def test_eval_by_hand_runs_where_submitit_is_not_installed(run, tmp_path):
    """`pretrain eval` submits nothing, so it must run on a machine without submitit (a bare GPU image
    with torch only): only the commands that build jobs import it."""
    copy = _copy_run(run, tmp_path / "run")
    ckpt = copy / "checkpoints" / STEPS[1]
    shutil.rmtree(ckpt / "evals", ignore_errors=True)
    blocker = tmp_path / "no_submitit" / "submitit"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('submitit is not installed (blocked by the test)')\n")
    env = {"PYTHONPATH": str(blocker.parent)}
    log = tmp_path / "eval.log"
    rc, out = run_cli("eval", str(ckpt), "eval.limit=6", "eval.tracking_uri=none", log=log, env=env)
    assert rc == 0 and "hellaswag: acc" in out, out
    assert read_result(ckpt, "hellaswag")["n"] == 6
    rc, out = run_cli("evals", "watch", str(copy), "--once", log=log, env=env)  # this one builds jobs: it needs submitit
    assert rc == 2 and "needs submitit, which cannot be imported here" in out and "Traceback" not in out, (rc, out)


def _fresh_copy(run: Path, dest: Path) -> Path:
    """A copy of the module's run with no eval results and no watcher state."""
    copy = _copy_run(run, dest)
    for name in STEPS:
        shutil.rmtree(copy / "checkpoints" / name / "evals", ignore_errors=True)
    shutil.rmtree(copy / "evals", ignore_errors=True)
    return copy


def test_bad_eval_data_is_refused_naming_the_row_and_the_rerun_after_the_fix_evaluates(run, tmp_path):
    """A malformed HellaSwag row is the data's fault: exit 2 naming file and line, no retries; a
    watcher that gave up is not stuck: rerun after the fix, it tries again."""
    copy = _fresh_copy(run, tmp_path / "run")
    good = Path(read_meta(copy / "checkpoints" / STEPS[0])["config"]["eval"]["hellaswag_path"])
    lines = good.read_text().splitlines(keepends=True)
    bad_row = json.loads(lines[3])
    del bad_row["label"]
    data = tmp_path / "hs.jsonl"
    data.write_text("".join(lines[:3]) + json.dumps(bad_row) + "\n" + "".join(lines[4:]))
    args = [f"eval.hellaswag_path={data}", "eval.tracking_uri=none", "eval.max_retries=2"]
    log = tmp_path / "eval.log"

    rc, out = run_cli("eval", str(copy / "checkpoints" / STEPS[0]), *args, log=log)
    assert rc == 2 and f"{data}:4: not a HellaSwag row: no field 'label'" in out and "Traceback" not in out, out
    rc, out = run_cli("evals", "watch", "--once", str(copy), *args, log=log)
    assert rc == 2, out
    assert out.count("submitted step_00000002") == 1 and "refused: fix what it names" in out, "a refusal is not retried"

    data.write_text(good.read_text())  # the fix
    rc, out = run_cli("evals", "watch", "--once", str(copy), *args, log=log)
    assert rc == 0 and "failed in an earlier run" in out and "trying again" in out, out
    for name in STEPS:
        assert read_result(copy / "checkpoints" / name, "hellaswag")["n"] == 24


def test_an_interrupted_watcher_leaves_its_checkpoints_to_the_next_run_without_counting_the_attempt(run, tmp_path):
    """Ctrl-C (or a stop signal, which the workflow turns into the same interruption) right after a
    job was submitted: with no retries allowed, the next run must still evaluate that checkpoint."""
    copy = _fresh_copy(run, tmp_path / "run")
    hs = read_meta(copy / "checkpoints" / STEPS[0])["config"]["eval"]["hellaswag_path"]
    cfg = EvalConfig(hellaswag_path=hs, device="cpu", max_retries=0, max_parallel=1, tracking_uri="none")
    messages: list[str] = []

    def interrupt_after_submitting(message: str) -> None:
        messages.append(message)
        if message.startswith("watch: submitted"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Watcher(copy, cfg, log=interrupt_after_submitting).run(once=True)
    state = json.loads((copy / "evals" / "watch.json").read_text())["checkpoints"]
    interrupted = next(name for name, e in state.items() if e["job_id"] is None and e["status"] == "new")
    assert state[interrupted]["attempts"] == 0, state

    assert Watcher(copy, cfg, log=messages.append).run(once=True) == 0, messages
    for name in STEPS:
        assert read_result(copy / "checkpoints" / name, "hellaswag")["n"] == 24


def test_a_quick_check_replaces_nothing_and_changed_settings_re_evaluate(run, tmp_path):
    """`pretrain eval --limit N` is a look, not the checkpoint's result; a result computed under
    other eval settings (prompt style here) is not this config's result."""
    copy = _fresh_copy(run, tmp_path / "run")
    ckpt = copy / "checkpoints" / STEPS[1]
    log = tmp_path / "eval.log"
    rc, out = run_cli("eval", str(ckpt), "eval.tracking_uri=none", log=log)
    full = read_result(ckpt, "hellaswag")
    assert rc == 0 and full["n"] == 24 and full["settings"]["hellaswag_style"] == "nanogpt", out
    rc, out = run_cli("eval", str(copy / "checkpoints" / STEPS[0]), "eval.tracking_uri=none", log=log)
    before = _snapshot(copy)

    rc, out = run_cli("eval", str(ckpt), "--limit", "5", "eval.tracking_uri=none", log=log)
    assert rc == 0 and "quick check (5 rows; not the checkpoint's result, not logged)" in out, out
    check = json.loads((copy / "evals" / STEPS[1] / "checks" / "hellaswag.limit5.json").read_text())
    assert check["n"] == 5 and check["settings"]["limit"] == 5
    assert {k: v for k, v in _snapshot(copy).items() if "checks" not in k} == before, "the full result is untouched"
    rc, out = run_cli("evals", "watch", "--once", str(copy), "eval.tracking_uri=none", log=log)
    assert rc == 0 and "submitted" not in out, "the quick check did not make the full result incomplete"

    rc, out = run_cli("evals", "watch", "--once", str(copy), "eval.hellaswag_style=harness", "eval.tracking_uri=none", log=log)
    assert rc == 0 and out.count("submitted") == 2, out
    redone = read_result(ckpt, "hellaswag")
    assert redone["settings"]["hellaswag_style"] == "harness" and "harness style" in redone["evaluator"]


def test_a_checkpoint_pruned_while_the_watcher_reads_it_is_passed_over(run, tmp_path):
    """Retention un-commits (marker first) and deletes a step dir at any moment: between the
    watcher listing it and reading its metadata it is a directory without a marker."""
    copy = _copy_run(run, tmp_path / "run")
    listed = list_committed(copy)
    ckpt = copy / "checkpoints" / STEPS[1]
    assert ckpt in listed
    (ckpt / MARKER).unlink()  # after the listing: the watcher reads a checkpoint that is going away
    w = Watcher(copy, EvalConfig(device="cpu", tracking_uri="none"), log=lambda m: None)
    assert w._needs_eval(ckpt) is False
    assert training_finished(copy) is False  # the older checkpoint (step 2 of 4) decides


def test_a_logging_retry_after_a_crash_is_one_point_in_mlflow(run, server):
    """A job killed after MLflow took a result's metrics but before its file said so logs them
    again: with the result's own timestamp that is the same point, not a second one."""
    from mlflow.tracking import MlflowClient

    from evals.results import log_to_mlflow

    client = MlflowClient(tracking_uri=server)
    run_id = client.create_run(client.create_experiment(f"relog-{time.time_ns()}")).info.run_id
    when = time.time() - 60
    for _ in range(2):
        log_to_mlflow(server, run_id, 7, {"eval/hellaswag/acc": 0.25}, when=when)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/hellaswag/acc")] == [(7, 0.25)]


def _processes_naming(path: Path) -> list[str]:
    """Command lines of live processes that mention ``path`` (a submitit job names its folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and str(path) in cmdline:
            found.append(cmdline)
    return found


def test_a_stop_signal_stops_an_eval_job_by_hand_with_exit_3_and_its_lock_free(run, tmp_path):
    """`pretrain eval CKPT` is a job of its own (often an sbatch line): SIGTERM mid-scoring must
    end it with exit 3 ("requeue me") and free the checkpoint's eval lock, writing no result."""
    copy = _fresh_copy(run, tmp_path / "run")
    ckpt = copy / "checkpoints" / STEPS[0]
    r = run_signalled("evals.job:_ours_hellaswag", "before", "eval", str(ckpt), "eval.tracking_uri=none", twice=True)
    assert r.returncode == 3 and "pretrain eval: stopped by SIGTERM" in r.stderr, r.stdout + r.stderr
    assert read_result(ckpt, "hellaswag") is None
    assert (copy / ".locks" / f"eval-{ckpt.name}.lock").read_bytes() == b"", "a free lock names no one"


def test_a_stop_signal_stops_the_watcher_with_exit_3_cancelling_its_job_uncounted(run, tmp_path):
    """SIGTERM right after the watcher submitted a job, and a second one while it cancels that
    job: exit 3, the job cancelled and not counted as an attempt (no retries are allowed here), and
    the rerun evaluates every checkpoint."""
    copy = _fresh_copy(run, tmp_path / "run")
    args = ["evals", "watch", "--once", str(copy), "eval.tracking_uri=none", "eval.max_retries=0", "eval.max_parallel=1"]
    r = run_signalled("evals.watch:Watcher._submit", "after", *args, twice=True)
    assert r.returncode == 3 and "pretrain evals watch: stopped by SIGTERM" in r.stderr, r.stdout + r.stderr
    state = json.loads((copy / "evals" / "watch.json").read_text())["checkpoints"]
    assert {(e["status"], e["attempts"], e["job_id"]) for e in state.values()} == {("new", 0, None)}, state
    assert (copy / ".locks" / "evals-watch.lock").read_bytes() == b""
    assert _processes_naming(copy) == [], "the cancelled job must not outlive the watcher"
    rc, out = run_cli(*args, log=tmp_path / "rerun.log")
    assert rc == 0, out
    for name in STEPS:
        assert read_result(copy / "checkpoints" / name, "hellaswag")["n"] == 24
