"""The `model`, `train` and `tracking` sections of a run config, and :class:`TrainJob`, the resolved
config as the training worker reads it.

Model shape, optimisation and run-time (device, compile, checkpoint cadence) are separate so that
an eval job can rebuild the model from `model` alone.

Each section checks itself when the config loads (``validate``, called by
the strict loader in ``common.strict``), so that a value no rerun can fix (``train.lr=-1``,
``train.device=gpu``, ``train.max_steps=0``) is refused with exit 2 before a job is queued or a
process group formed, never turned into a crash that a scheduler would retry.

Which keys a resume may change (see :data:`RESUME_RUNTIME_KEYS`)
----------------------------------------------------------------
A resumed run continues the *same* optimisation, so the checkpoint's stored config is compared
with the current one and a change of any key that enters the math is refused (naming the keys)
unless ``pretrain train --allow-changes``. The model's resolved shape is checked separately and
can never change (the weights would not load); the data is identified by its manifest's sha256
(``data.*`` keys are not compared: the fingerprint covers what matters).

* Hyper-parameters (compared): every ``model.*`` key, and every ``train.*`` key not listed
  below — seed, micro_batch_size, seq_len, batch_tokens, max_steps, warmup_steps, lr, min_lr,
  weight_decay, beta1, beta2, eps, grad_clip, dtype. ``micro_batch_size`` belongs here although
  the mean gradient is the same in exact arithmetic: it changes the loader's windows and the
  accumulation order, so the run would not be the one that was stopped. ``max_steps`` shapes
  the cosine schedule, so extending a run is a change that needs ``--allow-changes``.
* Run-time knobs (free): how the same math is executed or observed — ``nproc_per_node``
  (a world-size change is supported: the data position is kept, per-rank RNG streams are
  reseeded, and the resume is then no longer bitwise), ``device``, ``compile`` (and its
  ``compile_mode`` / ``compile_fullgraph``), ``deterministic``, ``sdpa_backend``, ``loss_chunk_tokens``, ``loss_kernel``, ``async_ckpt``,
  checkpoint cadence and retention, validation / sample cadence, ``peak_flops``,
  ``max_skipped_steps`` (it only decides when to give up) and ``stop_timeout_s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.strict import ConfigError, from_dict, read_yaml_mapping

# (n_layer, n_head, n_embd, block_size) of each model preset (trainer.model.PRESETS is this table), kept
# here so that loading a config, and checking train.seq_len against the block size, imports no torch
PRESET_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "gpt2": (12, 12, 768, 1024),
    "gpt2-medium": (24, 16, 1024, 1024),
    "gpt2-large": (36, 20, 1280, 1024),
    "gpt2-xl": (48, 25, 1600, 1024),
    "tiny": (4, 4, 128, 128),
    "micro": (2, 2, 32, 64),
}
MODEL_PRESETS = tuple(PRESET_SHAPES)
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bfloat16", "float32")

# train.* keys a resume may change freely (module doc); every other model.*/train.* key is compared
RESUME_RUNTIME_KEYS = frozenset({
    "nproc_per_node", "device", "compile", "async_ckpt", "peak_flops", "ckpt_every", "keep_last", "keep_every",
    "sample_every", "sample_tokens", "sample_prompt", "val_every", "val_batches", "max_skipped_steps",
    "loss_chunk_tokens", "loss_kernel", "sdpa_backend", "compile_mode", "compile_fullgraph", "deterministic",
    "stop_timeout_s",
})  # fmt: skip
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")  # must match trainer.model.SDPA_BACKENDS
LOSS_KERNELS = ("torch", "triton")  # how a loss chunk's softmax gradient is formed (trainer.loss_kernel)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


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

    def validate(self) -> None:
        """Shape fields are >= 0 (0 = from the preset); a non-preset name needs every one of them."""
        for key in ("n_layer", "n_head", "n_embd", "block_size"):
            value = getattr(self, key)
            _check(value >= 0, f"{key} must be >= 0 (0 = take it from the preset), got {value}")
            _check(value > 0 or self.name in MODEL_PRESETS,
                   f"{key} is not set and name '{self.name}' is not a preset ({', '.join(MODEL_PRESETS)})")
        _check(self.vocab_size >= 50257, f"vocab_size must be >= 50257 (the GPT-2 vocabulary), got {self.vocab_size}")
        _check(self.vocab_size <= 65536, f"vocab_size must be <= 65536 (the data's token ids are uint16: rows past that "
                                         f"could never be used), got {self.vocab_size}")
        _check(math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        shape = self.resolved_shape()
        _check(shape["n_embd"] % shape["n_head"] == 0,
               f"n_embd ({shape['n_embd']}) must be a multiple of n_head ({shape['n_head']})")

    def resolved_shape(self) -> dict[str, int]:
        """n_layer, n_head, n_embd, block_size as the model will have them (preset, then explicit
        fields), without importing torch; 0 where neither sets one (``validate`` refuses that)."""
        preset = dict(zip(("n_layer", "n_head", "n_embd", "block_size"), PRESET_SHAPES.get(self.name, (0, 0, 0, 0))))
        return {key: getattr(self, key) or preset[key] for key in preset}


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
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    compile_fullgraph: bool = False  # torch.compile(fullgraph=True): fail loudly on a graph break instead of splitting
    # Deterministic kernels, eager and compiled (trainer.determinism): what a compiled run needs to
    # resume bit for bit on a GPU (eager runs already do). Its GPU cost is not measured yet: off.
    deterministic: bool = False
    sdpa_backend: str = "auto"  # attention kernel: auto (PyTorch picks) | flash | cudnn | efficient | math
    # Training loss over chunks of this many tokens, never materialising the (B*T x vocab) fp32 logits
    # (trainer.loss); 0 = plain F.cross_entropy over the full logits. Same loss to fp32 rounding.
    loss_chunk_tokens: int = 8192
    # How each loss chunk's softmax gradient is formed: torch (PyTorch ops) | triton (one fused
    # kernel writing it over the logits, trainer.loss_kernel; CUDA, needs the triton package).
    loss_kernel: str = "torch"
    # FP8 (e4m3/e5m2, dynamic per-tensor scales) matmuls in the blocks' linear layers (trainer.fp8);
    # needs compute capability >= 8.9 on CUDA. Changes the math (FP8 rounding): a resume compares it.
    fp8: bool = False
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
    # A step whose loss or gradient norm is NaN/inf on any rank is skipped on every rank (no
    # update); after this many in a row the run checkpoints and stops with exit 2.
    max_skipped_steps: int = 5
    # After a stop signal reaches torchrun itself (SLURM signals every process of a job step; a
    # launcher killed with SIGKILL sends it SIGTERM), how long torchrun lets the ranks finish their
    # step and commit the stop checkpoint before it SIGKILLs them. torchrun's own 30 s cut a large
    # model's checkpoint short; the scheduler's KillWait / GraceTime still bounds a job on SLURM.
    stop_timeout_s: int = 600

    def validate(self) -> None:
        """Hardware-free checks of this section alone; the batch geometry and ``seq_len`` against the
        model's block size span sections and are checked by ``pipelines.config.check_geometry``."""
        _check(self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}, got '{self.device}'")
        _check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")
        _check(self.sdpa_backend in SDPA_BACKENDS, f"sdpa_backend must be one of {', '.join(SDPA_BACKENDS)}, got '{self.sdpa_backend}'")
        _check(self.compile_mode in COMPILE_MODES, f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got '{self.compile_mode}'")
        _check(self.loss_kernel in LOSS_KERNELS, f"loss_kernel must be one of {', '.join(LOSS_KERNELS)}, got '{self.loss_kernel}'")
        _check(self.loss_kernel == "torch" or self.loss_chunk_tokens > 0,
               f"loss_kernel '{self.loss_kernel}' is the chunked loss's: set loss_chunk_tokens > 0 (it is 0: the plain loss)")
        _check(not (self.deterministic and self.sdpa_backend == "cudnn"),
               "sdpa_backend 'cudnn' has no deterministic backward: with deterministic: true use auto, flash, efficient or math")
        _check(self.loss_chunk_tokens >= 0, f"loss_chunk_tokens must be >= 0 (0 = off), got {self.loss_chunk_tokens}")
        for key in ("nproc_per_node", "micro_batch_size", "seq_len", "batch_tokens", "max_steps", "keep_last", "max_skipped_steps",
                    "stop_timeout_s"):
            _check(getattr(self, key) >= 1, f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("seed", "warmup_steps", "val_every", "val_batches", "sample_every", "sample_tokens", "ckpt_every", "keep_every"):
            _check(getattr(self, key) >= 0, f"{key} must be >= 0, got {getattr(self, key)}")
        for key in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "eps", "grad_clip", "peak_flops"):
            _check(math.isfinite(getattr(self, key)), f"{key} must be a finite number, got {getattr(self, key)}")
        _check(self.seed < 2**63, f"seed must be < 2**63, got {self.seed}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        for key in ("beta1", "beta2"):
            _check(0 <= getattr(self, key) < 1, f"{key} must be in [0, 1), got {getattr(self, key)}")
        _check(self.eps > 0, f"eps must be > 0, got {self.eps}")
        _check(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = no clipping), got {self.grad_clip}")
        _check(self.peak_flops >= 0, f"peak_flops must be >= 0 (0 = look it up), got {self.peak_flops}")
        _check(self.val_every == 0 or self.val_batches >= 1, f"val_batches must be >= 1 when val_every > 0, got {self.val_batches}")


MAX_EXPERIMENT_NAME = 500  # mlflow.utils.validation.MAX_EXPERIMENT_NAME_LENGTH


@dataclass
class TrackingConfig:
    """Experiment tracking (MLflow)."""

    # Empty: a local sqlite store next to the run dir (RUN_DIR/../mlflow.db).
    uri: str = ""
    experiment: str = "pretrain"

    def validate(self) -> None:
        """MLflow refuses an empty or over-long experiment name only when training starts (after the
        data stage of `pretrain run`): refuse it at load."""
        _check(bool(self.experiment.strip()), f"experiment must not be empty, got {self.experiment!r}")
        _check(len(self.experiment) <= MAX_EXPERIMENT_NAME, f"experiment must be at most {MAX_EXPERIMENT_NAME} "
               f"characters (MLflow's limit), got {len(self.experiment)}")


@dataclass
class TrainJob:
    """The resolved run config as one training reads it: its own sections, strictly loaded, plus
    the whole config as plain data (``resolved``), which it stores with every checkpoint, writes
    to ``RUN_DIR/config.yaml``, logs to tracking and compares on resume.

    The layer above (``pretrain train``) resolves and validates the whole config and hands it
    down, as a dict in-process or as a YAML file to the torchrun workers (:meth:`from_file`); the
    trainer never loads a user's config and overrides itself, so it needs no knowledge of the
    other stages' sections.
    """

    run_dir: str
    data_dir: str  # data.output_dir: the shard directory (its manifest is the contract)
    model: ModelConfig
    train: TrainConfig
    tracking: TrackingConfig
    resolved: dict[str, Any] = field(repr=False)

    @classmethod
    def from_resolved(cls, resolved: dict[str, Any], where: str = "resolved config") -> TrainJob:
        missing = [k for k in ("run_dir", "data", "model", "train") if k not in resolved]
        if missing:
            raise ConfigError(f"{where}: not a resolved run config (missing {', '.join(missing)}); "
                              "`pretrain config show CONFIG [overrides]` writes one")
        data = resolved["data"] if isinstance(resolved["data"], dict) else {}
        if not isinstance(data.get("output_dir"), str):
            raise ConfigError(f"{where}: data.output_dir must be a string")
        return cls(
            run_dir=str(resolved["run_dir"]),
            data_dir=data["output_dir"],
            model=from_dict(ModelConfig, resolved["model"], "model.", where),
            train=from_dict(TrainConfig, resolved["train"], "train.", where),
            tracking=from_dict(TrackingConfig, resolved.get("tracking"), "tracking.", where),
            resolved=resolved,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> TrainJob:
        return cls.from_resolved(read_yaml_mapping(path), str(path))

    def resolved_yaml(self) -> str:
        """The whole config as YAML, in the form ``pretrain config show`` prints."""
        return yaml.safe_dump(self.resolved, sort_keys=False, allow_unicode=True)


def changed_hyperparameters(saved: dict, current: dict) -> list[str]:
    """``"train.lr: 0.003 -> 0.001"`` for each hyper-parameter that differs between two configs
    (``pipelines.config.to_dict`` form, e.g. a checkpoint's stored config and this run's).

    Keys missing on either side (a checkpoint of an older version) are not compared.
    """
    out = []
    for section, free in (("model", frozenset()), ("train", RESUME_RUNTIME_KEYS)):
        old, new = saved.get(section) or {}, current.get(section) or {}
        for key in sorted(set(old) & set(new) - free):
            if old[key] != new[key]:
                out.append(f"{section}.{key}: {old[key]!r} -> {new[key]!r}")
    return out
