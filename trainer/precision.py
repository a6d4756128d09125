"""One answer to "which dtype, and which autocast, on this device with this setting".

Training (``train.dtype``), evaluation (``eval.dtype``) and the benches all take the same
setting: ``auto`` (bf16 autocast on CUDA, exact fp32 elsewhere), ``bfloat16`` or ``float32``.
Weights always stay fp32; bf16 means autocast (matmuls and attention in bf16, reductions and
the optimizer in fp32), as in nanoGPT. Deciding it in one place keeps the trainer, the scorer and
the benches measuring and running the same arithmetic.

On CUDA, fp32 matmuls use TF32 tensor cores (:func:`configure_matmul`): the trainer has always
done so, and a bench that did not would time a different model.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = ("auto", "float32", "bfloat16")


def compute_dtype(setting: str, device: torch.device | str, key: str = "dtype") -> torch.dtype:
    """``torch.bfloat16`` or ``torch.float32`` for ``setting`` on ``device``.

    ``auto`` is bf16 on CUDA and fp32 elsewhere (CPU bf16 is slow and only approximately equal).
    Raises ValueError naming ``key`` (e.g. ``train.dtype``) for any other setting.
    """
    if setting not in DTYPES:
        raise ValueError(f"{key} must be auto, float32 or bfloat16, got {setting!r}")
    device_type = torch.device(device).type
    if setting == "bfloat16" or (setting == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device | str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The autocast context for ``dtype`` (from :func:`compute_dtype`); fp32 runs without one."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def configure_matmul(device: torch.device | str) -> None:
    """Allow TF32 for fp32 matmuls and convolutions on CUDA (process-wide; a no-op elsewhere)."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")


def short_name(dtype: torch.dtype) -> str:
    """``bf16`` / ``fp32``: how logs and bench RESULT lines name it."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"
