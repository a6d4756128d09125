"""Exact, batched log-likelihood scoring of continuations with our GPT.

Why not just call ``model(idx)`` on a padded batch (build-nanogpt's HellaSwag loop)?

* A multiple-choice example is one context with K continuations. Scored as K rows, the context
  is encoded K times, and the LM head (768 x 50k, a third of GPT-2 small's FLOPs per token) plus a
  full-vocabulary log-softmax run at every position, including context and padding.
* Here each example becomes ONE packed row ``context + cont_1[:-1] + ... + cont_K[:-1]`` with a
  block attention mask (a continuation sees the context and its own earlier tokens, never another
  continuation) and position ids that restart after the context for every continuation. That is
  mathematically the same computation as K separate rows, with the context encoded once.
* The head runs only at the positions that predict a scored token (deduplicated: all K first
  tokens are predicted from the last context position).
* Many packed rows go through one forward pass, right-padded; padding is masked and never scored.

:func:`masked_forward` is ``GPT.hidden_states`` with that mask and those positions (a unit test
pins it to ``GPT.forward`` on unpacked rows). With a KV cache it drives batched, left-padded
generation in :mod:`evals.harness`.

Contexts plus continuation longer than ``block_size`` are truncated from the left, as the
harness does for Hugging Face models: the continuation keeps all its tokens (if it alone exceeds
the window, only its last ``block_size`` tokens are scored and ``n_tokens`` says so).

Attention kernel on CUDA (why bf16 was ~5x slower than fp32 on an H200). Every batch of packed
rows has its own padded length, so the masked attention sees a new (B, T) shape almost every
forward. Recent PyTorch (2.9 and later, as read in ATen's ``sdp_utils.cpp``) on Hopper/Blackwell
with cuDNN >= 9.9 puts cuDNN attention first for bf16/fp16 (``check_prefer_cudnn_attention``,
opt out with ``TORCH_CUDNN_SDPA_PREFERRED=0``), and cuDNN builds and caches one execution graph
per problem shape (``cudnn/MHA.cpp``): tens of milliseconds of host time on every new shape, i.e.
on nearly every batch here. (It also explains why pinning cuDNN for training changed nothing:
training already ran it, at one fixed shape.) fp32 has no cuDNN kernel and always ran the
memory-efficient kernel, which has no per-shape setup. :func:`masked_forward` therefore pins the
memory-efficient kernel (math as the fallback) on CUDA: the fp32 path keeps the kernel it already
used (same results), and bf16 gets the same shape-agnostic kernel. This is read from the sources
and fits the measured figures (the bf16 excess was ~0.1 s per batch); ``bench/hellaswag.py
--eval-sdpa auto`` re-measures the previous behaviour next to the pinned one on a GPU. CPU is
left alone (PyTorch's CPU flash kernel handles masks and has no per-shape setup).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer import precision
from trainer.model import GPT, GPT2_VOCAB

KV = list[tuple[torch.Tensor, torch.Tensor]]
# LM-head rows computed at once: bounds the (rows x 50k) float32 logits to ~200 MB.
HEAD_CHUNK = 1024
# Default cap on rows x padded length per forward on CPU (see score_groups).
CPU_BATCH_TOKENS = 2048
# SDPA kernels for masked (packed / KV-cached) forwards on CUDA, in order of preference; None =
# PyTorch's own choice (cuDNN first for bf16 on Hopper: a graph build per new shape, see above).
CUDA_MASKED_SDPA: list[SDPBackend] | None = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# The LM head at the scored positions in fp32 even under bf16 autocast. Why: a bf16 logit of
# magnitude ~10 is rounded by up to ~0.03, and a continuation's score sums ~30 such log-probs, so
# bf16 rounding alone can flip the pick between two close endings; in fp32 only the (smaller)
# error of the bf16 hidden states is left. The head runs only where a scored token is predicted,
# so it costs a tenth of bf16 scoring speed (H100, 10,042 rows of a trained GPT-2 124M: 1,113 vs
# 1,234 rows/s) for the same per-token pick as fp32 on 100% of rows instead of 99.87%.
# False = the autocast dtype (as training).
HEAD_FP32 = True


@dataclass(frozen=True)
class Group:
    """One context and the continuations to score after it (token ids; context non-empty)."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Score:
    """Sum of log-probabilities of a continuation's tokens, how many were scored, greedy or not."""

    logprob: float
    n_tokens: int
    greedy: bool


def encode(enc, text: str) -> list[int]:
    """Text to GPT-2 tokens; a literal ``<|endoftext|>`` becomes the EOT token, as with HF's GPT-2 tokenizer."""
    return enc.encode(text, allowed_special="all")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_for(device: torch.device, dtype: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (as in training), exact fp32 on CPU unless asked otherwise
    (:mod:`trainer.precision` decides, for training and evaluation alike)."""
    return precision.autocast(device, precision.compute_dtype(dtype, device, key="eval.dtype"))


# ------------------------------------------------------------------ forward with a mask


def masked_forward(
    model: GPT, idx: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, past: KV | None = None
) -> tuple[torch.Tensor, KV]:
    """Final hidden states (B, T, C) of ``idx`` at positions ``pos`` (B, T) under ``mask``.

    ``mask`` (B, T, past_len + T) is True where a query may attend to a key. Every query row must
    allow at least one key (e.g. padding attends to itself), else softmax yields NaN. The model is
    expected in eval mode (no dropout). On CUDA the attention kernel is pinned to
    :data:`CUDA_MASKED_SDPA` (module docstring: no per-shape cuDNN graph builds).
    """
    pin = idx.device.type == "cuda" and CUDA_MASKED_SDPA is not None
    with sdpa_kernel(CUDA_MASKED_SDPA) if pin else contextlib.nullcontext():
        return model.hidden_states(idx, pos=pos, mask=mask, past=past)


# ------------------------------------------------------------------ packing


@dataclass
class _Packed:
    tokens: list[int]
    pos: list[int]
    seg: list[int]  # 0 = context, j+1 = continuation j
    # per continuation: list of (row index predicting the token, target token)
    targets: list[list[tuple[int, int]]]


def fit_to_window(group: Group, block_size: int) -> list[Group]:
    """Split/truncate a group so each continuation fits ``block_size`` with its context.

    A packed row needs ``len(context) + len(cont) <= block_size + 1`` for every continuation (the
    last token is never an input). Groups that fit stay whole; otherwise every continuation gets
    its own left-truncated context, exactly as it would when scored alone.
    """
    limit = block_size + 1
    if len(group.context) + max(len(c) for c in group.continuations) <= limit:
        return [group]
    out = []
    for cont in group.continuations:
        whole = (group.context + cont)[-limit:]
        n_ctx = max(1, len(whole) - len(cont))
        out.append(Group(whole[:n_ctx], (whole[n_ctx:],)))
    return out


def _pack(group: Group) -> _Packed:
    ctx = list(group.context)
    if not ctx:
        raise ValueError("a context must hold at least one token (use the EOT token as prefix)")
    tokens, pos, seg = list(ctx), list(range(len(ctx))), [0] * len(ctx)
    targets = []
    for j, cont in enumerate(group.continuations):
        if not cont:
            raise ValueError("empty continuation")
        start = len(tokens)
        tgt = [(len(ctx) - 1, cont[0])]
        for t in range(1, len(cont)):
            tgt.append((start + t - 1, cont[t]))
        tokens.extend(cont[:-1])
        pos.extend(range(len(ctx), len(ctx) + len(cont) - 1))
        seg.extend([j + 1] * (len(cont) - 1))
        targets.append(tgt)
    return _Packed(tokens, pos, seg, targets)


def _batch_tensors(packed: Sequence[_Packed], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(len(p.tokens) for p in packed)
    B = len(packed)
    idx = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    for b, p in enumerate(packed):
        n = len(p.tokens)
        idx[b, :n] = torch.tensor(p.tokens)
        pos[b, :n] = torch.tensor(p.pos)
        seg[b, :n] = torch.tensor(p.seg)
    idx, pos, seg = idx.to(device), pos.to(device), seg.to(device)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)
    real = seg >= 0
    mask = causal[None] & same & real[:, None, :] & real[:, :, None]
    mask |= torch.eye(T, dtype=torch.bool, device=device)[None]  # padding attends to itself
    return idx, pos, mask


def _head_scores(model: GPT, hidden: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token) and greedy flags for hidden rows ``hidden[rows]`` (one target per entry)."""
    uniq, inverse = torch.unique(rows, return_inverse=True)
    h = hidden[uniq]
    lp = torch.empty(len(rows), dtype=torch.float32, device=hidden.device)
    greedy = torch.empty(len(rows), dtype=torch.bool, device=hidden.device)
    vocab = min(GPT2_VOCAB, model.config.vocab_size)
    # the padded vocabulary entries are not tokens: leave them out of the distribution (and the
    # matmul), and keep the logits contiguous (reductions over a strided slice are much slower)
    weight = model.lm_head.weight[:vocab]
    device_type = hidden.device.type
    if HEAD_FP32:
        h, weight = h.float(), weight.float()
    elif torch.is_autocast_enabled(device_type):
        # cast the head once per batch: autocast does not cache casts of a slice (a view), so
        # each chunk's F.linear would otherwise convert the whole 50k x C matrix again
        weight = weight.to(torch.get_autocast_dtype(device_type))
    for s in range(0, len(uniq), HEAD_CHUNK):
        with torch.autocast(device_type, enabled=False) if HEAD_FP32 else contextlib.nullcontext():
            logits = F.linear(h[s : s + HEAD_CHUNK], weight).float()
        lse = torch.logsumexp(logits, dim=-1)
        best = logits.argmax(dim=-1)
        sel = (inverse >= s) & (inverse < s + HEAD_CHUNK)
        i = inverse[sel] - s
        t = tokens[sel]
        lp[sel] = logits[i, t] - lse[i]
        greedy[sel] = best[i] == t
    return lp, greedy


def _batches(order: list[int], packed: list[_Packed], batch_size: int, max_tokens: int) -> Iterator[list[int]]:
    batch: list[int] = []
    for i in order:
        longest = max([len(packed[j].tokens) for j in batch] + [len(packed[i].tokens)])
        if batch and (len(batch) >= batch_size or longest * (len(batch) + 1) > max_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.inference_mode()
def score_groups(
    model: GPT,
    groups: Sequence[Group],
    batch_size: int = 32,
    device: torch.device | str | None = None,
    dtype: str = "auto",
    max_tokens: int = 0,
) -> list[list[Score]]:
    """Score every continuation of every group; returns scores in the input order.

    Up to ``batch_size`` packed rows go through each forward pass (longest rows first, so an
    out-of-memory error shows in the first batch); ``max_tokens`` bounds rows x padded length
    (default ``batch_size * block_size``, on CPU at most ``CPU_BATCH_TOKENS``).
    """
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    was_training = model.training
    model.eval()  # no dropout while scoring, whatever state the caller left the model in
    try:
        return _score_groups(model, groups, max(1, batch_size), device, dtype, max_tokens)
    finally:
        model.train(was_training)


def _score_groups(model: GPT, groups: Sequence[Group], batch_size: int, device: torch.device, dtype: str, max_tokens: int) -> list[list[Score]]:
    block = model.config.block_size
    # split groups that do not fit the window; remember where each piece's scores go
    pieces: list[Group] = []
    owner: list[tuple[int, int]] = []  # (group index, first continuation index)
    for gi, g in enumerate(groups):
        k = 0
        for piece in fit_to_window(g, block):
            pieces.append(piece)
            owner.append((gi, k))
            k += len(piece.continuations)
    packed = [_pack(p) for p in pieces]
    order = sorted(range(len(packed)), key=lambda i: -len(packed[i].tokens))
    out: list[list[Score | None]] = [[None] * len(g.continuations) for g in groups]
    if not max_tokens:
        # CPU matmuls are as efficient at ~2k tokens as at 30k, while attention scores grow with B*T^2:
        # cache-sized batches are faster there. GPUs want big batches.
        max_tokens = batch_size * block if device.type != "cpu" else min(batch_size * block, CPU_BATCH_TOKENS)
    for batch in _batches(order, packed, batch_size, max_tokens):
        items = [packed[i] for i in batch]
        idx, pos, mask = _batch_tensors(items, device)
        with autocast_for(device, dtype):
            hidden, _ = masked_forward(model, idx, pos, mask)
            T = idx.shape[1]
            rows, toks, owners = [], [], []
            for b, p in enumerate(items):
                for j, tgt in enumerate(p.targets):
                    for r, tok in tgt:
                        rows.append(b * T + r)
                        toks.append(tok)
                        owners.append((b, j))
            lp, greedy = _head_scores(
                model,
                hidden.reshape(-1, hidden.shape[-1]),
                torch.tensor(rows, device=device),
                torch.tensor(toks, device=device),
            )
        lp_l, gr_l = lp.tolist(), greedy.tolist()
        sums: dict[tuple[int, int], list] = {}
        for (b, j), v, g in zip(owners, lp_l, gr_l):
            acc = sums.setdefault((b, j), [0.0, 0, True])
            acc[0] += v
            acc[1] += 1
            acc[2] = acc[2] and g
        for (b, j), (v, n, g) in sums.items():
            gi, k = owner[batch[b]]
            out[gi][k + j] = Score(v, n, g)
    return [[s for s in row if s is not None] for row in out]  # type: ignore[misc]
