"""The training math users compare with GPT-2 / nanoGPT / build-nanogpt runs, pinned by formulas.

One optimizer step (``trainer.step.TrainStep``) must be: the gradient of the mean loss over the
whole batch (``grad_accum`` micro-batches, each micro-loss divided by ``grad_accum``), clipped to
``train.grad_clip`` by the *global* norm, then AdamW (decoupled weight decay on >= 2-D tensors only)
at ``lr_at(step)``. The expected values are computed here from the formulas, not from the trainer's
or any reference's code. The recipe's numbers (GPT-3 small / build-nanogpt: 6e-4 peak, 715 warmup
steps, cosine to 10% at 19,073 steps, AdamW (0.9, 0.95), eps 1e-8, wd 0.1, clip 1.0, 0.5M-token
batches, seed 1337) are the defaults, and the schedule follows its formula at every step.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from trainer.config import ModelConfig, TrainConfig
from trainer.dist import DistEnv
from trainer.model import GPT, GPTConfig
from trainer.optim import build_optimizer, lr_at
from trainer.step import TrainStep

CPU = DistEnv(0, 0, 1, torch.device("cpu"), None)
B, T, ACC, VOCAB = 2, 32, 3, 1024


def _mean_loss_grads(model: GPT, x: torch.Tensor, y: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of the mean cross-entropy over every token of the whole batch, in one pass."""
    model.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _adamw_by_formula(params, grads, state, t, lr, tc: TrainConfig) -> None:
    """AdamW step ``t`` (1-based) in place: p *= 1 - lr*wd (>= 2-D only); m, v moments; bias-corrected update."""
    for name, p in params.items():
        g = grads[name]
        m, v = state.setdefault(name, (torch.zeros_like(p), torch.zeros_like(p)))
        m = tc.beta1 * m + (1 - tc.beta1) * g
        v = tc.beta2 * v + (1 - tc.beta2) * g * g
        state[name] = (m, v)
        m_hat, v_hat = m / (1 - tc.beta1**t), v / (1 - tc.beta2**t)
        wd = tc.weight_decay if p.dim() >= 2 else 0.0
        p.mul_(1 - lr * wd).sub_(lr * m_hat / (v_hat.sqrt() + tc.eps))


@pytest.mark.parametrize("chunk", [0, 16])
def test_a_step_is_the_clipped_adamw_step_of_the_whole_batch_mean_loss(chunk):
    # betas and weight decay are the recipe's; eps is raised from 1e-8 so that entries with a ~0 gradient
    # do not turn float rounding of the gradient (micro-batches vs one pass) into O(lr) differences of
    # the update, and grad_clip is lowered so that clipping binds on both steps
    tc = TrainConfig(device="cpu", dtype="float32", loss_chunk_tokens=chunk, micro_batch_size=B, seq_len=T,
                     batch_tokens=B * T * ACC, lr=1e-3, min_lr=1e-4, warmup_steps=2, max_steps=4, eps=1e-4, grad_clip=0.5)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=T, vocab_size=VOCAB)  # a small vocabulary keeps it fast
    torch.manual_seed(0)
    model = GPT(cfg).set_runtime(loss_chunk_tokens=chunk)
    expected = GPT(cfg)
    expected.load_state_dict(model.state_dict())
    step = TrainStep(model, model, build_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps, "cpu"), tc, CPU, ACC)
    gen = torch.Generator().manual_seed(1)
    params = dict(expected.named_parameters())
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for index in range(2):
        rows = torch.randint(0, VOCAB, (ACC * B, T + 1), generator=gen)
        micro = iter([(rows[i * B : (i + 1) * B, :-1], rows[i * B : (i + 1) * B, 1:]) for i in range(ACC)])
        result = step(index, lambda: next(micro))
        loss, grads = _mean_loss_grads(expected, rows[:, :-1], rows[:, 1:])
        norm = math.sqrt(sum((g.double() ** 2).sum().item() for g in grads.values()))
        assert norm > tc.grad_clip, "the test must exercise clipping"
        clipped = {n: g * (tc.grad_clip / norm) for n, g in grads.items()}
        lr = tc.lr * (index + 1) / tc.warmup_steps  # both steps are warm-up steps
        with torch.no_grad():
            _adamw_by_formula(params, clipped, moments, index + 1, lr, tc)
        assert not result.skipped and result.lr == pytest.approx(lr, rel=1e-12)
        # (torch computes the norm in fp32: ~1e-5 relative off the float64 one here)
        assert result.loss == pytest.approx(loss, rel=1e-6) and result.grad_norm == pytest.approx(norm, rel=1e-4)
        for name, p in model.named_parameters():
            want = clipped[name]
            torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-5 * want.abs().max().item(), msg=name)
            torch.testing.assert_close(p.detach(), params[name].detach(), rtol=0, atol=lr * 1e-3, msg=name)


def test_defaults_are_the_gpt2_124m_recipe_and_the_schedule_follows_its_formula_at_every_step():
    tc, model = TrainConfig(), ModelConfig()
    assert (tc.lr, tc.min_lr, tc.warmup_steps, tc.max_steps) == (6e-4, 6e-5, 715, 19_073)
    assert (tc.beta1, tc.beta2, tc.eps, tc.weight_decay, tc.grad_clip) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    assert (tc.batch_tokens, tc.seq_len, tc.seed) == (524_288, 1024, 1337)
    assert (model.name, model.vocab_size, model.dropout, model.bias) == ("gpt2", 50304, 0.0, True)
    lr, low, warm, total = tc.lr, tc.min_lr, tc.warmup_steps, tc.max_steps
    for s in range(total + 100):
        if s < warm:
            want = lr * (s + 1) / warm  # linear from lr/warmup at step 0 to lr at step warmup - 1
        elif s <= total:
            want = low + 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))) * (lr - low)
        else:
            want = low
        assert lr_at(s, lr, low, warm, total) == pytest.approx(want, rel=1e-12, abs=1e-18), s


def test_init_is_gpt2s():
    """N(0, 0.02) for every matrix and embedding, 0.02/sqrt(2*n_layer) for the two residual projections
    of each block, zero biases, unit LayerNorm gains, lm_head tied to wte."""
    cfg = GPTConfig(n_layer=3, n_head=2, n_embd=96, block_size=64)
    torch.manual_seed(3)
    m = GPT(cfg)
    assert m.lm_head.weight is m.transformer.wte.weight
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, mod in m.named_modules():
        if isinstance(mod, nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0), name
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            std = resid if name.endswith("c_proj") else 0.02
            w = mod.weight.detach().double()
            assert w.std().item() == pytest.approx(std, rel=0.06), name
            assert abs(w.mean().item()) < 4 * std / math.sqrt(w.numel()), name
            assert getattr(mod, "bias", None) is None or torch.all(mod.bias == 0), name
