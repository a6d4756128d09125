"""HellaSwag, completion style (build-nanogpt's ``hellaswag.py``), batched.

Each example is a context and four endings; the model "chooses" the ending it finds most likely:

* ``acc``: highest sum of log-probabilities of the ending tokens (what lm-eval calls ``acc``);
* ``acc_norm``: lowest mean per-token loss (build-nanogpt's ``acc_norm``; lm-eval's ``acc_norm``
  normalises by bytes instead, so the two ``acc_norm`` are not comparable).

Two prompt styles (``eval.hellaswag_style``):

* ``nanogpt``: context ``ctx``, endings ``" " + ending``, tokenised separately, as in build-nanogpt
  (reference: OpenAI GPT-2 124M acc_norm 29.55 on all 10,042 rows);
* ``harness``: lm-eval's prompt (``activity_label: ctx_a Ctx_b``, bracket artefacts removed) and
  its tokenisation rule (encode context+ending, split after the context's tokens), so ``acc``
  equals lm-eval's ``acc`` for the same model and rows.

Scoring is :func:`evals.scoring.score_groups` (one packed row per example, many per forward).
:func:`score_example_unbatched` is the plain one-example-per-forward loop it is tested and
benchmarked against.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from dataprep.tokenizer import EOT_TOKEN
from evals.scoring import Group, encode, score_groups
from trainer.model import GPT, GPT2_VOCAB

STYLES = ("nanogpt", "harness")


def _preprocess(text: str) -> str:
    """lm-eval's hellaswag clean-up (``lm_eval/tasks/hellaswag/utils.py``)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def render(row: dict[str, Any], style: str = "nanogpt") -> tuple[str, list[str]]:
    """(context text, continuation texts) of one example."""
    if style == "nanogpt":
        return row["ctx"], [" " + e for e in row["endings"]]
    if style == "harness":
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        return _preprocess(row["activity_label"] + ": " + ctx), [" " + _preprocess(e) for e in row["endings"]]
    raise ValueError(f"eval.hellaswag_style must be one of {STYLES}, got {style!r}")


def tokenize(enc, row: dict[str, Any], style: str = "nanogpt") -> Group:
    """The row's tokens. A context that encodes to no token (an empty ``ctx``) becomes the EOT
    token, as lm-eval does for an empty context: the first token of every ending then has a
    prediction to be scored from, instead of the row failing the whole eval."""
    context, endings = render(row, style)
    if style == "nanogpt":
        return Group(tuple(encode(enc, context)) or (EOT_TOKEN,), tuple(tuple(encode(enc, e)) for e in endings))
    # lm-eval's TemplateLM._encode_pair: trailing spaces move to the continuation, then split
    n_spaces = len(context) - len(context.rstrip())
    conts = []
    ctx_enc: list[int] = []
    for e in endings:
        c, cont = context, e
        if n_spaces:
            cont, c = c[-n_spaces:] + cont, c[:-n_spaces]
        ctx_enc = encode(enc, c)
        conts.append(tuple(encode(enc, c + cont)[len(ctx_enc) :]))
    return Group(tuple(ctx_enc) or (EOT_TOKEN,), tuple(conts))


def _stderr(hits: Sequence[bool]) -> float:
    """Standard error of a mean of 0/1 outcomes (sample std / sqrt(n), as lm-eval)."""
    n = len(hits)
    if n < 2:
        return float("nan")
    p = sum(hits) / n
    return math.sqrt(p * (1 - p) * n / (n - 1) / n)


def predictions(scores: Sequence[Sequence]) -> tuple[list[int], list[int]]:
    """(argmax sum log-prob, argmin mean loss) per example."""
    acc, norm = [], []
    for s in scores:
        acc.append(max(range(len(s)), key=lambda j: s[j].logprob))
        norm.append(max(range(len(s)), key=lambda j: s[j].logprob / s[j].n_tokens))
    return acc, norm


def evaluate(
    model: GPT,
    enc,
    rows: Sequence[dict[str, Any]],
    batch_size: int = 32,
    device: str | torch.device | None = None,
    dtype: str = "auto",
    style: str = "nanogpt",
) -> dict[str, Any]:
    """Metrics over ``rows``: acc, acc_norm, their stderr, n, per-example predictions, seconds."""
    t0 = time.time()
    groups = [tokenize(enc, r, style) for r in rows]
    scores = score_groups(model, groups, batch_size=batch_size, device=device, dtype=dtype)
    acc_pred, norm_pred = predictions(scores)
    labels = [r["label"] for r in rows]
    acc_hits = [p == y for p, y in zip(acc_pred, labels)]
    norm_hits = [p == y for p, y in zip(norm_pred, labels)]
    n = len(rows)
    return {
        "metrics": {"acc": sum(acc_hits) / max(n, 1), "acc_norm": sum(norm_hits) / max(n, 1)},
        "stderr": {"acc": _stderr(acc_hits), "acc_norm": _stderr(norm_hits)},
        "n": n,
        "predictions": {"acc": acc_pred, "acc_norm": norm_pred},
        "elapsed_s": time.time() - t0,
    }


@torch.inference_mode()
def score_example_unbatched(model: GPT, group: Group, device: str | torch.device) -> list[tuple[float, int]]:
    """build-nanogpt's loop body: one example (4 padded rows) per forward, full logits everywhere.

    Returns (sum log-prob, n tokens) per ending. The reference for tests and the baseline of
    ``bench/hellaswag.py``; contexts are left-truncated like :func:`evals.scoring.fit_to_window`.
    """
    block = model.config.block_size
    rows, masks = [], []
    for cont in group.continuations:
        toks = list(group.context + cont)[-(block + 1) :]
        n = min(len(cont), len(toks) - 1)
        rows.append(toks)
        masks.append([0] * (len(toks) - n) + [1] * n)
    T = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(m)] = torch.tensor(m)
    tokens, mask = tokens.to(device), mask.to(device)
    # build-nanogpt's evaluation, verbatim but for the padded-vocabulary slice (those ids are no tokens)
    # (a row of block_size + 1 tokens cannot be fed whole; its last position is never needed)
    logits, _ = model(tokens if T <= block else tokens[:, :-1])
    shift_logits = logits[..., : T - 1, :GPT2_VOCAB].contiguous()
    shift_tokens = tokens[..., 1:].contiguous()
    losses = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)).float(), shift_tokens.view(-1), reduction="none")
    shift_mask = mask[..., 1:].contiguous()
    lp = -losses.view(tokens.size(0), -1) * shift_mask
    return [(float(lp[i].sum()), int(shift_mask[i].sum())) for i in range(len(rows))]
