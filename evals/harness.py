"""lm-evaluation-harness adapter: our checkpoints as an ``lm_eval`` model, and one call to run tasks.

``PretrainGPTLM`` (registered as ``pretrain-gpt``) implements the three request types:

* ``loglikelihood``: requests sharing a context (every choice of a multiple-choice question) are
  scored as one packed row, many rows per forward (:mod:`evals.scoring`); context + continuation
  longer than ``block_size`` keep the continuation and lose context from the left, as the
  harness's HF backend does.
* ``loglikelihood_rolling``: the harness's own rolling windows (``get_rolling_token_windows`` +
  ``make_disjoint_window``, EOT as the prefix token), batched across documents.
* ``generate_until``: greedy (or sampled, if a task asks) batched decoding with a KV cache;
  prompts of different lengths are left-padded and masked, so no prompt is cut to fit another.
  Generation stops at any ``until`` string or the EOT token (``<|endoftext|>`` is always a stop
  sequence); the prompt keeps its last ``block_size - max_gen_toks`` tokens.

Usage: ``pretrain eval CHECKPOINT --tasks ...`` (the normal route: results into the run's MLflow
run); from Python, ``lm_eval.simple_evaluate(model=PretrainGPTLM(model=gpt, ...), tasks=[...])`` or,
once this module is imported (the import is what registers the name),
``simple_evaluate(model="pretrain-gpt", model_args="checkpoint=RUN/checkpoints/step_00001000")``.
lm-eval's own ``lm_eval`` command does not import this module, so ``--model pretrain-gpt`` is
unknown there; for the stock CLI export the checkpoint (``pretrain export hf CHECKPOINT OUT_DIR``,
:mod:`trainer.export_hf`) and use ``lm_eval --model hf --model_args pretrained=OUT_DIR``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
# lm-eval's own models ("hf", ...) register themselves only when the registry is first used empty:
# registering ours before importing them would hide them from every later lookup in this process.
import lm_eval.models  # noqa: F401
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from evals.data import BadEvalData
from evals.scoring import Group, autocast_for, encode, masked_forward, resolve_device, score_groups
from trainer.model import GPT, GPT2_VOCAB

EOT_TOKEN = 50256
DEFAULT_MAX_GEN_TOKS = 256


@register_model("pretrain-gpt")
class PretrainGPTLM(TemplateLM):
    """A GPT of this repo (a model object, or a committed checkpoint dir) for lm-eval."""

    def __init__(
        self,
        checkpoint: str | None = None,
        model: GPT | None = None,
        tokenizer=None,
        device: str = "auto",
        batch_size: int | str = 32,
        dtype: str = "auto",
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        **_: Any,  # harness extras (max_batch_size, ...)
    ) -> None:
        super().__init__()
        self._dev = resolve_device(device or "auto")
        if model is None:
            if checkpoint is None:
                raise ValueError("pretrain-gpt needs model= or checkpoint=")
            from trainer.checkpoint import load_model_for_eval

            model, _ = load_model_for_eval(Path(checkpoint), self._dev)
        if tokenizer is None:
            from dataprep.tokenizer import get_gpt2

            tokenizer = get_gpt2()
        self.model = model.to(self._dev).eval()
        self.enc = tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 32
        self.dtype = dtype
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------ harness plumbing

    @property
    def eot_token_id(self) -> int:
        return EOT_TOKEN

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def device(self) -> torch.device:
        return self._dev

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return encode(self.enc, string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.enc.decode(tokens)

    # ------------------------------------------------------------------ log-likelihoods

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Score (context tokens, continuation tokens); requests with equal contexts share a row."""
        by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                results[i] = (0.0, True)  # nothing to score
            else:
                by_context[tuple(ctx)].append(i)
        keys = list(by_context)
        groups = [Group(k, tuple(tuple(requests[i][2]) for i in by_context[k])) for k in keys]
        scores = score_groups(self.model, groups, batch_size=self.batch_size, device=self._dev, dtype=self.dtype)
        for k, sc in zip(keys, scores):
            for i, s in zip(by_context[k], sc):
                results[i] = (s.logprob, s.greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows: list[Group] = []
        owner: list[int] = []
        for i, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
                ),
            ):
                windows.append(Group(tuple(ctx), (tuple(cont),)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, sc in zip(owner, score_groups(self.model, windows, batch_size=self.batch_size, device=self._dev, dtype=self.dtype)):
            totals[i] += sc[0].logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        # one batch shape per distinct generation setting
        buckets: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            buckets[repr(sorted(req.args[1].items(), key=lambda kv: kv[0]))].append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for idxs in buckets.values():
            kwargs = dict(requests[idxs[0]].args[1])
            until = _stop_sequences(kwargs.pop("until", None), self.tok_decode([self.eot_token_id]))
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            max_new = max(1, min(max_new, self.max_length - 1))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            sample = bool(kwargs.pop("do_sample", False)) and temperature > 0
            contexts = []
            for i in idxs:
                ctx = self.tok_encode(requests[i].args[0]) or [self.eot_token_id]
                contexts.append(ctx[-(self.max_length - max_new) :])
            order = sorted(range(len(idxs)), key=lambda j: -len(contexts[j]))
            for s in range(0, len(order), self.batch_size):
                chunk = order[s : s + self.batch_size]
                texts = self._generate([contexts[j] for j in chunk], max_new, until, temperature if sample else 0.0)
                for j, text in zip(chunk, texts):
                    out[idxs[j]] = text
                    self.cache_hook.add_partial("generate_until", requests[idxs[j]].args, text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate(self, contexts: list[list[int]], max_new: int, until: list[str], temperature: float) -> list[str]:
        """Decode a batch of left-padded prompts with a KV cache; returns texts cut at the first stop string."""
        dev, model = self._dev, self.model
        B, L = len(contexts), max(len(c) for c in contexts)
        idx = torch.full((B, L), self.eot_token_id, dtype=torch.long)
        valid = torch.zeros(B, L, dtype=torch.bool)
        for b, c in enumerate(contexts):
            idx[b, L - len(c) :] = torch.tensor(c)
            valid[b, L - len(c) :] = True
        idx, valid = idx.to(dev), valid.to(dev)
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        mask = torch.ones(L, L, dtype=torch.bool, device=dev).tril()[None] & valid[:, None, :]
        mask |= torch.eye(L, dtype=torch.bool, device=dev)[None]  # left padding attends to itself
        lengths = torch.tensor([len(c) for c in contexts], device=dev)
        generator = torch.Generator(device=dev).manual_seed(1234) if temperature > 0 else None
        generated: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        vocab = min(GPT2_VOCAB, model.config.vocab_size)
        with autocast_for(dev, self.dtype):
            hidden, past = masked_forward(model, idx, pos, mask)
            for t in range(max_new):
                logits = F.linear(hidden[:, -1], model.lm_head.weight[:vocab]).float()  # real tokens only
                if temperature > 0:
                    nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
                else:
                    nxt = logits.argmax(-1)
                for b, tok in enumerate(nxt.tolist()):
                    if done[b]:
                        continue
                    if tok == self.eot_token_id:
                        done[b] = True
                        continue
                    generated[b].append(tok)
                    tail = self.tok_decode(generated[b][-64:])
                    if any(u and u in tail for u in until):
                        done[b] = True
                if all(done) or t == max_new - 1:
                    break
                valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=dev)], dim=1)
                hidden, past = masked_forward(model, nxt[:, None], (lengths + t)[:, None], valid[:, None, :], past)
        return [_cut(self.tok_decode(g), until) for g in generated]


def _stop_sequences(until: str | list[str] | None, eos: str) -> list[str]:
    """The task's stop strings plus ``<|endoftext|>`` (as the harness's HF backend does)."""
    out = [until] if isinstance(until, str) else list(until or [])
    if eos not in out:
        out.append(eos)
    return out


def _cut(text: str, until: list[str]) -> str:
    """The text before the first stop sequence (as the harness's HF backend returns it)."""
    for u in until:
        if u:
            text = text.split(u)[0]
    return text


class UnknownTask(BadEvalData):
    """A task name lm-evaluation-harness does not know: a config to fix (exit 2), never retried."""


def unknown_tasks(names: list[str], task_manager: Any = None) -> list[str]:
    """The ``names`` that are neither a task, a group nor a tag of lm-evaluation-harness (its task
    index takes a few seconds to load: pass the ``TaskManager`` already built, if there is one)."""
    from lm_eval.tasks import TaskManager

    known = set((task_manager or TaskManager()).all_tasks)
    return [n for n in names if n not in known]


def run_harness(
    lm: PretrainGPTLM,
    tasks: list[str],
    limit: int = 0,
    num_fewshot: int = 0,
    include_path: Path | None = None,
) -> dict[str, Any]:
    """Run ``tasks`` through ``lm_eval.simple_evaluate``; returns its results dict plus ``elapsed_s``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.time()
    tm = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = unknown_tasks(tasks, tm)
    if unknown:  # else lm-eval fails deep inside with a KeyError, and a retry fails alike
        raise UnknownTask(f"eval.harness_tasks: {', '.join(unknown)}: not a task of lm-evaluation-harness {lm_eval.__version__}")
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot or None,
        limit=limit or None,
        task_manager=tm,
        log_samples=True,
        bootstrap_iters=1000,  # mean metrics use the closed-form stderr; this bounds the rest
    )
    if res is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    res["elapsed_s"] = time.time() - t0
    return res


def task_metrics(res: dict[str, Any], task: str) -> tuple[dict[str, float], dict[str, float], int]:
    """(metrics, stderr, n) of one task from simple_evaluate's results ("acc,none" -> "acc")."""
    metrics, stderr = {}, {}
    for key, value in res["results"].get(task, {}).items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name, filt = key.split(",", 1)
        suffix = "" if filt == "none" else f"_{filt}"
        if name.endswith("_stderr"):
            stderr[name[: -len("_stderr")] + suffix] = float(value)
        else:
            metrics[name + suffix] = float(value)
    n_info = res.get("n-samples", {}).get(task, {})
    n = int(n_info.get("effective", n_info.get("original", 0))) if isinstance(n_info, dict) else 0
    return metrics, stderr, n
