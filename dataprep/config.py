"""The `data` and `ray` sections of a run config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where documents come from, how they are cleaned, and how tokens are sharded."""

    # An HF dataset repo id ("HuggingFaceFW/fineweb-edu"), a local directory or glob of
    # parquet/jsonl(.gz) files (read in place), or a URL / URL glob (file://, https://, hf://),
    # whose files are downloaded into `cache_dir` first.
    source: str = "HuggingFaceFW/fineweb-edu"
    # HF dataset config name; "sample-10BT" → files "sample/10BT/*.parquet" of the repo.
    source_config: str = "sample-10BT"
    # Only the first N source files (0 = all), in sorted order.
    max_files: int = 0
    text_column: str = "text"
    id_column: str = "id"
    # Downloaded source files live here (shared between runs; keyed by URL).
    cache_dir: str = "~/.cache/pretrain/downloads"
    download_retries: int = 4
    # The shard directory the trainer reads (manifest.json + *.bin).
    output_dir: str = "data/fineweb-edu-10BT"

    # Documents per work unit: each (file, row range) chunk is one Ray task per stage.
    chunk_docs: int = 20_000

    exact_dedup: bool = True
    minhash_dedup: bool = True
    minhash_ngrams: int = 5
    minhash_buckets: int = 14
    minhash_hashes_per_bucket: int = 8
    minhash_seed: int = 1

    # "gpt2": tiktoken's GPT-2 BPE (r50k ranks). `tokenizer_file` names a local ranks file
    # (the `gpt2.tiktoken` format) to use offline; empty = tiktoken cache, then our cache.
    tokenizer: str = "gpt2"
    tokenizer_file: str = ""

    # Tokens per uint16 shard (documents never straddle shards, so shards hold at most this).
    shard_tokens: int = 100_000_000
    # The first documents, up to this many tokens, go into the validation shard(s).
    val_tokens: int = 100_000_000
    # Delete the intermediate work directory once the manifest is committed.
    keep_work: bool = False


@dataclass
class RayConfig:
    """Ray cluster used by the data stage."""

    # Empty: start a local Ray instance; otherwise an existing cluster ("auto", "ray://host:10001").
    address: str = ""
    # CPUs for a local instance (0 = all of this machine's).
    num_cpus: int = 0
