"""The `data` and `ray` sections of a run config."""

from __future__ import annotations

import re
from dataclasses import dataclass

TOKENIZERS = ("gpt2",)
MAX_SHARD_TOKENS = 2**31 - 1  # dataprep.shards: the header's token count is an int32
# ray.address: "auto", HOST:PORT, or a Ray client URL (ray://HOST:PORT)
RAY_ADDRESS_RE = re.compile(r"^(auto|(ray://)?[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5})$")


def _at_least(obj: object, low: int, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value < low:
            raise ValueError(f"{key} must be >= {low}, got {value}")


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
    # Documents, at least this many tokens, go into the validation shard(s): a seeded random
    # sample of whole documents (with shuffle_seed -1: the first documents in corpus order).
    val_tokens: int = 100_000_000
    # The train documents are packed in a seeded random order (and validation is sampled with the
    # same seed), so consecutive training batches are not neighbours in the corpus. -1 = off:
    # corpus order (source file order, then row order), as datasets built before this key.
    shuffle_seed: int = 1234
    # Delete the intermediate work directory once the manifest is committed.
    keep_work: bool = False

    def validate(self) -> None:
        """Checks that need neither the data nor the network (whether ``source`` exists is the data
        stage's to say: this config is also loaded where the data is not, e.g. by an eval job)."""
        for key in ("source", "output_dir", "cache_dir", "text_column"):
            if not getattr(self, key).strip():
                raise ValueError(f"{key} must not be empty")
        _at_least(self, 0, "max_files", "download_retries", "minhash_seed", "val_tokens")
        _at_least(self, 1, "chunk_docs", "minhash_ngrams", "minhash_buckets", "minhash_hashes_per_bucket")
        if not 1 <= self.shard_tokens <= MAX_SHARD_TOKENS:
            raise ValueError(f"shard_tokens must be between 1 and {MAX_SHARD_TOKENS}, got {self.shard_tokens}")
        if not -1 <= self.shuffle_seed < 2**63:
            raise ValueError(f"shuffle_seed must be -1 (off, corpus order) or between 0 and 2**63-1, got {self.shuffle_seed}")
        if self.minhash_seed >= 2**32:
            raise ValueError(f"minhash_seed must be < 2**32, got {self.minhash_seed}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got '{self.tokenizer}'")


@dataclass
class RayConfig:
    """Ray cluster used by the data stage, and the SLURM job it runs in (`pretrain data --executor slurm`)."""

    # Empty: start a local Ray instance; otherwise an existing cluster ("auto", "ray://host:10001").
    address: str = ""
    # CPUs for a local instance (0 = all of this machine's).
    num_cpus: int = 0

    # The data stage's SLURM job: `nodes` > 1 starts a Ray cluster across the allocation (the head
    # on the first node, workers on the others); 1 runs a local instance on the one node.
    nodes: int = 1
    cpus_per_node: int = 0  # 0 = slurm.cpus_per_task
    mem_gb: int = 0  # per node; 0 = slurm.mem_gb (0 there too: the partition's default)
    partition: str = ""  # "" = slurm.partition; several separated by ","
    account: str = ""  # "" = slurm.account
    qos: str = ""  # "" = slurm.qos
    time: str = "24:00:00"

    def validate(self) -> None:
        """Numbers here; the names and the time reach the ``#SBATCH`` lines of the data job and get
        the ``slurm.*`` rules where the config is composed (``pipelines.config``: dataprep does not
        import slurm/)."""
        if self.num_cpus < 0:
            raise ValueError(f"num_cpus must be >= 0 (0 = all of this machine's), got {self.num_cpus}")
        if self.address and not RAY_ADDRESS_RE.match(self.address):
            raise ValueError(f"address must be empty (a local instance), auto, HOST:PORT or ray://HOST:PORT, got '{self.address}'")
        _at_least(self, 1, "nodes")
        _at_least(self, 0, "cpus_per_node", "mem_gb")
