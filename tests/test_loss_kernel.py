"""``train.loss_kernel: triton`` (trainer.loss_kernel): the chunked loss with its softmax gradient
formed by one Triton kernel gives the loss and gradients of the plain path, in the model and in a
real training run, eager and under torch.compile; and it is refused where it cannot run.

There is no GPU here: the kernel runs on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set by tests/conftest.py before Triton is imported). The interpreter is exact in
fp32; its fp32→bf16 cast truncates where a GPU rounds to nearest even, so in bf16 the gradients
are compared to one bf16 step, the loss to fp32 rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import skip_or_fail
from tests.test_loss import RUN_CONFIG, _close, _grads, _plain, _resolved
from tests.trainer_helpers import REPO, make_shard_dir
from trainer.loss import _grad_and_loss, linear_cross_entropy

try:
    import triton  # noqa: F401
except ImportError:
    triton = None


@pytest.fixture(autouse=True)
def interpreter():
    if triton is None:
        skip_or_fail("triton is not installed (pip install -e '.[dev]' installs it)")
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets it before Triton is imported"


@pytest.mark.parametrize(
    "rows, chunk, vocab, ignored, block",
    [
        (300, 64, 1000, 0.15, 256),  # a row in 4 column blocks (the last ragged), a ragged last chunk, ignored targets
        (257, 256, 50304, 0.0, 32768),  # the real padded vocabulary and block: 2 column blocks; a last chunk of one row
        (96, 1000, 777, 0.5, 1024),  # one column block larger than the row, half the targets ignored
    ],
)
def test_kernel_loss_and_gradients_equal_cross_entropy_in_fp32(rows, chunk, vocab, ignored, block, monkeypatch):
    import trainer.loss_kernel

    monkeypatch.setattr(trainer.loss_kernel, "MAX_BLOCK", block)
    g = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, 48, generator=g)
    w = torch.randn(vocab, 48, generator=g) * 0.3
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[torch.rand(rows, generator=g) < ignored] = -1
    want = _grads(_plain, h, w, t, upstream=0.25)
    got = _grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk, kernel="triton"), h, w, t, upstream=0.25)
    for a, b in zip(got, want):
        _close(a, b)


def test_in_bf16_the_kernel_forms_the_torch_paths_gradient_and_loss():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, 3000, generator=g) * 4).bfloat16()
    t = torch.randint(0, 3000, (64,), generator=g)
    want_grad, want_loss = _grad_and_loss(logits.clone(), t, "torch")
    written = logits.clone()
    got_grad, got_loss = _grad_and_loss(written, t, "triton")
    assert got_grad is written and got_grad.dtype == torch.bfloat16  # in place over the logits: no other buffer
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-5)
    # within one bf16 step (2**-8 relative) of the torch path's, which rounds to nearest
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=2**-7, atol=1e-30)
    assert (got_grad.float().sum(dim=1).abs() < 1e-2).all()  # softmax - one_hot sums to 0 in every row


def test_compiled_fullgraph_calls_the_kernel_as_one_op():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(200, 32, generator=g)
    w = torch.randn(500, 32, generator=g) * 0.3
    t = torch.randint(0, 500, (200,), generator=g)
    compiled = torch.compile(lambda h, w, t: linear_cross_entropy(h, w, t, 64, kernel="triton"), fullgraph=True)
    for a, b in zip(_grads(compiled, h, w, t, upstream=1.0), _grads(_plain, h, w, t, upstream=1.0)):
        _close(a, b)


def _train(tmp: Path, data: Path, kernel: str) -> list[dict]:
    run_dir = tmp / f"run_{kernel}"
    config = tmp / f"{kernel}.yaml"
    config.write_text(RUN_CONFIG.format(run_dir=run_dir, data_dir=data, chunk=48))
    proc = subprocess.run([sys.executable, "-m", "trainer.train", str(_resolved(config, f"train.loss_kernel={kernel}"))],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    said = ", loss in chunks of 48 tokens" + (", triton kernel" if kernel == "triton" else "")
    assert any(line.startswith("training: ") and line.endswith(said) for line in proc.stdout.splitlines()), proc.stdout[-2000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_training_run_with_the_kernel_has_the_same_losses(tmp_path):
    data = make_shard_dir(tmp_path / "data", seed=3)
    torch_ops, kernel = _train(tmp_path, data, "torch"), _train(tmp_path, data, "triton")
    assert [r["step"] for r in kernel] == [r["step"] for r in torch_ops] == list(range(1, 7))
    for a, b in zip(kernel, torch_ops):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), a["step"]
    assert torch_ops[-1]["loss"] < torch_ops[0]["loss"], "the run must learn, or equal losses prove little"


def test_refused_where_it_cannot_run(monkeypatch):
    from trainer.config import TrainConfig
    from trainer.loss_kernel import loss_kernel_problem

    assert loss_kernel_problem("triton", "cuda") is None and loss_kernel_problem("torch", "cpu") is None
    assert "must be one of torch, triton" in loss_kernel_problem("liger", "cuda")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "runs on CUDA, not cpu" in loss_kernel_problem("triton", "cpu")
    with pytest.raises(ValueError, match="loss_kernel 'triton' is the chunked loss's: set loss_chunk_tokens > 0"):
        TrainConfig(loss_kernel="triton", loss_chunk_tokens=0).validate()
    with pytest.raises(ValueError, match="loss_kernel must be one of torch, triton, got 'fused'"):
        TrainConfig(loss_kernel="fused").validate()
