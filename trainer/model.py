"""GPT-2 (nanoGPT-style) with Hugging Face-compatible parameter names and a KV-cached `generate`.

Why these choices:

* Pre-LayerNorm blocks, GELU(tanh) MLP, tied token embedding / LM head and the
  ``0.02 / sqrt(2 * n_layer)`` init of residual projections reproduce GPT-2 as in the paper and
  nanoGPT, so loss curves are comparable with published runs.
* Parameter names are exactly those of HF's ``GPT2LMHeadModel`` (``transformer.h.N.attn.c_attn``
  ...), so :meth:`GPT.from_pretrained` only has to transpose the Conv1D weights, and a checkpoint
  of ours is exported to HF by the reverse transpose (``pretrain export hf``, :mod:`trainer.export_hf`).
* The vocabulary is padded to 50304 (a multiple of 128) because matmuls with that inner size are
  markedly faster on tensor cores; the extra logits are never targets and learn to be ignored.
* Attention goes through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on
  GPU). With a KV cache, decoding one token attends to every cached key, so no mask is needed.
  ``GPT.set_runtime(sdpa_backend=...)`` pins one SDPA backend (``train.sdpa_backend``) instead of
  PyTorch's per-call choice, so the kernel is the one that was measured fastest, not a default
  that changes between PyTorch releases.
* In training (``model.train()`` with targets) the LM head and cross-entropy can run chunk by
  chunk (``GPT.set_runtime(loss_chunk_tokens=...)``, ``trainer.loss``), never materialising the
  (B·T × vocab) fp32 logits; ``forward`` then returns ``None`` for the logits. Evaluation and
  generation always take the plain path (they need the logits).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer.config import LOSS_KERNELS, PRESET_SHAPES
from trainer.loss import linear_cross_entropy

GPT2_VOCAB = 50257
PADDED_VOCAB = 50304

# name -> (n_layer, n_head, n_embd, block_size): gpt2 124M, -medium 350M, -large 774M, -xl 1558M, tiny for CPU
# smoke runs, micro for tests. One table, in trainer.config, which config loading reads without torch.
PRESETS: dict[str, tuple[int, int, int, int]] = PRESET_SHAPES


@dataclass(frozen=True)
class GPTConfig:
    """The resolved model shape (every field known); what checkpoints record and compare."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int = PADDED_VOCAB
    dropout: float = 0.0
    bias: bool = True

    def shape(self) -> dict[str, int | bool]:
        """The fields that make two checkpoints' weights incompatible (dropout is not one)."""
        return {
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "block_size": self.block_size,
            "vocab_size": self.vocab_size,
            "bias": self.bias,
        }


def resolve_config(model_cfg) -> GPTConfig:
    """Turn the `model` config section (trainer.config.ModelConfig) into a full GPTConfig.

    ``name`` picks a preset; explicit non-zero fields override it. ``name: custom`` (or any name
    that is not a preset) needs every shape field set.
    """
    preset = PRESETS.get(model_cfg.name)
    base = dict(zip(("n_layer", "n_head", "n_embd", "block_size"), preset)) if preset else {}
    out = {}
    for key in ("n_layer", "n_head", "n_embd", "block_size"):
        value = getattr(model_cfg, key) or base.get(key, 0)
        if value <= 0:
            known = ", ".join(PRESETS)
            raise ValueError(f"model.{key} is not set and model.name '{model_cfg.name}' is not a preset ({known})")
        out[key] = value
    cfg = GPTConfig(vocab_size=model_cfg.vocab_size, dropout=model_cfg.dropout, bias=model_cfg.bias, **out)
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"model.n_embd ({cfg.n_embd}) must be a multiple of model.n_head ({cfg.n_head})")
    if cfg.vocab_size < GPT2_VOCAB:
        raise ValueError(f"model.vocab_size ({cfg.vocab_size}) is smaller than the GPT-2 vocabulary ({GPT2_VOCAB})")
    return cfg


KVCache = list[tuple[torch.Tensor, torch.Tensor]]

# train.sdpa_backend -> the one SDPA backend it pins ("auto": PyTorch picks per call)
SDPA_BACKENDS: dict[str, SDPBackend | None] = {
    "auto": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# backends PyTorch implements on CPU (the others raise "No available kernel" at the first forward)
CPU_SDPA_BACKENDS = ("auto", "flash", "math")


def sdpa_backend_problem(name: str, device_type: str) -> str | None:
    """Why ``train.sdpa_backend=name`` cannot run on ``device_type`` (None when it can)."""
    if name not in SDPA_BACKENDS:
        return f"train.sdpa_backend must be one of {', '.join(SDPA_BACKENDS)}, got '{name}'"
    if device_type == "cpu" and name not in CPU_SDPA_BACKENDS:
        return f"train.sdpa_backend '{name}' has no CPU kernel (use one of {', '.join(CPU_SDPA_BACKENDS)})"
    return None


def sdpa_context(name: str) -> contextlib.AbstractContextManager:
    """The ``sdpa_kernel`` context pinning backend ``name``; a no-op for "auto"."""
    backend = SDPA_BACKENDS[name]
    return contextlib.nullcontext() if backend is None else sdpa_kernel(backend)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.RESIDUAL_PROJ = True  # type: ignore[attr-defined]
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``mask`` (B, T, past_len + T), True where a query may attend a key, replaces the causal
        mask: packed evaluation rows (one context, several continuations) need it."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        elif past is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        elif T == 1:
            # one new token attends to everything cached: no mask
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            # several new tokens after a non-empty cache: causal w.r.t. their absolute positions
            L = k.shape[2]
            mask = torch.ones(T, L, dtype=torch.bool, device=x.device).tril(diagonal=L - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.RESIDUAL_PROJ = True  # type: ignore[attr-defined]
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, past=None, mask: torch.Tensor | None = None):
        a, present = self.attn(self.ln_1(x), past, mask)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017), as GPT-2: one matrix embeds and un-embeds.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # how the same math runs (set_runtime); not part of the weights or GPTConfig
        self.loss_chunk_tokens = 0
        self.loss_kernel = "torch"
        self.sdpa_backend = "auto"

    def set_runtime(self, loss_chunk_tokens: int | None = None, sdpa_backend: str | None = None,
                    loss_kernel: str | None = None) -> "GPT":
        """Execution choices that leave the math unchanged (to rounding): ``loss_chunk_tokens`` > 0
        computes the training loss ``trainer.loss``-style in chunks of that many tokens (0 = plain
        ``F.cross_entropy`` over full logits), each chunk's softmax gradient by ``loss_kernel``
        ("torch" ops or one "triton" kernel, ``trainer.loss_kernel``); ``sdpa_backend`` pins the
        attention kernel."""
        if loss_kernel is not None:
            if loss_kernel not in LOSS_KERNELS:
                raise ValueError(f"loss_kernel must be one of {', '.join(LOSS_KERNELS)}, got '{loss_kernel}'")
            self.loss_kernel = loss_kernel
        if loss_chunk_tokens is not None:
            if loss_chunk_tokens < 0:
                raise ValueError(f"loss_chunk_tokens must be >= 0 (0 = off), got {loss_chunk_tokens}")
            self.loss_chunk_tokens = loss_chunk_tokens
        if sdpa_backend is not None:
            if sdpa_backend not in SDPA_BACKENDS:
                raise ValueError(f"sdpa_backend must be one of {', '.join(SDPA_BACKENDS)}, got '{sdpa_backend}'")
            self.sdpa_backend = sdpa_backend
        return self

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_PROJ", False):
                # each block adds two residual contributions; keep the residual stream's variance flat
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ------------------------------------------------------------------ accounting

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counting the tied wte/lm_head once; non_embedding drops wte and wpe."""
        n = sum(p.numel() for p in self.parameters())  # parameters() deduplicates tied tensors
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (fwd+bwd): 6·N plus attention 12·L·d·T (PaLM appendix B)."""
        N = self.num_params() - self.transformer.wpe.weight.numel()
        c = self.config
        return 6.0 * N + 12.0 * c.n_layer * c.n_embd * seq_len

    def summary(self) -> str:
        total, non_emb = self.num_params(), self.num_params(non_embedding=True)
        c = self.config
        return (
            f"GPT: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} embd, block {c.block_size}, vocab {c.vocab_size}; "
            f"parameters {total:,} total, {non_emb:,} non-embedding"
        )

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        past: KVCache | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab) and, with ``targets``, the mean cross-entropy (targets -1 ignored).

        In training mode with ``loss_chunk_tokens`` set, the loss is computed chunk by chunk
        without the full logits, and the logits returned are ``None``.
        """
        if targets is not None and past is None and self.training and self.loss_chunk_tokens > 0:
            x, _ = self.hidden_states(idx)
            return None, linear_cross_entropy(x, self.lm_head.weight, targets, self.loss_chunk_tokens, kernel=self.loss_kernel)
        logits, loss, _ = self._forward(idx, targets, past)
        return logits, loss

    def hidden_states(
        self,
        idx: torch.Tensor,
        pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        past: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Final-LayerNorm hidden states (B, T, C) and the new KV cache.

        By default positions follow the cache and attention is causal. Evaluation passes explicit
        ``pos`` (B, T) and ``mask`` (B, T, past_len + T) to score several continuations of one
        context in a single packed row (see ``evals.scoring``).
        """
        B, T = idx.shape
        start = past[0][0].shape[2] if past else 0
        if pos is None:
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        presents: KVCache = []
        with sdpa_context(self.sdpa_backend):
            for i, block in enumerate(self.transformer.h):
                x, present = block(x, past[i] if past else None, mask)
                presents.append(present)
        return self.transformer.ln_f(x), presents

    def _forward(self, idx, targets=None, past=None):
        x, presents = self.hidden_states(idx, past=past)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss, presents

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        greedy: bool = False,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Continue ``idx`` (B, T) by up to ``max_new_tokens`` tokens.

        ``greedy`` takes the argmax; otherwise tokens are sampled at ``temperature`` from the
        ``top_k`` most likely (all when None) with ``generator`` (seed it for reproducible samples).
        With ``use_cache`` the prompt is encoded once and each new token costs one position; when
        the context would exceed ``block_size`` the cache is dropped and the window re-encoded.
        Logits of padded vocabulary entries are masked so they are never produced.
        ``should_stop`` is polled each token so a stop signal cuts a long sample short.
        """
        was_training = self.training
        self.eval()
        try:
            past: KVCache | None = None
            for _ in range(max_new_tokens):
                if should_stop is not None and should_stop():
                    break
                if use_cache and past is not None and idx.size(1) <= self.config.block_size:
                    logits, _, past = self._forward(idx[:, -1:], past=past)
                else:
                    ctx = idx[:, -self.config.block_size :]
                    logits, _, past = self._forward(ctx)
                    if not use_cache or idx.size(1) >= self.config.block_size:
                        past = None  # a full window: the next token needs a re-encoded window anyway
                logits = logits[:, -1, :].float()
                if self.config.vocab_size > GPT2_VOCAB:
                    logits[:, GPT2_VOCAB:] = -float("inf")
                if greedy:
                    nxt = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / max(temperature, 1e-8)
                    if top_k is not None:
                        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                        logits[logits < v[:, [-1]]] = -float("inf")
                    probs = F.softmax(logits, dim=-1)
                    gen_device = generator.device if generator is not None else probs.device
                    nxt = torch.multinomial(probs.to(gen_device), 1, generator=generator).to(idx.device)
                idx = torch.cat([idx, nxt], dim=1)
        finally:
            self.train(was_training)
        return idx

    # ------------------------------------------------------------------ Hugging Face import

    @classmethod
    def from_pretrained(cls, path: str | Path, vocab_size: int | None = None) -> "GPT":
        """Load a local Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin).

        HF's GPT-2 uses Conv1D modules whose weights are stored (in, out); ours are nn.Linear
        (out, in), so those four matrices per block are transposed. The embedding is padded with
        zero rows to ``vocab_size`` (default: the HF vocab, i.e. unpadded) so logits over real
        tokens are unchanged. No network access: the directory must already exist.
        """
        path = Path(path)
        hf = json.loads((path / "config.json").read_text())
        n_vocab = hf.get("vocab_size", GPT2_VOCAB)
        cfg = GPTConfig(
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
            vocab_size=vocab_size or n_vocab,
            dropout=0.0,
            bias=True,
        )
        if cfg.vocab_size < n_vocab:
            raise ValueError(f"vocab_size {cfg.vocab_size} is smaller than the checkpoint's {n_vocab}")
        sd_hf = _load_hf_state_dict(path)
        model = cls(cfg)
        sd = model.state_dict()
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        # HF keys may or may not carry the "transformer." prefix (GPT2Model vs GPT2LMHeadModel)
        hf_keys = {}
        for k, v in sd_hf.items():
            if k.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # causal-mask buffers, not parameters
            key = k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"
            hf_keys[key] = v
        hf_keys.setdefault("lm_head.weight", hf_keys["transformer.wte.weight"])
        missing = sorted(set(sd) - set(hf_keys))
        unexpected = sorted(set(hf_keys) - set(sd))
        if missing or unexpected:
            raise ValueError(f"{path}: not a GPT-2 checkpoint (missing {missing[:5]}, unexpected {unexpected[:5]})")
        with torch.no_grad():
            for k, v in hf_keys.items():
                if k.endswith(transposed):
                    v = v.t()
                target = sd[k]
                if k in ("transformer.wte.weight", "lm_head.weight") and v.shape[0] < target.shape[0]:
                    target.zero_()
                    target[: v.shape[0]].copy_(v)
                    continue
                if v.shape != target.shape:
                    raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(target.shape)}")
                target.copy_(v)
        return model


def _load_hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    st = path / "model.safetensors"
    if st.is_file():
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"{st}: reading safetensors needs `pip install safetensors`") from e
        return load_file(str(st))
    binf = path / "pytorch_model.bin"
    if binf.is_file():
        return torch.load(binf, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")


def build_model(model_cfg) -> GPT:
    """A freshly initialised GPT from the `model` config section."""
    return GPT(resolve_config(model_cfg))


__all__ = ["GPT", "GPTConfig", "PRESETS", "SDPA_BACKENDS", "build_model", "resolve_config", "sdpa_backend_problem", "sdpa_context"]
