"""GPT-2 model: shapes, parameter counts, init, tying, HF loading, KV-cached generation."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ModelConfig
from trainer.model import GPT, GPTConfig, build_model, resolve_config


def micro(**kw) -> GPT:
    torch.manual_seed(0)
    return build_model(ModelConfig(name="micro", **kw))


def test_gpt2_param_counts_match_nanogpt():
    with torch.device("meta"):
        padded = build_model(ModelConfig(name="gpt2"))
        unpadded = build_model(ModelConfig(name="gpt2", vocab_size=50257))
    assert padded.num_params() == 124_475_904
    assert unpadded.num_params() == 124_439_808
    # nanoGPT's non-embedding count (drops wte and wpe): 85.06M
    assert unpadded.num_params(non_embedding=True) == 85_056_000
    assert "124,475,904 total" in padded.summary()


def test_presets_and_overrides():
    cfg = resolve_config(ModelConfig(name="gpt2-medium"))
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (24, 16, 1024, 1024)
    assert resolve_config(ModelConfig(name="gpt2-xl")).n_embd == 1600
    tiny = resolve_config(ModelConfig(name="tiny", n_layer=6))
    assert (tiny.n_layer, tiny.n_head, tiny.n_embd, tiny.block_size) == (6, 4, 128, 128)
    with pytest.raises(ValueError, match="n_layer"):
        resolve_config(ModelConfig(name="custom"))
    with pytest.raises(ValueError, match="multiple of model.n_head"):
        resolve_config(ModelConfig(name="tiny", n_head=3))


def test_forward_shapes_and_initial_loss():
    m = micro()
    x = torch.randint(0, 50257, (3, 17))
    y = torch.randint(0, 50257, (3, 17))
    logits, loss = m(x, y)
    assert logits.shape == (3, 17, 50304)
    # at init the prediction is near uniform over the padded vocab
    assert abs(loss.item() - math.log(50304)) < 0.3
    logits2, loss2 = m(x)
    assert loss2 is None and torch.equal(logits, logits2)
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 65, dtype=torch.long))


def test_weights_are_tied():
    m = micro()
    assert m.lm_head.weight is m.transformer.wte.weight
    sd = m.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    # counted once
    assert m.num_params() == sum(p.numel() for n, p in m.named_parameters())


def test_init_std_and_residual_scaling():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=32)
    m = GPT(cfg)
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    for block in m.transformer.h:
        assert block.attn.c_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
        assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.count_nonzero(block.attn.c_attn.bias) == 0
    assert m.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert m.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(m.transformer.ln_f.weight == 1)


def test_flops_per_token():
    m = micro()
    c = m.config
    n = m.num_params() - c.block_size * c.n_embd
    assert m.flops_per_token(64) == 6 * n + 12 * c.n_layer * c.n_embd * 64


# ------------------------------------------------------------------ Hugging Face import


def _hf_reference_logits(sd: dict, cfg: dict, idx: torch.Tensor) -> torch.Tensor:
    """GPT-2 forward written against HF's tensor layout (Conv1D: y = x @ W + b, W of shape (in, out))."""
    def conv1d(x, name):
        return x @ sd[name + ".weight"] + sd[name + ".bias"]

    def ln(x, name):
        return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)

    B, T = idx.shape
    H, C = cfg["n_head"], cfg["n_embd"]
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}"
        q, k, v = conv1d(ln(x, p + ".ln_1"), p + ".attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(C // H)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + conv1d(y, p + ".attn.c_proj")
        h = F.gelu(conv1d(ln(x, p + ".ln_2"), p + ".mlp.c_fc"), approximate="tanh")
        x = x + conv1d(h, p + ".mlp.c_proj")
    return ln(x, "transformer.ln_f") @ sd["transformer.wte.weight"].T


def _write_hf_dir(path, n_layer=2, n_head=2, n_embd=32, n_pos=64, vocab=50257):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    sd = {"transformer.wte.weight": r(vocab, n_embd), "transformer.wpe.weight": r(n_pos, n_embd)}
    for i in range(n_layer):
        p = f"transformer.h.{i}"
        sd.update({
            f"{p}.ln_1.weight": 1 + r(n_embd), f"{p}.ln_1.bias": r(n_embd),
            f"{p}.attn.c_attn.weight": r(n_embd, 3 * n_embd), f"{p}.attn.c_attn.bias": r(3 * n_embd),
            f"{p}.attn.c_proj.weight": r(n_embd, n_embd), f"{p}.attn.c_proj.bias": r(n_embd),
            f"{p}.ln_2.weight": 1 + r(n_embd), f"{p}.ln_2.bias": r(n_embd),
            f"{p}.mlp.c_fc.weight": r(n_embd, 4 * n_embd), f"{p}.mlp.c_fc.bias": r(4 * n_embd),
            f"{p}.mlp.c_proj.weight": r(4 * n_embd, n_embd), f"{p}.mlp.c_proj.bias": r(n_embd),
            # the causal-mask buffer old HF checkpoints carry: must be ignored
            f"{p}.attn.bias": torch.ones(1, 1, n_pos, n_pos).tril(),
        })
    sd["transformer.ln_f.weight"] = 1 + r(n_embd)
    sd["transformer.ln_f.bias"] = r(n_embd)
    cfg = {"model_type": "gpt2", "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "n_positions": n_pos,
           "n_ctx": n_pos, "vocab_size": vocab, "activation_function": "gelu_new"}
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    torch.save(sd, path / "pytorch_model.bin")  # lm_head omitted: tied, as HF saves it
    return sd, cfg


def test_from_pretrained_local_hf_directory(tmp_path):
    sd, cfg = _write_hf_dir(tmp_path / "hf")
    model = GPT.from_pretrained(tmp_path / "hf")
    assert model.config.vocab_size == 50257 and model.config.n_layer == 2
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, sd["transformer.h.1.mlp.c_fc.weight"].t())
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        ref = _hf_reference_logits(sd, cfg, idx)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)

    padded = GPT.from_pretrained(tmp_path / "hf", vocab_size=50304)
    with torch.no_grad():
        logits, _ = padded(idx)
    assert logits.shape[-1] == 50304
    torch.testing.assert_close(logits[..., :50257], ours, rtol=1e-5, atol=1e-5)


def test_from_pretrained_rejects_other_architectures(tmp_path):
    _write_hf_dir(tmp_path / "hf")
    sd = torch.load(tmp_path / "hf" / "pytorch_model.bin", weights_only=True)
    sd["transformer.h.0.attn.q_proj.weight"] = sd.pop("transformer.h.0.attn.c_attn.weight")
    torch.save(sd, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="not a GPT-2 checkpoint"):
        GPT.from_pretrained(tmp_path / "hf")


# ------------------------------------------------------------------ generation


def test_kv_cache_greedy_equals_no_cache():
    m = micro()
    prompt = torch.randint(0, 50257, (2, 7), generator=torch.Generator().manual_seed(3))
    # 7 + 70 tokens crosses block_size 64: exercises the sliding-window fallback too
    cached = m.generate(prompt, 70, greedy=True, use_cache=True)
    plain = m.generate(prompt, 70, greedy=True, use_cache=False)
    assert cached.shape == (2, 77)
    assert torch.equal(cached, plain)
    assert torch.equal(cached[:, :7], prompt)
    assert int(cached.max()) < 50257  # padded vocabulary entries are never produced


def test_kv_cache_logits_match_full_forward():
    m = micro().eval()
    idx = torch.randint(0, 50257, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, _ = m(idx)
        logits, _, past = m._forward(idx[:, :12])
        steps = [logits]
        for t in range(12, 20):
            logits, _, past = m._forward(idx[:, t : t + 1], past=past)
            steps.append(logits)
        # several new tokens after a non-empty cache
        chunk, _, _ = m._forward(idx[:, 15:], past=[(k[:, :, :15], v[:, :, :15]) for k, v in past])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunk, full[:, 15:], rtol=1e-5, atol=1e-5)


def test_sampling_is_reproducible_with_seeded_generator():
    m = micro()
    prompt = torch.tensor([[50256, 15496, 11]])
    a = m.generate(prompt, 20, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(7))
    b = m.generate(prompt, 20, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(7))
    c = m.generate(prompt, 20, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # top_k=1 sampling is greedy
    g = m.generate(prompt, 10, top_k=1, generator=torch.Generator().manual_seed(9))
    assert torch.equal(g, m.generate(prompt, 10, greedy=True))
    # a stop request cuts generation short
    assert m.generate(prompt, 10, greedy=True, should_stop=lambda: True).shape == prompt.shape
    assert m.training  # generate restores the mode it found


def test_runtime_settings_are_checked_and_the_config_knows_the_models_backends():
    from trainer import config as train_config
    from trainer.config import TrainConfig
    from trainer.model import SDPA_BACKENDS, sdpa_backend_problem

    assert set(train_config.SDPA_BACKENDS) == set(SDPA_BACKENDS)  # the config (no torch import) mirrors the model's
    for kw, key in (({"sdpa_backend": "fast"}, "sdpa_backend"), ({"compile_mode": "fastest"}, "compile_mode"),
                    ({"loss_chunk_tokens": -1}, "loss_chunk_tokens")):
        with pytest.raises(ValueError, match=key):
            TrainConfig(**kw).validate()
    assert "no CPU kernel" in sdpa_backend_problem("cudnn", "cpu")
    assert sdpa_backend_problem("cudnn", "cuda") is None and sdpa_backend_problem("math", "cpu") is None
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        micro().set_runtime(loss_chunk_tokens=-1)
    with pytest.raises(ValueError, match="sdpa_backend"):
        micro().set_runtime(sdpa_backend="fast")
