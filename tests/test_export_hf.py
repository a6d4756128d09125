"""`pretrain export hf`: a checkpoint leaves the project as a directory real `transformers` loads
offline, computing our logits, with a tokenizer that gives tiktoken's ids; refusals write nothing."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from pipelines.cli import main
from tests.conftest import skip_or_fail
from trainer.checkpoint import MARKER, MODEL_FILE, write_checkpoint
from trainer.model import GPT, GPT2_VOCAB, GPTConfig

REPO = Path(__file__).resolve().parents[1]
# the shapes GPT-2's class must express: biases and dropout as trained, or no biases at all
SHAPES = {
    "bias": GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=48),
    "nobias-dropout": GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, bias=False, dropout=0.1),
}
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 12:30, isn't it? I'll see, we'd've said.",
    "Ünïcödé: naïve café, 日本語のテキスト, Привет мир, مرحبا, 🙂🚀👩‍👩‍👧 \u200b\u00a0zero-width",
    "whitespace runs:   three,\t\ttabs,\n\n\nnewlines,  \r\n  mixed \u3000ideographic   ",
    "<|endoftext|>a document<|endoftext|> <|endoftext|>\n<|endoftext",
    "numbers 0 1 12 123 1234 12345 123456789 3.14159 -2.5e-10 1,000,000 ٣٤٥",
    'def f(x: int) -> dict[str, int]:\n    """Doc."""\n    return {"a": x ** 2}  # ok\n\n\tif x != 0: pass\n',
    "",
    " ",
    "a" * 300 + " " + "ab" * 150 + "!!!???" * 20,
]


def _checkpoint(run_dir: Path, cfg: GPTConfig, seed: int, ranks: str, state_edit=None) -> Path:
    """A committed checkpoint written by the trainer's own writer, every weight random (biases and
    LayerNorms too, so a mis-mapped or dropped tensor changes the logits)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    state = model.state_dict()
    if state_edit:
        state = state_edit(state)
    meta = {"step": 20, "model": {**cfg.__dict__}, "config": {"data": {"tokenizer_file": ranks}}, "tokens_seen": 2560,
            "data_fingerprint": "test"}
    return write_checkpoint(run_dir, 20, state, {"state": {}}, {"step": 20}, meta)


def _ours(ckpt: Path) -> GPT:
    from trainer.checkpoint import load_model_for_eval

    return load_model_for_eval(ckpt)[0]


@pytest.fixture(scope="module")
def hf():
    try:
        import transformers
    except ImportError as e:
        skip_or_fail(f"transformers is not installed (the [hf] extra): {e}")
        raise
    return transformers


@pytest.fixture(scope="module")
def export(tmp_path_factory, gpt2_ranks, hf):
    """shape name -> (checkpoint, export dir, shape), exported once through the CLI into an existing
    empty OUT_DIR (which is allowed)."""
    done: dict[str, tuple[Path, Path, GPTConfig]] = {}

    def get(name: str) -> tuple[Path, Path, GPTConfig]:
        if name not in done:
            cfg = SHAPES[name]
            root = tmp_path_factory.mktemp(f"export-{name}")
            ckpt = _checkpoint(root / "run", cfg, seed=3, ranks=gpt2_ranks)
            out = root / "hf"
            out.mkdir()
            assert main(["export", "hf", str(ckpt), str(out)]) == 0
            done[name] = (ckpt, out, cfg)
        return done[name]

    return get


@pytest.mark.parametrize("shape", list(SHAPES))
def test_transformers_loads_it_offline_with_our_logits(shape, export, hf, monkeypatch):
    ckpt, out, cfg = export(shape)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = hf.GPT2LMHeadModel.from_pretrained(out, local_files_only=True).float().eval()
    conf = json.loads((out / "config.json").read_text())
    assert (conf["n_positions"], conf["n_layer"], conf["n_head"], conf["n_embd"]) == (cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd)
    assert conf["vocab_size"] == GPT2_VOCAB and conf["activation_function"] == "gelu_new"
    assert conf["bos_token_id"] == conf["eos_token_id"] == 50256 and conf["resid_pdrop"] == cfg.dropout
    # weights in safetensors (no pickle), the LM head tied to the un-padded embedding
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("transformer.wte.weight").shape == (GPT2_VOCAB, cfg.n_embd)
    assert "lm_head.weight" not in keys and not list(out.glob("*.bin"))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()

    ours = _ours(ckpt)
    ids = torch.randint(0, GPT2_VOCAB, (3, cfg.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(ids)[0][..., :GPT2_VOCAB]
        got = model(ids).logits
    assert want.abs().max() > 1.0  # logits far from zero: the comparison means something
    assert (got - want).abs().max().item() < 1e-4

    # greedy generation through generation_config.json continues as ours does
    prompt = ids[:1, :8]
    assert hf.GenerationConfig.from_pretrained(out).eos_token_id == 50256
    theirs = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=50256, eos_token_id=None)
    assert theirs.tolist() == ours.generate(prompt, 8, greedy=True).tolist()

    info = json.loads((out / "pretrain_export.json").read_text())
    assert info["step"] == 20 and info["checkpoint"] == str(ckpt.resolve()) and info["verified"]["max_abs_logit_diff"] < 1e-4
    assert info["model_sha256"] == json.loads((ckpt / MARKER).read_text())["files"][MODEL_FILE]


def _stdlib_text(limit: int = 300_000) -> str:
    """Real, varied text: Python standard library sources (code, comments, docstrings, non-ASCII)."""
    import argparse
    import difflib
    import email.utils
    import json.decoder

    parts = [Path(m.__file__).read_text(encoding="utf-8") for m in (argparse, difflib, json.decoder, email.utils)]
    parts.append((REPO / "README.md").read_text(encoding="utf-8"))
    return "\n".join(parts)[:limit]


def test_tokenizer_ids_equal_tiktoken(export, hf, gpt2_ranks, tmp_path):
    """The ids the data stage gave the model are the ids HF's tokenizer gives, on any text."""
    from dataprep.tokenizer import get_gpt2
    from trainer.export_hf import bytes_to_unicode

    _, out, _ = export("bias")
    enc = get_gpt2(gpt2_ranks)
    # the directory's files as shipped (tokenizer.json), and vocab.json + merges.txt alone (what
    # tools that rebuild the tokenizer from the BPE files, or older transformers, read)
    bare = tmp_path / "bpe-files-only"
    bare.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copy(out / name, bare / name)
    texts = TEXTS + [_stdlib_text()]
    for where in (out, bare):
        tok = hf.AutoTokenizer.from_pretrained(where, local_files_only=True)
        assert len(tok) == GPT2_VOCAB and tok.eos_token_id == tok.bos_token_id == 50256
        for text in texts:
            ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
            assert ids == enc.encode(text, allowed_special="all"), (where.name, text[:80])
            # as the data stage tokenizes documents: `<|endoftext|>` in the text is plain text
            plain = tok(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
            assert plain == enc.encode_ordinary(text), (where.name, text[:80])
            assert tok.decode(ids) == text
    # every one of the 50,257 tokens stands for the same bytes as in tiktoken
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    pieces = tok.convert_ids_to_tokens(list(range(GPT2_VOCAB - 1)))
    assert [bytes(to_byte[c] for c in p) for p in pieces] == [enc.decode_single_token_bytes(i) for i in range(GPT2_VOCAB - 1)]
    assert len((out / "merges.txt").read_text(encoding="utf-8").splitlines()) == 1 + 50_000


def test_lm_eval_hf_backend_scores_it_as_ours(export, hf, gpt2_ranks, tmp_path):
    """The README's `lm_eval --model hf --model_args pretrained=OUT_DIR` route, through lm-eval's
    own HF backend (offline, local HellaSwag rows): same per-choice log-likelihoods as our scorer."""
    from dataprep.tokenizer import get_gpt2
    from evals import data, hellaswag
    from evals.scoring import score_groups
    from tests.evals_helpers import hellaswag_rows, write_jsonl

    ckpt, out, _ = export("bias")
    rows = hellaswag_rows(12, seed=5)
    path = write_jsonl(tmp_path / "hellaswag_val.jsonl", rows)
    include, _ = data.harness_include_dir(["hellaswag"], data_source="local", hellaswag_path=str(path), into=tmp_path / "tasks")
    import lm_eval
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={out},dtype=float32,device=cpu", tasks=["hellaswag"], batch_size=4,
        task_manager=TaskManager(include_path=str(include)), log_samples=True,
    )
    samples = sorted(res["samples"]["hellaswag"], key=lambda s: s["doc_id"])
    assert len(samples) == 12
    loaded, _ = data.load_hellaswag(str(path))
    enc = get_gpt2(gpt2_ranks)
    scores = score_groups(_ours(ckpt), [hellaswag.tokenize(enc, r, "harness") for r in loaded], batch_size=4)
    for s, sc in zip(samples, scores):
        assert [r[0][0] for r in s["resps"]] == pytest.approx([x.logprob for x in sc], abs=1e-3)


# ------------------------------------------------------------------------------------------ refusals


def _run(capsys, *args: str) -> tuple[int, str]:
    code = main(["export", "hf", *map(str, args)])
    return code, capsys.readouterr().err


def _left_behind(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


def test_refusals_exit_2_and_write_nothing(tmp_path, gpt2_ranks, hf, capsys):
    cfg = SHAPES["bias"]
    ckpt = _checkpoint(tmp_path / "run", cfg, seed=1, ranks=gpt2_ranks)
    out = tmp_path / "out"

    code, err = _run(capsys, tmp_path / "nowhere", out)
    assert code == 2 and "no such checkpoint" in err and not out.exists()

    # not committed: the marker is what makes a checkpoint exist
    uncommitted = tmp_path / "uncommitted" / "checkpoints" / ckpt.name
    shutil.copytree(ckpt, uncommitted)
    (uncommitted / MARKER).unlink()
    code, err = _run(capsys, uncommitted, out)
    assert code == 2 and "not a committed checkpoint" in err and not out.exists()

    # committed, then a file changed under it
    corrupt = tmp_path / "corrupt" / "checkpoints" / ckpt.name
    shutil.copytree(ckpt, corrupt)
    with open(corrupt / MODEL_FILE, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\0" * 8)
    code, err = _run(capsys, corrupt, out)
    assert code == 2 and "corrupt" in err and not out.exists()

    # an OUT_DIR with something in it is never overwritten
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(capsys, ckpt, out)
    assert code == 2 and "not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

    # an LM head that is not the token embedding: GPT-2's class cannot express it
    def untie(state):
        state = {k: v.clone() for k, v in state.items()}
        state["lm_head.weight"] += 1.0
        return state

    untied = _checkpoint(tmp_path / "untied", cfg, seed=1, ranks=gpt2_ranks, state_edit=untie)
    code, err = _run(capsys, untied, tmp_path / "out2")
    assert code == 2 and "ties them" in err and not (tmp_path / "out2").exists()
    assert _left_behind(tmp_path) == []

    # a file where OUT_DIR's parent should be: no rerun can create it
    (tmp_path / "afile").write_text("mine")
    code, err = _run(capsys, ckpt, tmp_path / "afile" / "out")
    assert code == 2 and "cannot create its parent directory" in err and (tmp_path / "afile").read_text() == "mine"

    # a run dir stands for its newest committed checkpoint
    code, _ = _run(capsys, tmp_path / "run", tmp_path / "from-run-dir")
    assert code == 0 and json.loads((tmp_path / "from-run-dir" / "pretrain_export.json").read_text())["checkpoint"] == str(ckpt.resolve())


def test_without_transformers_it_names_the_extra(tmp_path, gpt2_ranks, capsys, monkeypatch):
    """Without the [hf] extra (transformers not importable) the command says what to install."""
    ckpt = _checkpoint(tmp_path / "run", SHAPES["bias"], seed=1, ranks=gpt2_ranks)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    code, err = _run(capsys, ckpt, tmp_path / "out")
    assert code == 2 and 'pip install -e ".[hf]"' in err and not (tmp_path / "out").exists()


def test_a_stop_signal_mid_export_exits_3_and_leaves_nothing(tmp_path, gpt2_ranks, hf):
    """SIGTERM (preemption, scancel) while the export verifies what it wrote, and a second one while
    it cleans up: exit 3, OUT_DIR never created, no temporary directory left beside it."""
    from tests.signal_helpers import run_signalled

    ckpt = _checkpoint(tmp_path / "run", SHAPES["bias"], seed=1, ranks=gpt2_ranks)
    out = tmp_path / "out"
    r = run_signalled("trainer.export_hf:verify_export", "before", "export", "hf", str(ckpt), str(out), twice=True)
    assert r.returncode == 3 and "pretrain export hf: stopped by SIGTERM" in r.stderr, r.stdout + r.stderr
    assert not out.exists() and _left_behind(tmp_path) == []


class _RunsCode:
    """What a planted model.pt could hold: unpickling it would run a command."""

    def __reduce__(self):
        import os

        return (os.system, ("touch PLANTED_CODE_RAN",))


def _recommit(ckpt: Path) -> None:
    """Rewrite the commit marker's hashes, as if the damage below had been committed (a bug, an
    edit, a planted file): verification then passes and only loading can tell."""
    from common.durable import file_sha256

    marker = json.loads((ckpt / MARKER).read_text())
    marker["files"] = {name: file_sha256(ckpt / name) for name in marker["files"]}
    (ckpt / MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize("damage, message", [
    ("meta-torn", "meta.json is unreadable"),
    ("meta-list", "meta.json is not a checkpoint's metadata"),
    ("meta-shape", "the weights do not fit the model shape in meta.json"),
    ("meta-no-shape", "meta.json has no usable 'model' shape"),
    ("planted-pickle", "model.pt cannot be loaded as weights"),
])
def test_an_unloadable_committed_checkpoint_is_refused_by_eval_and_export(tmp_path, gpt2_ranks, hf, capsys, monkeypatch, damage, message):
    """No traceback and exit 1 ("a rerun may help") for a checkpoint no rerun can load: exit 2,
    naming the file, with nothing written and no code from the run dir run."""
    monkeypatch.chdir(tmp_path)
    ckpt = _checkpoint(tmp_path / "run", SHAPES["bias"], seed=1, ranks=gpt2_ranks)
    meta = json.loads((ckpt / "meta.json").read_text())
    if damage == "meta-torn":
        (ckpt / "meta.json").write_bytes(json.dumps(meta).encode()[:30] + b"\xff")
    elif damage == "meta-list":
        (ckpt / "meta.json").write_text("[1, 2]")
    elif damage in ("meta-shape", "meta-no-shape"):
        meta["model"] = {**meta["model"], "n_embd": 128} if damage == "meta-shape" else None
        (ckpt / "meta.json").write_text(json.dumps(meta))
    else:
        torch.save({"transformer.wte.weight": _RunsCode()}, ckpt / MODEL_FILE)
    _recommit(ckpt)
    code, err = _run(capsys, ckpt, tmp_path / "out")
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and _left_behind(tmp_path) == []
    assert main(["eval", str(ckpt), "--limit", "2", "eval.tracking_uri=none"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (ckpt / "evals").exists() and not (tmp_path / "PLANTED_CODE_RAN").exists()
