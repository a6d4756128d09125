"""FP8 block linears (trainer.fp8, ``train.fp8``): the scaled FP8 matmul computes exactly the
product of the FP8-rounded operands, gradients included; the model keeps its parameters and
checkpoint names; a short training run learns like the fp32 one; the trainer refuses a device
without FP8 and a resume compares the setting. (Speed is a GPU matter: bench/device_run.sh.)"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from trainer.config import RESUME_RUNTIME_KEYS, TrainConfig
from trainer.fp8 import E4M3, E5M2, Float8Linear, convert_to_fp8, fp8_problem, to_float8
from trainer.model import GPT, PRESETS, GPTConfig


def _dequant(x: torch.Tensor, fmt: torch.dtype) -> torch.Tensor:
    x8, inv = to_float8(x, fmt)
    return x8.float() * inv


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_to_float8_uses_the_whole_range_and_round_trips_within_fp8_precision():
    x = torch.randn(64, 48) * 3e-3  # small values: without scaling most would underflow e4m3
    x8, inv = to_float8(x, E4M3)
    assert x8.dtype == E4M3
    assert x8.float().abs().max().item() == torch.finfo(E4M3).max  # the largest lands on 448
    assert _rel(x8.float() * inv, x) < 0.05  # 3 mantissa bits
    zeros8, zinv = to_float8(torch.zeros(16, 16), E5M2)
    assert torch.isfinite(zinv) and (zeros8.float() == 0).all()


def test_fp8_linear_is_the_exact_product_of_the_fp8_rounded_operands():
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=gen) * 0.05)
        lin.bias.copy_(torch.randn(48, generator=gen))
    x = torch.randn(3, 16, 64, generator=gen).requires_grad_()
    upstream = torch.randn(3, 16, 48, generator=gen)
    fp8 = copy.deepcopy(lin)
    assert convert_to_fp8(fp8) == 1
    y = fp8(x)
    y.backward(upstream)

    # reference in fp32 from the dequantised FP8 operands: forward e4m3 x e4m3, backward e5m2 gradient
    xq, wq = _dequant(x.detach().reshape(48, 64), E4M3), _dequant(lin.weight.detach(), E4M3)
    want_y = xq @ wq.t() + lin.bias.detach()
    gq = _dequant(upstream.reshape(48, 48), E5M2)
    torch.testing.assert_close(y.detach().reshape(48, 48), want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.reshape(48, 64), gq @ wq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fp8.weight.grad, gq.t() @ xq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fp8.bias.grad, upstream.reshape(48, 48).sum(0), rtol=1e-5, atol=1e-5)

    # ... and it really is FP8: close to the fp32 layer, not equal to it
    exact = lin(x.detach())
    assert 1e-3 < _rel(y, exact) < 0.1


def test_fp8_linear_falls_back_to_plain_linear_where_fp8_cannot_or_should_not_run():
    lin = Float8Linear(32, 32)
    x = torch.randn(5, 32)  # 5 rows: not a multiple of 16
    torch.testing.assert_close(lin(x), nn.functional.linear(x, lin.weight, lin.bias), rtol=0, atol=0)
    x16 = torch.randn(16, 32)
    lin.eval()  # evaluation and generation run the exact layer
    torch.testing.assert_close(lin(x16), nn.functional.linear(x16, lin.weight, lin.bias), rtol=0, atol=0)
    lin.train()
    with torch.no_grad():
        torch.testing.assert_close(lin(x16), nn.functional.linear(x16, lin.weight, lin.bias), rtol=0, atol=0)


def test_fp8_linear_returns_the_autocast_dtype():
    layer = Float8Linear(32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(16, 32)).dtype == torch.bfloat16
    assert layer(torch.randn(16, 32)).dtype == torch.float32


def _micro(seed: int = 0) -> GPT:
    """The micro preset at 64 wide: at its own 32, 20 steps are too few to show it learning."""
    n_layer, n_head, _, block = PRESETS["micro"]
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer, n_head, 64, block))


def test_conversion_keeps_parameters_names_and_the_tied_head():
    model = _micro()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    n = convert_to_fp8(model.transformer.h)
    assert n == 4 * model.config.n_layer  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert type(model.lm_head) is nn.Linear  # the head (tied to the embedding) stays exact
    assert [id(p) for p in model.parameters()] == params  # the optimizer's parameters are the same objects
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert convert_to_fp8(model.transformer.h, enabled=False) == n
    assert not any(isinstance(m, Float8Linear) for m in model.modules())


def _train(model: GPT, steps: int) -> list[float]:
    """A few AdamW steps on one fixed batch of a repeating pattern (learnable in a few steps)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pattern = torch.arange(64) % 7 + 100
    x = pattern[None, :-1].repeat(4, 1)[:, :32]  # 128 rows: FP8 matmuls are slow reference code on CPU
    y = pattern[None, 1:].repeat(4, 1)[:, :32]
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_a_short_fp8_training_run_learns_like_the_fp32_one():
    exact = _train(_micro(), 20)
    model = _micro()
    convert_to_fp8(model.transformer.h)
    fp8 = _train(model, 20)
    assert fp8[-1] < 0.5 * fp8[0]  # it learns ...
    # ... along the fp32 curve (measured: within 0.3% at every step), but not on it: FP8 is really used
    assert fp8 == pytest.approx(exact, rel=0.02)
    assert fp8 != exact


def test_fp8_is_compared_on_resume_and_refused_without_fp8_tensor_cores():
    assert "fp8" not in RESUME_RUNTIME_KEYS  # it changes the math: a resume must not switch it silently
    assert TrainConfig().fp8 is False
    assert fp8_problem(torch.device("cpu")) is None
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        assert "compute capability" in fp8_problem(torch.device("cuda"))
