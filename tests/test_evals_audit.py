"""Audit of the eval stage: rows, data files and checkpoints that used to fail the wrong way."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from evals import data, hellaswag
from evals.config import EvalConfig
from evals.job import EvalJobError, evaluate_checkpoint, plan_problems
from evals.results import checkpoint_id, read_result
from tests.evals_helpers import hellaswag_rows, write_jsonl
from trainer.checkpoint import MARKER, write_checkpoint
from trainer.model import GPT, GPTConfig
from trainer.runlock import RunLock

EOT = 50256
SHAPE = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)


@pytest.fixture(scope="module")
def enc(gpt2_ranks):
    from dataprep.tokenizer import get_gpt2

    return get_gpt2(gpt2_ranks)


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(SHAPE).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20)  # spread the log-probabilities: no near-ties between endings
    return m


def _checkpoint(run_dir: Path, seed: int, hellaswag_path: Path) -> Path:
    """A committed checkpoint whose stored config evaluates ``hellaswag_path`` on CPU, untracked."""
    state = _model(seed).state_dict()
    cfg = {"eval": {"hellaswag_path": str(hellaswag_path), "device": "cpu", "tracking_uri": "none", "batch_size": 4}}
    meta = {"step": 2, "model": {**SHAPE.__dict__}, "config": cfg, "tokens_seen": 64, "data_fingerprint": "test"}
    return write_checkpoint(run_dir, 2, state, {"state": {}}, {"step": 2}, meta)


def _logprob(model: GPT, context: list[int], cont: list[int]) -> float:
    toks = context + cont
    with torch.no_grad():
        logits, _ = model(torch.tensor(toks[:-1])[None])
    logp = F.log_softmax(logits[0, :, :50257].float(), -1)
    return float(logp[torch.arange(len(toks) - 1), torch.tensor(toks[1:])][-len(cont):].sum())


# ---------------------------------------------------------------- an empty context


@pytest.mark.parametrize("style", hellaswag.STYLES)
def test_a_row_with_an_empty_context_is_scored_after_the_eot_token(enc, style):
    """A row whose context is empty passed validation, then failed the whole eval with a
    ValueError (exit 1, retried by the watcher, failing alike each time). lm-eval scores an empty
    context after the EOT token; so do we, and the endings' first tokens are scored."""
    rows = hellaswag_rows(3, seed=11)
    rows[1].update(ctx="", ctx_a="", ctx_b="", activity_label="")
    rows = [data._normalise(r, f"row {i}") for i, r in enumerate(rows)]
    model = _model()
    out = hellaswag.evaluate(model, enc, rows, batch_size=2, style=style)
    assert out["n"] == 3
    group = hellaswag.tokenize(enc, rows[1], style)
    if style == "nanogpt":
        assert group.context == (EOT,)
    from evals.scoring import score_groups

    scores = score_groups(model, [group])[0]
    for cont, s in zip(group.continuations, scores):
        assert s.n_tokens == len(cont)
        assert s.logprob == pytest.approx(_logprob(model, list(group.context), list(cont)), abs=1e-4)


# ---------------------------------------------------------------- a data file of the wrong kind


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    import datasets

    rows = [data._normalise(r, "row") for r in hellaswag_rows(4, seed=2)]
    txt = tmp_path / "hellaswag_val.txt"
    write_jsonl(txt, hellaswag_rows(4))  # rows, but a kind the reader does not take
    garbage = tmp_path / "hellaswag.arrow"
    garbage.write_bytes(b"this is not an arrow stream\n" * 4)
    no_validation = tmp_path / "train-only"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(no_validation))
    return {"txt": txt, "arrow": garbage, "no-validation": no_validation}


def test_a_hellaswag_path_of_the_wrong_kind_is_refused_not_retried(tmp_path):
    """A `.txt` path, a file that is no Arrow stream, a dataset without a validation split: no rerun
    reads them, the config must change. They raised EvalDataError / ArrowInvalid / KeyError, which
    an eval job reports as a failure (exit 1) that the watcher retries; now BadEvalData (exit 2)."""
    files = _bad_files(tmp_path)
    for name, path in files.items():
        with pytest.raises(data.BadEvalData, match=str(path)):
            data.read_hellaswag_file(path)
    # lm-eval's hellaswag reads the same setting
    with pytest.raises(data.BadEvalData):
        data.harness_include_dir(["hellaswag"], data_source="local", hellaswag_path=str(files["txt"]), into=tmp_path / "tasks")
    # and `pretrain run` says so before it prepares data and trains
    problems = plan_problems(EvalConfig(hellaswag_path=str(files["txt"])))
    assert any("expected a .jsonl file" in p for p in problems), problems


def test_an_eval_job_on_such_a_file_is_refused(tmp_path, gpt2_ranks):
    files = _bad_files(tmp_path)
    ckpt = _checkpoint(tmp_path / "run", seed=0, hellaswag_path=files["txt"])
    for path in files.values():
        cfg = EvalConfig(hellaswag_path=str(path), device="cpu", tracking_uri="none")
        with pytest.raises(EvalJobError) as e:
            evaluate_checkpoint(ckpt, cfg, log=lambda m: None)
        assert e.value.refused, (path, str(e.value))


# ---------------------------------------------------------------- the wait for a checkpoint's eval lock


def _eval_behind_a_held_lock(ckpt: Path, cfg: EvalConfig, meanwhile) -> dict:
    """Run ``evaluate_checkpoint`` while another holder has the checkpoint's eval lock; call
    ``meanwhile()`` once the eval waits, then release. Returns its summary (or raises its error)."""
    lock = RunLock(ckpt.parent.parent, f"eval-{ckpt.name}", log=lambda m: None).acquire()
    waiting = threading.Event()
    box: dict = {}

    def log(message: str) -> None:
        if "waiting up to" in message:
            waiting.set()

    def body() -> None:
        try:
            box["out"] = evaluate_checkpoint(ckpt, cfg, log=log)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=body)
    t.start()
    try:
        assert waiting.wait(60), "the eval never waited for the lock"
        meanwhile()
    finally:
        lock.release()
    t.join(120)
    assert not t.is_alive()
    if "error" in box:
        raise box["error"]
    return box["out"]


def test_a_checkpoint_deleted_while_its_eval_waits_for_the_lock_is_skipped(tmp_path, gpt2_ranks):
    """A second eval of a checkpoint waits (up to hours) for the first; retention may delete the
    checkpoint meanwhile. The eval then died on a FileNotFoundError (its marker), a traceback and
    exit 1, instead of being skipped as a checkpoint already gone at the start is."""
    rows = write_jsonl(tmp_path / "hellaswag_val.jsonl", hellaswag_rows(6, seed=1))
    ckpt = _checkpoint(tmp_path / "run", seed=0, hellaswag_path=rows)
    cfg = EvalConfig(hellaswag_path=str(rows), device="cpu", tracking_uri="none")

    def retention() -> None:
        (ckpt / MARKER).unlink()  # what retention does: un-commit, then delete
        shutil.rmtree(ckpt)

    out = _eval_behind_a_held_lock(ckpt, cfg, retention)
    assert out["status"] == "skipped" and not ckpt.exists()


def test_a_checkpoint_rewritten_while_its_eval_waits_is_scored_as_it_is_now(tmp_path, gpt2_ranks):
    """Deleted and written again with other weights (a resumed run re-writes the step) while the eval
    waited: the result names the weights it scored (a guard for the re-check after the wait, which
    re-verifies such a checkpoint before loading it unchecked)."""
    rows = write_jsonl(tmp_path / "hellaswag_val.jsonl", hellaswag_rows(6, seed=1))
    run = tmp_path / "run"
    ckpt = _checkpoint(run, seed=0, hellaswag_path=rows)
    cfg = EvalConfig(hellaswag_path=str(rows), device="cpu", tracking_uri="none")

    def rewrite() -> None:
        (ckpt / MARKER).unlink()
        shutil.rmtree(ckpt)
        _checkpoint(run, seed=5, hellaswag_path=rows)

    out = _eval_behind_a_held_lock(ckpt, cfg, rewrite)
    assert out["status"] == "done"
    result = read_result(ckpt, "hellaswag")
    assert result is not None and result["checkpoint_id"] == checkpoint_id(ckpt)


def test_a_checkpoint_deleted_while_its_weights_are_loaded_is_skipped(tmp_path, gpt2_ranks, monkeypatch):
    """Retention between the eval's checks and its reading of the weights: that was a refusal
    (CheckpointError "not a committed checkpoint": `pretrain eval` exit 2, a job marked refused)."""
    import trainer.checkpoint as checkpoint

    rows = write_jsonl(tmp_path / "hellaswag_val.jsonl", hellaswag_rows(6, seed=1))
    ckpt = _checkpoint(tmp_path / "run", seed=0, hellaswag_path=rows)
    load = checkpoint.load_model_for_eval

    def load_as_retention_strikes(path, *args, **kwargs):
        (ckpt / MARKER).unlink()
        shutil.rmtree(ckpt)
        return load(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_model_for_eval", load_as_retention_strikes)
    cfg = EvalConfig(hellaswag_path=str(rows), device="cpu", tracking_uri="none")
    out = evaluate_checkpoint(ckpt, cfg, log=lambda m: None)
    assert out["status"] == "skipped" and not ckpt.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA (this one has a GPU)")
def test_an_eval_on_a_cuda_device_this_machine_lacks_is_refused(tmp_path, gpt2_ranks):
    """`eval.device=cuda` where there is no GPU (an eval job submitted without GPUs): torch's
    AssertionError deep in the model load was a failure (exit 1) that the watcher retried; it is
    the config's fault, refused (exit 2) naming the key, with nothing written."""
    rows = tmp_path / "rows.jsonl"
    write_jsonl(rows, hellaswag_rows(4, seed=3))
    ckpt = _checkpoint(tmp_path / "run", seed=0, hellaswag_path=rows)
    for device in ("cuda", "cuda:1"):
        cfg = EvalConfig(hellaswag_path=str(rows), device=device, tracking_uri="none")
        with pytest.raises(EvalJobError, match=f"eval.device={device}") as e:
            evaluate_checkpoint(ckpt, cfg, log=lambda m: None)
        assert e.value.refused
    assert not (ckpt / "evals").exists() or not any((ckpt / "evals").iterdir())
