"""Benchmarks of the data stage, each against a baseline measured in the same run.

Default mode: the stage's tokenize+shard waves vs raw tiktoken on the same documents, the same
number of threads (Ray workers vs ``encode_ordinary_batch`` threads); the ratio of their tokens/s is
what the pipeline costs on top of tiktoken (the stdlib-docs corpus repeated with a per-copy marker;
dedup off).

    python bench/dataprep.py --mb 40 --workers 2

``--signatures``: the MinHash signature step alone, ``dataprep.minhash`` vs datatrove's
``MinhashDedupSignature`` (same settings: 5-grams, 14 buckets x 8 hashes, seed 1, SHA-1 64-bit), on
the same documents held in memory, each side in ``--workers`` processes (one rank each); the files
must be identical. Prints both wall times and the ratio (goal >= 3).

    python bench/dataprep.py --signatures --mb 40 --workers 2

``--e2e``: the whole data stage (exact + MinHash dedup, tokenize, shards) against datatrove's own
``LocalPipelineExecutor`` pipeline for the same job (exact dedup signatures → find → MinHash
signatures → buckets → cluster → filter + tokenize with the `tokenizers` GPT-2 built from the same
ranks), same MinHash settings, same worker count, on a generated corpus (English-like text from the
Python documentation's vocabulary, with 5% exact and 5% near duplicates planted after their
originals). Each side runs in its own process; the parent samples the RSS of that process tree
(every 0.25 s) for peak memory. Prints per-stage wall times, docs kept, peak memory, and the ratios
(goal >= 2.5 end to end, the same documents kept).

    python bench/dataprep.py --e2e --mb 300 --workers 2 [--corpus DIR (kept, reused)]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# This file shares its name with the `dataprep` package: drop bench/ from the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from dataprep import pipeline  # noqa: E402
from dataprep.config import DataConfig  # noqa: E402
from dataprep.sources import build_python_docs_corpus  # noqa: E402
from dataprep.tokenizer import check_gpt2, default_ranks_path, get_gpt2  # noqa: E402


def make_corpus(directory: Path, megabytes: float, files: int) -> list[str]:
    base = pq.read_table(build_python_docs_corpus(directory / "base.parquet")).column("text").to_pylist()
    texts: list[str] = []
    copy = 0
    while sum(map(len, texts)) < megabytes * 1e6:
        texts.extend(f"[copy {copy}] {t}" for t in base)
        copy += 1
    per = -(-len(texts) // files)
    for f in range(files):
        part = texts[f * per : (f + 1) * per]
        pq.write_table(pa.table({"text": part}), directory / f"part_{f:03d}.parquet", row_group_size=1000)
    (directory / "base.parquet").unlink()
    return texts


def tokenize_mode(args: argparse.Namespace) -> None:
    """The stage's tokenize+shard waves vs raw ``encode_ordinary_batch`` on the same documents."""
    enc = get_gpt2(args.tokenizer_file)
    ranks = check_gpt2(enc)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        texts = make_corpus(tmp / "src", args.mb, args.files)
        mb = sum(len(t.encode()) for t in texts) / 1e6

        # Baseline: raw tiktoken over the same documents, same thread count.
        t0 = time.perf_counter()
        encoded = enc.encode_ordinary_batch(texts, num_threads=args.workers)
        raw_s = time.perf_counter() - t0
        n_tokens = sum(len(e) for e in encoded) + len(texts)  # + one EOT per document, as the pipeline writes
        del encoded

        import ray

        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING")
        cfg = DataConfig(source=str(tmp / "src"), output_dir=str(tmp / "out"), tokenizer_file=args.tokenizer_file,
                         chunk_docs=args.chunk_docs, exact_dedup=False, minhash_dedup=False,
                         shard_tokens=5_000_000, val_tokens=0)
        waves = pipeline._Waves()
        manifest = pipeline._build(cfg, ranks, waves)
        ray.shutdown()
        stage_s = waves.seconds["tokenize"] + waves.seconds["shards"]
        total = manifest["stats"]["tokens"]["train"]
        assert total == n_tokens, (total, n_tokens)

    raw_tps, stage_tps = n_tokens / raw_s, n_tokens / stage_s
    print(f"corpus: {len(texts)} docs, {mb:.1f} MB, {n_tokens} tokens; {args.workers} workers/threads; cpus {os.cpu_count()}")
    print(f"raw encode_ordinary_batch : {raw_tps / 1e6:6.3f} M tokens/s ({raw_s:.2f} s)")
    print(f"tokenize+shard stage      : {stage_tps / 1e6:6.3f} M tokens/s ({stage_s:.2f} s: tokenize {waves.seconds['tokenize']:.2f} + shards {waves.seconds['shards']:.2f})")
    print(f"ratio stage/raw           : {stage_tps / raw_tps:.3f}  (target >= 0.9)")
    sys.stdout.flush()




# ---------------------------------------------------------------------------------------------
# a corpus with planted duplicates (--e2e, --signatures)

QUOTES = ("“{}”", "‘{}’", "«{}»")
ACCENTED = ("café", "naïve", "résumé", "Zürich", "São Paulo", "façade", "coöperate", "Ångström")


class EnglishLike:
    """Documents of words drawn from the Python documentation's vocabulary by Zipf frequency, in
    sentences and paragraphs, with numbers, curly quotes, dashes and a few accented words (so the
    non-ASCII paths of the normalisation are exercised as in web text)."""

    def __init__(self, cache: Path, seed: int) -> None:
        import collections
        import re

        texts = pq.read_table(build_python_docs_corpus(cache / "python-docs.parquet")).column("text").to_pylist()
        counts = collections.Counter(w for t in texts for w in re.findall(r"[a-z]{2,}", t.lower()))
        self.vocab = np.array([w for w, _ in counts.most_common(20_000)], dtype=object)
        weights = 1.0 / np.arange(1, len(self.vocab) + 1) ** 1.05
        self.cdf = np.cumsum(weights) / weights.sum()
        self.rng = np.random.default_rng(seed)

    def words(self, n: int) -> list[str]:
        """``n`` words drawn by frequency."""
        return self.vocab[np.searchsorted(self.cdf, self.rng.random(n))].tolist()

    def doc(self) -> str:
        """Sentences of 6-24 words, paragraphs of 5 sentences; random draws made per document."""
        rng = self.rng
        words = self.words(int(np.clip(rng.lognormal(6.35, 0.6), 40, 6000)))
        ends = np.cumsum(rng.integers(6, 25, len(words) // 6 + 2))
        ends = [*ends[ends < len(words)].tolist(), len(words)]
        starts = [0, *ends[:-1]]
        kind, where, number = rng.random(len(ends)).tolist(), rng.random(len(ends)).tolist(), rng.integers(1, 3000, len(ends)).tolist()
        stop = rng.integers(0, 6, len(ends)).tolist()
        for i, (a, b) in enumerate(zip(starts, ends)):
            words[a] = words[a].capitalize()
            j = a + int(where[i] * (b - a))  # a word of this sentence
            if kind[i] < 0.05:
                words[j] = f"{words[j]} {number[i]}"
            elif kind[i] < 0.08:
                words[j] = f"{words[j]} {number[i] / 7:.1f}"
            elif kind[i] < 0.12:
                words[j] = QUOTES[number[i] % len(QUOTES)].format(words[j])
            elif kind[i] < 0.15:
                words[j] = f"{words[j]} —"
            elif kind[i] < 0.16:
                words[j] = f"{words[j]} {ACCENTED[number[i] % len(ACCENTED)]}"
            words[b - 1] += ".\n\n" if i % 5 == 4 else (".", ".", ".", "?", "!", ", and")[stop[i]]
        return " ".join(words).replace("\n\n ", "\n\n").strip()

    def near_copy(self, text: str) -> str:
        """About 1% of the words replaced (at least one): 5-gram Jaccard ~0.9, found by MinHash."""
        words = text.split(" ")
        for i in self.rng.integers(0, len(words), max(1, len(words) // 100)).tolist():
            words[i] = self.words(1)[0]
        return " ".join(words)


def make_dedup_corpus(directory: Path, megabytes: float, files: int, seed: int = 0) -> dict[str, int]:
    """Parquet files (``id``, ``text``; row groups of 1,000) of about ``megabytes`` of text in which
    5% of documents are exact copies (half of them re-cased and re-spaced: still exact after the
    normalisation both sides use) and 5% near copies of an earlier document."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = EnglishLike(directory.parent, seed)
    pool: list[str] = []  # originals that later documents copy (bounded: memory stays flat)
    counts = {"docs": 0, "exact": 0, "near": 0, "bytes": 0}
    per_file = megabytes * 1e6 / files
    for f in range(files):
        ids, texts, size = [], [], 0
        while size < per_file:
            r = gen.rng.random()
            if pool and r < 0.05:
                text, kind = pool[int(gen.rng.integers(len(pool)))], "exact"
                if r < 0.025:
                    text = "  " + text.upper().replace(" ", "  ")
            elif pool and r < 0.10:
                text, kind = gen.near_copy(pool[int(gen.rng.integers(len(pool)))]), "near"
            else:
                text, kind = gen.doc(), "doc"
                pool.append(text) if len(pool) < 5000 else pool.__setitem__(int(gen.rng.integers(5000)), text)
            counts[kind if kind != "doc" else "docs"] += 1
            ids.append(f"{kind}-{sum(counts[k] for k in ('docs', 'exact', 'near')):07d}")
            texts.append(text)
            size += len(text.encode())
        pq.write_table(pa.table({"id": ids, "text": texts}), directory / f"part_{f:03d}.parquet", row_group_size=1000)
        counts["bytes"] += size
    counts["docs"] += counts["exact"] + counts["near"]
    return counts


def corpus_texts(directory: Path) -> list[str]:
    return [t for f in sorted(directory.glob("*.parquet")) for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]


# ---------------------------------------------------------------------------------------------
# the two sides of --e2e, each run in its own process (python bench/dataprep.py --side NAME ...)


def normalised_text(doc) -> str:
    """datatrove's exact-dedup key: the text with case and whitespace normalised, as ours."""
    return " ".join(doc.text.lower().split())


def run_ours(corpus: Path, work: Path, workers: int, tokenizer_file: str) -> dict:
    """``pretrain data`` on the corpus (exact + MinHash dedup on, the default config otherwise, but
    a 1M-token validation split) with a local Ray of ``workers`` CPUs; seconds per wave."""
    from dataprep.config import RayConfig
    from dataprep.local_ray import start_ray, stop_ray

    t0 = time.perf_counter()
    ranks = check_gpt2(get_gpt2(tokenizer_file))
    cfg = DataConfig(source=str(corpus), output_dir=str(work / "out"), tokenizer_file=tokenizer_file, val_tokens=1_000_000)
    start_ray(RayConfig(num_cpus=workers))
    seconds = {"start ray": time.perf_counter() - t0}
    waves = pipeline._Waves()
    manifest = pipeline._build(cfg, ranks, waves)
    stop_ray()
    seconds.update(waves.seconds)
    stats = manifest["stats"]
    return {"seconds": seconds, "total_s": time.perf_counter() - t0, "docs_kept": stats["docs_kept"],
            "tokens": stats["tokens"]["train"] + stats["tokens"]["val"], "removed": stats["removed"]}


def hf_gpt2_tokenizer(ranks_file: Path, out: Path) -> Path:
    """A `tokenizers` GPT-2 (tokenizer.json) built offline from the tiktoken ranks: vocabulary =
    ranks with GPT-2's byte-to-unicode map, merges = every split of a token into two tokens,
    ordered by the merged token's rank (transformers' TikTokenConverter does the same)."""
    from tiktoken.load import load_tiktoken_bpe
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    byte_char = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
    ranks = load_tiktoken_bpe(str(ranks_file))
    text = lambda token: "".join(byte_char[b] for b in token)  # noqa: E731
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges.extend((rank, ranks[a], ranks[b], a, b) for a, b in splits)
    merges.sort()
    tok = Tokenizer(models.BPE(vocab={text(t): r for t, r in ranks.items()}, merges=[(text(a), text(b)) for *_, a, b in merges], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    assert tok.token_to_id("<|endoftext|>") == 50256
    tok.save(str(out))
    return out


def run_datatrove(corpus: Path, work: Path, workers: int, tokenizer_file: str) -> dict:
    """datatrove's LocalPipelineExecutor pipeline for the same job; seconds per stage."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    from dataprep.dedup import RegexWordTokenizer, minhash_config

    t0 = time.perf_counter()
    tokenizer = hf_gpt2_tokenizer(Path(tokenizer_file or default_ranks_path()), work / "gpt2-tokenizer.json")
    mh, ex, w = minhash_config(DataConfig()), ExactDedupConfig(content_getter=normalised_text), str(work)
    seconds = {"build tokenizer": time.perf_counter() - t0}
    reader = lambda: ParquetReader(str(corpus), glob_pattern="*.parquet", text_key="text", id_key="id")  # noqa: E731
    stages = [
        ("exact signatures", [reader(), ExactDedupSignature(f"{w}/ex_sigs", config=ex)], workers, workers),
        ("exact find", [ExactFindDedups(f"{w}/ex_sigs", f"{w}/ex_dups", config=ex)], 1, 1),
        ("minhash signatures", [reader(), ExactDedupFilter(f"{w}/ex_dups", config=ex),
                                MinhashDedupSignature(f"{w}/mh_sigs", config=mh, language=RegexWordTokenizer())], workers, workers),
        ("minhash buckets", [MinhashDedupBuckets(f"{w}/mh_sigs", f"{w}/mh_buckets", config=mh)], mh.num_buckets, workers),
        ("minhash clusters", [MinhashDedupCluster(f"{w}/mh_buckets", f"{w}/mh_remove", config=mh)], 1, 1),
        ("filter + tokenize", [reader(), ExactDedupFilter(f"{w}/ex_dups", config=ex), MinhashDedupFilter(f"{w}/mh_remove"),
                               DocumentTokenizer(f"{w}/tokens", tokenizer_name_or_path=str(tokenizer), eos_token="<|endoftext|>",
                                                 shuffle_documents=False)], workers, workers),
    ]  # fmt: skip
    for i, (name, steps, tasks, n_workers) in enumerate(stages):
        t = time.perf_counter()
        LocalPipelineExecutor(pipeline=steps, tasks=tasks, workers=n_workers, logging_dir=f"{w}/logs/{i}").run()
        seconds[name] = time.perf_counter() - t
    tokens = sum(p.stat().st_size for p in (work / "tokens").glob("*.ds")) // 2
    docs = sum(p.stat().st_size for p in (work / "tokens").glob("*.ds.index")) // 8
    return {"seconds": seconds, "total_s": time.perf_counter() - t0, "docs_kept": docs, "tokens": tokens}


SIDES = {"ours": run_ours, "datatrove": run_datatrove}


def _sample_tree(proc: subprocess.Popen, memory: dict) -> None:
    """Until ``proc`` exits: every 0.25 s, the RSS of it and all its descendants (peak of the sum,
    peak of one process), and the CPU time of every process seen (its last reading)."""
    import psutil

    root, cpu = psutil.Process(proc.pid), {}
    while proc.poll() is None:
        rss = []
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for p in tree:
            try:
                with p.oneshot():
                    rss.append(p.memory_info().rss / 2**20)
                    times = p.cpu_times()
                    cpu[(p.pid, p.create_time())] = times.user + times.system
            except psutil.Error:
                pass
        memory["peak_total_mb"] = max(memory["peak_total_mb"], sum(rss))
        memory["peak_process_mb"] = max([memory["peak_process_mb"], *rss])
        memory["cpu_s"] = sum(cpu.values())
        time.sleep(0.25)


def run_side(name: str, corpus: Path, work: Path, workers: int, tokenizer_file: str) -> tuple[dict, dict]:
    """Run one side in a fresh process; sample its process tree's memory and CPU while it runs."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", name, "--corpus", str(corpus), "--work", str(work),
           "--workers", str(workers), "--tokenizer-file", tokenizer_file]
    memory = {"peak_total_mb": 0.0, "peak_process_mb": 0.0, "cpu_s": 0.0}
    with open(work / f"{name}.stderr.log", "w") as log:  # progress bars and datatrove's task logs
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        sampler = threading.Thread(target=_sample_tree, args=(proc, memory), daemon=True)
        sampler.start()
        out, _ = proc.communicate()
        sampler.join()
    if proc.returncode != 0:
        sys.stderr.write((work / f"{name}.stderr.log").read_text()[-5000:])
        raise SystemExit(f"{name} side failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1]), memory


# ---------------------------------------------------------------------------------------------
# --signatures and --e2e

_TEXTS: list[str] = []  # the documents, set before the worker processes fork


def _sign_part(side: str, rank: int, workers: int, out: str) -> None:
    part = _TEXTS[rank * len(_TEXTS) // workers : (rank + 1) * len(_TEXTS) // workers]
    cfg = DataConfig()
    if side == "ours":
        from dataprep import dedup

        dedup.write_signatures(part, rank, workers, Path(out), cfg)
    else:
        from datatrove.data import Document
        from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
        from loguru import logger

        from dataprep.dedup import RegexWordTokenizer, minhash_config

        logger.disable("datatrove")
        step = MinhashDedupSignature(output_folder=out, config=minhash_config(cfg), language=RegexWordTokenizer())
        step.run((Document(text=t, id=str(i)) for i, t in enumerate(part)), rank=rank, world_size=workers)


def _time_signatures(side: str, workers: int, out: Path) -> tuple[float, float]:
    """Wall and CPU seconds (the worker processes' user + system time) of one side."""
    import multiprocessing
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.starmap(_sign_part, [(side, r, workers, str(out)) for r in range(workers)])
        pool.close()
        pool.join()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def signatures_mode(args: argparse.Namespace, corpus: Path, tmp: Path) -> None:
    """The MinHash signature step alone, both sides on the same in-memory documents, in
    ``--rounds`` alternating rounds (on a shared machine the load changes between them)."""
    _TEXTS[:] = corpus_texts(corpus)
    import datatrove.pipeline.dedup.minhash  # noqa: F401  (imported before the fork, as ours)

    mb = sum(len(t.encode()) for t in _TEXTS) / 1e6
    print(f"signatures: {len(_TEXTS)} docs, {mb:.1f} MB, {args.workers} worker processes per side; cpus {os.cpu_count()}")
    ratios = []
    for r in range(args.rounds):
        (wall_dt, cpu_dt), (wall_ours, cpu_ours) = (_time_signatures(side, args.workers, tmp / f"{side}{r}") for side in ("datatrove", "ours"))
        print(f"round {r + 1}: datatrove MinhashDedupSignature {wall_dt:7.2f} s wall ({mb / wall_dt:.2f} MB/s), {cpu_dt:7.2f} s CPU")
        print(f"         dataprep.minhash               {wall_ours:7.2f} s wall ({mb / wall_ours:.2f} MB/s), {cpu_ours:7.2f} s CPU")
        print(f"         ratio datatrove/ours: wall {wall_dt / wall_ours:.2f}, CPU {cpu_dt / cpu_ours:.2f}")
        ratios.append(wall_dt / wall_ours)
    files = sorted(p.relative_to(tmp / "ours0") for p in (tmp / "ours0").rglob("*.minhash.sig"))
    same = len(files) == len(list((tmp / "datatrove0").rglob("*.minhash.sig"))) == args.workers * DataConfig().minhash_buckets
    same = same and all((tmp / "ours0" / f).read_bytes() == (tmp / "datatrove0" / f).read_bytes() for f in files)
    print(f"files identical: {same} ({len(files)} files)")
    print(f"ratio datatrove/ours (wall, median of {args.rounds} rounds): {float(np.median(ratios)):.2f}  (goal >= 3)")
    if not same:
        raise SystemExit("signature files differ")


def e2e_mode(args: argparse.Namespace, corpus: Path, tmp: Path) -> None:
    """The whole stage vs datatrove's pipeline: per-stage seconds, docs kept, peak memory, ratios."""
    results = {}
    for side in ("ours", "datatrove"):
        (tmp / side).mkdir()
        results[side] = run_side(side, corpus, tmp / side, args.workers, args.tokenizer_file)
        print(f"{side} done in {results[side][0]['total_s']:.1f} s", file=sys.stderr, flush=True)
    mb = sum(p.stat().st_size for p in corpus.glob("*.parquet")) / 1e6
    print(f"corpus: {corpus} ({mb:.0f} MB of parquet); {args.workers} workers per side; cpus {os.cpu_count()}")
    for side, (res, mem) in results.items():
        stages = ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items())
        print(f"{side:>9}: {res['total_s']:7.1f} s  [{stages}]")
        print(f"{'':>9}  docs kept {res['docs_kept']}, tokens {res['tokens']}; CPU {mem['cpu_s']:.0f} s (sampled); peak RSS all "
              f"processes {mem['peak_total_mb'] / 1024:.2f} GB, largest process {mem['peak_process_mb'] / 1024:.2f} GB")
    ours, theirs = results["ours"], results["datatrove"]
    print(f"removed by ours: {ours[0]['removed']}")
    print(f"same docs kept: {ours[0]['docs_kept'] == theirs[0]['docs_kept']}")
    sig_ratio = theirs[0]["seconds"]["minhash signatures"] / ours[0]["seconds"]["minhash signatures"]
    print(f"ratio minhash signatures (datatrove/ours): {sig_ratio:.2f}  (goal >= 3)")
    print(f"ratio end to end (datatrove/ours): {theirs[0]['total_s'] / ours[0]['total_s']:.2f}  (goal >= 2.5)")
    print(f"ratio CPU time, sampled (datatrove/ours): {theirs[1]['cpu_s'] / ours[1]['cpu_s']:.2f}")
    print(f"ratio peak memory (datatrove/ours): {theirs[1]['peak_total_mb'] / ours[1]['peak_total_mb']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--e2e", action="store_true", help="whole stage vs datatrove's pipeline")
    mode.add_argument("--signatures", action="store_true", help="MinHash signature step vs datatrove's")
    mode.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)  # one side of --e2e (internal)
    ap.add_argument("--mb", type=float, default=None, help="corpus size in MB of text (default 40; --e2e 300)")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers = tiktoken threads = datatrove workers")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--chunk-docs", type=int, default=4000, help="default mode only")
    ap.add_argument("--rounds", type=int, default=1, help="--signatures: alternating rounds of both sides")
    ap.add_argument("--corpus", default="", help="--e2e/--signatures: corpus directory, generated there if empty (kept)")
    ap.add_argument("--work", default="", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer-file", default="", help="GPT-2 ranks file (default: the usual lookup)")
    args = ap.parse_args()
    if args.side:
        print(json.dumps(SIDES[args.side](Path(args.corpus), Path(args.work), args.workers, args.tokenizer_file)), flush=True)
        return
    if not (args.e2e or args.signatures):
        args.mb, args.files = args.mb or 40.0, 4 if args.files == 8 else args.files
        return tokenize_mode(args)
    args.mb = args.mb or (300.0 if args.e2e else 40.0)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        corpus = Path(args.corpus) if args.corpus else tmp / "corpus"
        if not any(corpus.glob("*.parquet")):
            t0 = time.perf_counter()
            counts = make_dedup_corpus(corpus, args.mb, args.files)
            print(f"generated {corpus}: {counts} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        (e2e_mode if args.e2e else signatures_mode)(args, corpus, tmp)


if __name__ == "__main__":
    main()
