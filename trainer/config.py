"""The `model` and `train` sections of a run config.

Model shape, optimisation and run-time (device, compile, checkpoint cadence) are separate so that
an eval job can rebuild the model from `model` alone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """GPT-2 shape. `name` picks a preset; explicit non-zero fields override it."""

    name: str = "gpt2"  # gpt2 | gpt2-medium | gpt2-large | gpt2-xl | tiny | custom
    n_layer: int = 0
    n_head: int = 0
    n_embd: int = 0
    block_size: int = 0
    vocab_size: int = 50304  # 50257 padded to a multiple of 128 for fast matmuls
    dropout: float = 0.0
    bias: bool = True


@dataclass
class TrainConfig:
    """Optimisation, data loading, logging and checkpoint cadence."""

    nproc_per_node: int = 1
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 1337
    micro_batch_size: int = 16  # sequences per rank per micro-step (B)
    seq_len: int = 1024  # T
    batch_tokens: int = 524_288  # tokens per optimizer step, all ranks together (0.5M as GPT-3 small)
    max_steps: int = 19_073  # ≈ 10B tokens at 0.5M tokens/step
    warmup_steps: int = 715
    lr: float = 6e-4
    min_lr: float = 6e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float32
    compile: bool = False
    val_every: int = 250
    val_batches: int = 20
    sample_every: int = 1000
    sample_tokens: int = 32
    sample_prompt: str = "Hello, I'm a language model,"
    ckpt_every: int = 1000
    keep_last: int = 2
    keep_every: int = 0  # also keep every k-th step's checkpoint (0 = none)
    async_ckpt: bool = True  # on CUDA, write checkpoints in the background
    peak_flops: float = 0.0  # device peak for MFU; 0 = look it up (H100 bf16 dense: 989e12)
