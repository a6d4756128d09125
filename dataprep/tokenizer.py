"""GPT-2 BPE through tiktoken, usable offline.

`tiktoken.get_encoding("gpt2")` downloads its two vocabulary files on first use, which fails on
air-gapped clusters and in CI. The same ranks are published as one file (`r50k_base.tiktoken`,
sha256 306cd27f…dd930); with it we build an Encoding identical to tiktoken's "gpt2". Whatever the
source, the ranks are hashed in the canonical `.tiktoken` serialisation and checked against that
published hash, so a data manifest can record *which* tokenizer made its shards.
"""

from __future__ import annotations

import base64
import functools
import glob
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from common.durable import atomic_write_bytes

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TOKEN = 50256
N_VOCAB = 50257
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
GPT2_DATA_GYM_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)
# The sdist of this PyPI package ships the ranks as whisper/assets/gpt2.tiktoken.
WHISPER_SDIST = "openai-whisper==20250625"


class TokenizerUnavailable(RuntimeError):
    """No local copy of the GPT-2 ranks and no network to fetch them."""


def pretrain_cache_dir() -> Path:
    return Path(os.environ.get("PRETRAIN_CACHE_DIR", "~/.cache/pretrain")).expanduser()


def default_ranks_path() -> Path:
    return pretrain_cache_dir() / "tokenizers" / "gpt2.tiktoken"


def _tiktoken_cache_path(url: str) -> Path | None:
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache_dir == "":
        return None
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()


def ranks_sha256(enc: tiktoken.Encoding) -> str:
    """sha256 of the ranks in `.tiktoken` form: equals the published file hash for GPT-2."""
    ranks = enc._mergeable_ranks  # noqa: SLF001 - the only way to read them back
    h = hashlib.sha256()
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        h.update(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return h.hexdigest()


def _from_ranks_file(path: str | Path) -> tiktoken.Encoding:
    from tiktoken_ext.openai_public import r50k_pat_str

    path = Path(path).expanduser()
    try:
        ranks = load_tiktoken_bpe(str(path), expected_hash=GPT2_RANKS_SHA256)
    except ValueError as e:
        raise TokenizerUnavailable(f"{path}: not the GPT-2 ranks file (sha256 must be {GPT2_RANKS_SHA256})") from e
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=N_VOCAB,
    )


@functools.lru_cache(maxsize=4)
def get_gpt2(ranks_file: str = "") -> tiktoken.Encoding:
    """The GPT-2 encoding, from (in order) an explicit ranks file, tiktoken's cache, our cache, the network.

    Cached per process: Ray workers build it once and reuse it for every task.
    """
    if ranks_file:
        if not Path(ranks_file).expanduser().is_file():
            raise TokenizerUnavailable(f"data.tokenizer_file: {ranks_file} does not exist")
        return _from_ranks_file(ranks_file)
    gym = [_tiktoken_cache_path(u) for u in GPT2_DATA_GYM_URLS]
    if all(p is not None and p.is_file() for p in gym):
        return tiktoken.get_encoding("gpt2")  # the normal route, served from tiktoken's cache
    for candidate in (_tiktoken_cache_path(R50K_URL), default_ranks_path()):
        if candidate is not None and candidate.is_file():
            return _from_ranks_file(candidate)
    try:
        return tiktoken.get_encoding("gpt2")  # online: tiktoken downloads and caches it
    except Exception as e:  # noqa: BLE001 - any network failure means the same thing here
        raise TokenizerUnavailable(
            "cannot load the GPT-2 tokenizer: no local ranks file and the download failed "
            f"({type(e).__name__}). Run `pretrain tokenizer fetch` (needs only PyPI), or set "
            "data.tokenizer_file to a gpt2.tiktoken / r50k_base.tiktoken file."
        ) from e


def check_gpt2(enc: tiktoken.Encoding) -> str:
    """Verify `enc` is exactly GPT-2 and return its ranks hash."""
    digest = ranks_sha256(enc)
    if digest != GPT2_RANKS_SHA256 or enc.eot_token != EOT_TOKEN or enc.n_vocab != N_VOCAB:
        raise TokenizerUnavailable(f"tokenizer is not GPT-2: ranks sha256 {digest}, eot {enc.eot_token}")
    return digest


def fetch_offline_ranks(dest: Path | None = None) -> Path:
    """Put the GPT-2 ranks file in our cache using only PyPI (no access to the BPE's usual host).

    `pip download` fetches the openai-whisper sdist, whose `whisper/assets/gpt2.tiktoken` is the
    r50k_base ranks file; it is verified against tiktoken's published hash before it is installed.
    """
    dest = Path(dest) if dest else default_ranks_path()
    if dest.is_file():
        _from_ranks_file(dest)  # verifies the hash
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp, WHISPER_SDIST],
            check=True,
        )
        (sdist,) = glob.glob(os.path.join(tmp, "*.tar.gz"))
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            data = tar.extractfile(member).read()
    if hashlib.sha256(data).hexdigest() != GPT2_RANKS_SHA256:
        raise TokenizerUnavailable(f"{sdist}: gpt2.tiktoken does not have the published GPT-2 hash")
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, data)
    return dest
