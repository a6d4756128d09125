"""Export a committed checkpoint as a Hugging Face GPT-2 directory (``pretrain export hf``).

The result loads offline with ``transformers.GPT2LMHeadModel.from_pretrained(OUT_DIR)`` and
``AutoTokenizer.from_pretrained(OUT_DIR)``, so the model can leave this project: the Hub,
``lm_eval --model hf``, vLLM, any ``transformers`` code. What it holds and why:

* ``model.safetensors``: our parameter names are already HF's (``trainer.model``); the four
  ``nn.Linear`` matrices of each block are transposed back to HF's ``Conv1D`` (in, out) layout,
  the embedding is un-padded from 50304 to the 50257 real rows (the padded rows are never
  targets), and ``lm_head`` is omitted: GPT-2 ties it to ``wte`` (``tie_word_embeddings``), as
  ours does. A model trained with ``bias: false`` gets zero biases, which computes the same
  function. Safetensors, never a pickle: loading it runs no code.
* ``config.json`` / ``generation_config.json``: GPT-2's fields with our shape (``n_positions`` =
  block size, ``gelu_new`` = our tanh-approximated GELU, LayerNorm eps 1e-5, ``<|endoftext|>``
  = 50256 as BOS and EOS, dropout as trained).
* ``vocab.json`` + ``merges.txt`` + ``tokenizer.json`` (+ ``tokenizer_config.json``): made from the
  *same* tiktoken ranks the data stage tokenized with (``dataprep.tokenizer``, hash-checked). BPE
  ranks are not a merge list, so the merges are recovered: for each token of rank r, running
  tiktoken's own merge rule (lowest-ranked adjacent pair first) on its bytes with only ranks below
  r leaves exactly two parts, which are its merge; ordered by r these are GPT-2's 50,000 merges.
  Bytes are written through GPT-2's ``bytes_to_unicode`` table, as byte-level BPE files expect.
* ``pretrain_export.json``: provenance (source checkpoint, step, tokens seen, data fingerprint,
  hashes) and the verification figures below.

Before the directory gets its final name, the export is loaded back with ``transformers`` and
checked: logits equal ours (fp32, max abs diff < 1e-4) and the tokenizer's ids equal tiktoken's on
a sample text. Everything is written in a temporary directory next to ``OUT_DIR`` (files fsynced)
and renamed at the end, so ``OUT_DIR`` is either absent or complete; an existing non-empty
``OUT_DIR`` is refused, never overwritten.

Needs the ``[hf]`` extra (``transformers``, ``safetensors``); without it the export is refused with
the install line. This module imports nothing from ``pipelines``: the stage owns its export.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from common.durable import fsync_dir
from dataprep.tokenizer import EOT_TOKEN, N_VOCAB, TokenizerUnavailable, check_gpt2, get_gpt2
from trainer.checkpoint import MARKER, MODEL_FILE, CheckpointError, latest_committed, model_from_weights, read_weights
from trainer.model import GPT, GPTConfig

HF_EXTRA_HINT = 'pip install -e ".[hf]"'
EOT_TEXT = "<|endoftext|>"
# our nn.Linear weights that HF's GPT-2 stores as Conv1D (in_features, out_features)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MAX_LOGIT_DIFF = 1e-4  # fp32: HF's eager attention and our SDPA differ only by rounding
EXPORT_INFO = "pretrain_export.json"
# what the verification tokenizes: words, digits, code, whitespace runs, non-Latin scripts, emoji
CHECK_TEXT = (
    "Hello, I'm a language model! It's 2024: 3.14159 × 10^3 = 3141.59.\n\n"
    "def f(x):\n\treturn x  ** 2  # ok\n   \n"
    "Ünïcödé — naïve café; 日本語のテキスト; Привет, мир; 🙂🚀 \u200b end  "
)


class ExportError(RuntimeError):
    """The export is refused: fix the input (checkpoint, output dir, install) and run it again."""

    exit_code = 2


class ExportFailed(ExportError):
    """The export ran but did not verify or could not be written; nothing was left under OUT_DIR."""

    exit_code = 1


def require_hf() -> None:
    """Raise ExportError naming the extra to install unless transformers and safetensors import."""
    try:
        import safetensors.torch  # noqa: F401
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ExportError(f"exporting to Hugging Face format needs transformers and safetensors ({e}); install them with: {HF_EXTRA_HINT}") from e


# --------------------------------------------------------------------------------------------
# tokenizer: tiktoken ranks -> byte-level BPE vocab and merges


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the
    other 68 bytes to code points from 256 up, so every byte-level token is a visible string."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merge_parts(token: bytes, rank: int, ranks: dict[bytes, int]) -> list[bytes]:
    """tiktoken's BPE on ``token``'s bytes using only ranks below ``rank``: the lowest-ranked
    adjacent pair merges first, until no pair is a lower-ranked token."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best: tuple[int, int] | None = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE ``vocab`` (token string -> id) and ``merges`` (in priority order) that
    tokenize exactly as tiktoken does with ``ranks`` (module doc)."""
    to_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_char[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _merge_parts(token, rank, ranks)
        if len(parts) != 2:
            raise ExportError(f"BPE rank {rank} ({token!r}) is not the merge of two lower-ranked tokens; not a byte-level BPE vocabulary")
        merges.append((text(parts[0]), text(parts[1])))
    return vocab, merges


def _tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]]) -> str:
    """The ``tokenizers`` serialisation of GPT-2's tokenizer (what fast tokenizers and vLLM load)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOT_TEXT, special=True, normalized=False)])
    if tok.token_to_id(EOT_TEXT) != EOT_TOKEN:
        raise ExportError(f"{EOT_TEXT} did not get id {EOT_TOKEN} in the tokenizer")
    return tok.to_str(pretty=True)


def tokenizer_files(enc, block_size: int) -> dict[str, str]:
    """File name -> contents of the GPT-2 tokenizer files for the tiktoken encoding ``enc``."""
    vocab, merges = bpe_vocab_and_merges(enc._mergeable_ranks)  # noqa: SLF001 - the only way to read them
    vocab[EOT_TEXT] = EOT_TOKEN
    eot = {"content": EOT_TEXT, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "add_bos_token": False,
        "bos_token": EOT_TEXT,
        "eos_token": EOT_TEXT,
        "unk_token": EOT_TEXT,
        "model_max_length": block_size,
        # False: decode(encode(text)) == text (True would rewrite " ." to "." and the like)
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "added_tokens_decoder": {str(EOT_TOKEN): eot},
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer.json": _tokenizer_json(vocab, merges),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps({"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}, indent=2) + "\n",
    }


# --------------------------------------------------------------------------------------------
# model: our state dict -> GPT2LMHeadModel's


def model_config(cfg: GPTConfig) -> dict[str, Any]:
    """``config.json`` of a GPT2LMHeadModel computing the same function as ``GPT(cfg)``."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": N_VOCAB,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,  # read by old transformers versions
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 * n_embd, as ours
        "activation_function": "gelu_new",  # GELU with the tanh approximation
        "layer_norm_epsilon": 1e-5,  # torch.nn.LayerNorm's default, which ours uses
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def generation_config() -> dict[str, Any]:
    return {"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN}


def _expected_keys(cfg: GPTConfig) -> set[str]:
    keys = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "lm_head.weight"}
    for i in range(cfg.n_layer):
        for name in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            keys.add(f"transformer.h.{i}.{name}.weight")
            if cfg.bias:
                keys.add(f"transformer.h.{i}.{name}.bias")
    if cfg.bias:
        keys.add("transformer.ln_f.bias")
    return keys


def hf_state_dict(state: dict[str, torch.Tensor], cfg: GPTConfig, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel tensors (contiguous, fp32, lm_head left to the tie) from our ``state``.

    Refuses (ExportError) what GPT-2's class cannot express exactly: unknown or missing tensors,
    an LM head that is not the token embedding, a vocabulary smaller than GPT-2's.
    """
    expected = _expected_keys(cfg)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ExportError(f"{source}: tensors do not match a GPT of this shape (missing {missing[:4]}, unexpected {unexpected[:4]}); cannot map it to GPT-2")
    if cfg.vocab_size < N_VOCAB:
        raise ExportError(f"{source}: vocab_size {cfg.vocab_size} is smaller than GPT-2's {N_VOCAB}")
    if cfg.n_embd % cfg.n_head:
        raise ExportError(f"{source}: n_embd {cfg.n_embd} is not a multiple of n_head {cfg.n_head}")
    if not torch.equal(state["lm_head.weight"], state["transformer.wte.weight"]):
        raise ExportError(f"{source}: lm_head.weight differs from transformer.wte.weight; GPT-2 ties them, so this model cannot be expressed")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            continue  # tied: GPT2LMHeadModel takes it from wte
        value = value.detach().to("cpu", torch.float32)
        if key == "transformer.wte.weight":
            value = value[:N_VOCAB]
        elif key.endswith(CONV1D_WEIGHTS):
            value = value.t()
        out[key] = value.contiguous()
    if not cfg.bias:  # bias: false = zero biases, the same function
        width = {"ln_1": cfg.n_embd, "ln_2": cfg.n_embd, "attn.c_attn": 3 * cfg.n_embd, "attn.c_proj": cfg.n_embd,
                 "mlp.c_fc": 4 * cfg.n_embd, "mlp.c_proj": cfg.n_embd}  # fmt: skip
        for i in range(cfg.n_layer):
            for name, n in width.items():
                out[f"transformer.h.{i}.{name}.bias"] = torch.zeros(n)
        out["transformer.ln_f.bias"] = torch.zeros(cfg.n_embd)
    return out


# --------------------------------------------------------------------------------------------
# the export


def resolve_checkpoint(path: str | Path) -> Path:
    """A committed checkpoint dir, or a run dir (its newest committed checkpoint)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    if path.is_dir() and (newest := latest_committed(path)) is not None:
        return newest
    if not path.exists():
        raise ExportError(f"{path}: no such checkpoint or run directory")
    raise ExportError(f"{path}: not a committed checkpoint (no {MARKER}) nor a run dir with one; refusing to export it")


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ExportError(f"{out_dir}: exists and is not a directory; refusing to overwrite it")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir}: exists and is not empty; refusing to overwrite it (choose a new OUT_DIR or remove this one)")


def _write_file(path: Path, data: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _tokenizer_for(meta: dict[str, Any]):
    """The tiktoken encoding the run's data stage used (``data.tokenizer_file`` if it still exists)."""
    ranks_file = str(meta.get("config", {}).get("data", {}).get("tokenizer_file") or "")
    if ranks_file and not Path(ranks_file).expanduser().is_file():
        ranks_file = ""  # the file is gone (another machine): any verified copy of the same ranks does
    try:
        enc = get_gpt2(ranks_file)
        check_gpt2(enc)
    except TokenizerUnavailable as e:
        raise ExportError(f"cannot build the tokenizer files: {e}") from e
    return enc


def _model_card(meta: dict[str, Any], ckpt: Path, cfg: GPTConfig) -> str:
    step, tokens = meta.get("step"), meta.get("tokens_seen")
    tokens_text = f"{tokens:,}" if isinstance(tokens, int) else "unknown"
    return (
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n\n"
        f"# GPT-2-shaped model exported by `pretrain export hf`\n\n"
        f"From checkpoint `{ckpt.name}` (step {step}, {tokens_text} training tokens): {cfg.n_layer} layers, "
        f"{cfg.n_head} heads, {cfg.n_embd} embedding, context {cfg.block_size}, GPT-2 tokenizer.\n\n"
        "```python\nfrom transformers import AutoTokenizer, GPT2LMHeadModel\n"
        "model = GPT2LMHeadModel.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)\n```\n\n"
        "Evaluate with lm-evaluation-harness: `lm_eval --model hf --model_args pretrained=PATH --tasks hellaswag`.\n"
        f"Provenance (source checkpoint, data fingerprint, verification): `{EXPORT_INFO}`.\n"
    )


@torch.no_grad()
def verify_export(out: Path, model: GPT, enc, seed: int = 0) -> dict[str, Any]:
    """Load ``out`` with transformers and compare it with ``model`` / ``enc``; raise ExportFailed
    on a mismatch. Returns the figures (max logit difference, tokens compared)."""
    from transformers import AutoTokenizer, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a load the user did not ask for: no "Loading weights" bar
    try:
        hf = GPT2LMHeadModel.from_pretrained(str(out), local_files_only=True).float().eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, N_VOCAB, (2, min(cfg.block_size, 64)), generator=gen)
    ours, _ = model(idx)
    theirs = hf(idx).logits
    diff = float((ours[..., :N_VOCAB].float() - theirs.float()).abs().max())
    if not diff < MAX_LOGIT_DIFF:
        raise ExportFailed(f"{out}: the exported model's logits differ from the checkpoint's by {diff:.3g} (limit {MAX_LOGIT_DIFF}); not exported")
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = CHECK_TEXT + EOT_TEXT + " next document"
    theirs_ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]  # longer than block_size: fine here
    ours_ids = enc.encode(text, allowed_special="all")
    if theirs_ids != ours_ids or tok.decode(theirs_ids) != text:
        raise ExportFailed(f"{out}: the exported tokenizer does not reproduce tiktoken's ids on the check text; not exported")
    return {"max_abs_logit_diff": diff, "logit_positions": int(idx.numel()), "tokenizer_check_tokens": len(ours_ids)}


def _read_checkpoint(ckpt: Path) -> tuple[dict[str, Any], GPTConfig, dict[str, torch.Tensor]]:
    """``(meta, model shape, weights)`` of a committed checkpoint that verifies, else ExportError."""
    try:
        return read_weights(ckpt)
    except CheckpointError as e:
        raise ExportError(f"{ckpt}: cannot read the checkpoint: {e}") from e


def _write_weights(tmp: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    weights = tmp / "model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with open(weights, "rb+") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)  # safetensors creates it 0600; readable like the other files


def _write_rest_and_verify(tmp: Path, model: GPT, enc, meta: dict[str, Any], ckpt: Path) -> dict[str, Any]:
    """Config, tokenizer and card files, the transformers round trip, then the provenance file
    (which records the check's figures). Returns those figures."""
    cfg = model.config
    files = {
        "config.json": json.dumps(model_config(cfg), indent=2) + "\n",
        "generation_config.json": json.dumps(generation_config(), indent=2) + "\n",
        **tokenizer_files(enc, cfg.block_size),
        "README.md": _model_card(meta, ckpt, cfg),
    }
    for name, text in files.items():
        _write_file(tmp / name, text)
    checks = verify_export(tmp, model, enc)
    info = {
        "format": "pretrain-hf-export",
        "format_version": 1,
        "checkpoint": str(ckpt.resolve()),
        "step": meta.get("step"),
        "tokens_seen": meta.get("tokens_seen"),
        "data_fingerprint": meta.get("data_fingerprint"),
        "model_sha256": json.loads((ckpt / MARKER).read_text())["files"][MODEL_FILE],
        "tokenizer_ranks_sha256": check_gpt2(enc),
        "shape": cfg.shape(),
        "verified": checks,
        "time": time.time(),
    }
    _write_file(tmp / EXPORT_INFO, json.dumps(info, indent=2, sort_keys=True) + "\n")
    fsync_dir(tmp)
    return checks


def export_hf(checkpoint: str | Path, out_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """Write the Hugging Face directory of ``checkpoint`` (a committed checkpoint or a run dir) to
    ``out_dir`` (absent or empty). Raises ExportError (refused, exit 2) or ExportFailed (exit 1)."""
    require_hf()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    ckpt = resolve_checkpoint(checkpoint)
    meta, cfg, state = _read_checkpoint(ckpt)
    tensors = hf_state_dict(state, cfg, source=str(ckpt))
    try:
        model = model_from_weights(ckpt, cfg, state).eval()
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    del state
    enc = _tokenizer_for(meta)

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a parent dir should be, no permission: the path must change
        raise ExportError(f"{out_dir}: cannot create its parent directory ({e})") from e
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{int(time.time() * 1000)}"
    try:
        tmp.mkdir()
    except OSError as e:  # a parent that cannot be written to (permissions, a read-only mount): the path must change
        raise ExportError(f"{out_dir}: cannot create the export next to it in {out_dir.parent} ({e}); nothing was written") from e
    t0 = time.time()
    try:
        _write_weights(tmp, tensors)
        del tensors
        checks = _write_rest_and_verify(tmp, model, enc, meta, ckpt)
        try:
            os.rename(tmp, out_dir)  # replaces an empty OUT_DIR; fails if one appeared with contents
        except OSError as e:
            raise ExportError(f"{out_dir}: cannot move the export into place ({e}); it was not overwritten") from e
    except OSError as e:  # disk full, permissions: nothing was put under OUT_DIR; a rerun may succeed
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportFailed(f"{out_dir}: writing the export failed ({e}); nothing was written there") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out_dir.parent)
    log(f"exported {ckpt} (step {meta.get('step')}) to {out_dir} in {time.time() - t0:.1f}s; "
        f"verified with transformers: max |logit diff| {checks['max_abs_logit_diff']:.2e}, tokenizer ids equal tiktoken's")
    return out_dir
