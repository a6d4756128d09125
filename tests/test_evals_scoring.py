"""Unit tests of the eval scoring core: packed rows and masks must equal plain forward passes."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from evals import hellaswag
from evals.scoring import Group, fit_to_window, masked_forward, score_groups
from tests.evals_helpers import hellaswag_rows
from trainer.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32)).eval()
    # a few larger weights so that log-probabilities differ clearly between continuations
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    return m


def naive_logprob(model: GPT, context: list[int], cont: list[int]) -> float:
    """One sequence per forward, full logits: the definition the packed scorer must match."""
    toks = (context + cont)[-(model.config.block_size + 1) :]
    logits, _ = model(torch.tensor(toks[:-1])[None])
    logp = F.log_softmax(logits[0, :, :50257].float(), -1)
    n = min(len(cont), len(toks) - 1)
    targets = torch.tensor(toks[1:])
    return float(logp[torch.arange(len(toks) - 1), targets][-n:].sum())


def random_groups(n: int, seed: int = 1) -> list[Group]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ctx = tuple(rng.randrange(50257) for _ in range(rng.randint(1, 30)))  # up to 30 of 32: truncation
        conts = tuple(tuple(rng.randrange(50257) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 4)))
        out.append(Group(ctx, conts))
    return out


def test_masked_forward_equals_model_forward(model):
    x = torch.randint(0, 50257, (3, 20))
    with torch.no_grad():
        ref, _ = model(x)
        pos = torch.arange(20).expand(3, 20)
        mask = torch.ones(20, 20, dtype=torch.bool).tril().expand(3, 20, 20)
        hidden, _ = masked_forward(model, x, pos, mask)
        assert torch.allclose(model.lm_head(hidden), ref, atol=1e-5)


def test_packed_batched_scores_equal_plain_forward(model):
    groups = random_groups(24)
    batched = score_groups(model, groups, batch_size=7)
    single = score_groups(model, groups, batch_size=1)
    with torch.no_grad():
        for g, b, s in zip(groups, batched, single):
            assert len(b) == len(g.continuations)
            for cont, sb, ss in zip(g.continuations, b, s):
                want = naive_logprob(model, list(g.context), list(cont))
                assert sb.logprob == pytest.approx(want, abs=1e-4)
                assert ss.logprob == pytest.approx(want, abs=1e-4)
                assert sb.n_tokens == len(cont) == ss.n_tokens
                assert sb.greedy == ss.greedy


def test_window_split_keeps_continuations_and_truncates_context_left():
    g = Group(tuple(range(30)), ((100,) * 5, (200,)))
    pieces = fit_to_window(g, block_size=32)
    assert [p.continuations for p in pieces] == [((100,) * 5,), ((200,),)]
    assert pieces[0].context == tuple(range(2, 30)) and pieces[1].context == tuple(range(30))
    assert fit_to_window(Group((1, 2), ((3,), (4, 5))), 32) == [Group((1, 2), ((3,), (4, 5)))]


def test_hellaswag_batched_and_one_at_a_time_agree(model, gpt2_ranks):
    from dataprep.tokenizer import get_gpt2

    enc = get_gpt2(gpt2_ranks)
    rows = hellaswag_rows(20, seed=3)
    for style in hellaswag.STYLES:
        batched = hellaswag.evaluate(model, enc, rows, batch_size=16, style=style)
        one = hellaswag.evaluate(model, enc, rows, batch_size=1, style=style)
        assert batched["predictions"] == one["predictions"]
        assert batched["metrics"] == one["metrics"] and batched["n"] == 20
        # and both agree with build-nanogpt's one-example-per-forward loop
        with torch.no_grad():
            ref = [hellaswag.score_example_unbatched(model, hellaswag.tokenize(enc, r, style), "cpu") for r in rows]
        ref_acc = [max(range(4), key=lambda j: s[j][0]) for s in ref]
        ref_norm = [max(range(4), key=lambda j: s[j][0] / s[j][1]) for s in ref]
        assert batched["predictions"] == {"acc": ref_acc, "acc_norm": ref_norm}
    # the synthetic rows must exercise truncation (contexts longer than block_size 32)
    assert max(len(hellaswag.tokenize(enc, r).context) for r in rows) > 32


def test_generate_until_matches_model_generate(model, gpt2_ranks):
    """Left-padded batched decoding with a KV cache = GPT.generate(greedy) prompt by prompt."""
    from dataprep.tokenizer import get_gpt2
    from evals.harness import PretrainGPTLM

    lm = PretrainGPTLM(model=model, tokenizer=get_gpt2(gpt2_ranks), device="cpu", batch_size=8)
    rng = random.Random(5)
    prompts = [[rng.randrange(50000) for _ in range(rng.randint(1, 20))] for _ in range(6)]
    got = lm._generate(prompts, max_new=8, until=[], temperature=0.0)
    for p, text in zip(prompts, got):
        with torch.no_grad():
            want = model.generate(torch.tensor([p]), 8, greedy=True)[0, len(p) :].tolist()
        if 50256 in want:
            want = want[: want.index(50256)]
        assert text == lm.tok_decode(want)


def test_bf16_scoring_picks_the_fp32_endings(model):
    """The bf16 path (autocast; the LM head cast once per batch) scores like fp32 to bf16 rounding."""
    groups = [g for g in random_groups(40, seed=5) if len(g.continuations) > 1]
    fp32 = score_groups(model, groups, batch_size=8, dtype="float32")
    bf16 = score_groups(model, groups, batch_size=8, dtype="bfloat16")
    pick = lambda scores: [max(range(len(s)), key=lambda j: s[j].logprob) for s in scores]  # noqa: E731
    same = sum(a == b for a, b in zip(pick(fp32), pick(bf16))) / len(groups)
    assert same >= 0.9, f"bf16 picks the fp32 ending on only {same:.0%} of {len(groups)} rows"
    for rf, rb in zip(fp32, bf16):
        for f, b in zip(rf, rb):
            assert b.n_tokens == f.n_tokens and b.logprob == pytest.approx(f.logprob, rel=0.02)
