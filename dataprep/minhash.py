"""MinHash signatures and LSH buckets, bit for bit those of datatrove's ``MinhashDedupSignature``
and ``MinhashDedupBuckets``, with about a quarter of the CPU time (bench/dataprep.py --signatures).

datatrove spends its time, per document, in Python: ``simplify_text`` removes diacritics one
character at a time, every shingle is joined, encoded and SHA-1-hashed by its own ``hashlib`` call,
and the ``(h * a + b) % p`` permutation divides every (shingle, hash function) pair by
p = 2**61 - 1 with a hardware divide. This module computes the same values in batches of documents:

* **words**: the same normalisation (lowercase, numbers → 0, punctuation → space, NFD without
  nonspacing marks) on UTF-8 bytes, where one ``bytes.translate`` handles all ASCII text and each
  distinct run of non-ASCII characters is mapped once (cached) with datatrove's own table and
  ``unicodedata``. Exact because, after the number substitution (done on the whole text), every
  step acts on single characters except NFD's canonical reordering, which only ever swaps
  adjacent non-starters and so never crosses an ASCII character (a starter): NFD of the whole text
  is the concatenation of NFD of its ASCII pieces (themselves) and of its non-ASCII runs.
  Whitespace normalisation is left out: it only changes what separates the ``\\w+`` words.
* **shingles**: the n-grams of a whole batch are slices of one buffer of space-joined words;
  their SHA-1 is computed for all one-block shingles (≤ 55 bytes: nearly all) at once in numpy,
  the rest with ``hashlib``.
* **permutation**: numpy on cache-sized blocks, with ``x mod p`` as ``(x & p) + (x >> 61)`` (exact
  for a Mersenne prime, checked for the rare sum ≥ p), and a segmented minimum per document.

The files written are datatrove's (``bucket_XXX/RANK.minhash.sig``: sorted records of
``hashes_per_bucket`` little-endian uint64 and the uint32 document index; ``BUCKET_00.dups``: uint32
quadruples), so its cluster step reads them unchanged. tests/test_minhash.py compares the bytes
with datatrove's. Only the configuration the data stage uses is implemented: SHA-1 shingle hashes
of 64 bits, datatrove's default text normalisation, one bucket worker, no index.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from datatrove.utils.text import DEF_TEXT_NORM_CONFIG, NUMBERS_PATTERN, PUNCTUATION_TRANS, simplify_text

from common.durable import atomic_write_bytes

MERSENNE = np.uint64((1 << 61) - 1)  # datatrove's modulus for 64-bit hashes
_WORD = re.compile(r"\w+")  # dataprep.dedup.RegexWordTokenizer's words
_NON_WORD = re.compile(r"\W")
# ASCII bytes after datatrove's punctuation removal; anything that is not a word character can be a
# space, since only the \w+ runs matter.
_ASCII_TABLE = bytes(c if _WORD.fullmatch(chr(c).translate(PUNCTUATION_TRANS)) else 32 for c in range(128)) + bytes(range(128, 256))
_CACHEABLE_RUN = 16  # bytes; longer non-ASCII runs (whole sentences of a non-Latin script) are not cached


def _simplify_run(run: bytes) -> bytes:
    """datatrove's punctuation removal + NFD + combining-mark removal of non-ASCII characters, with
    every non-word character turned into a space (so ``bytes.split`` then finds the words)."""
    text = run.decode("utf-8", "surrogatepass").translate(PUNCTUATION_TRANS)
    text = unicodedata.normalize("NFD", text)
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    return _NON_WORD.sub(" ", text).encode("utf-8", "surrogatepass")


_run_cache: dict[bytes, bytes] = {}


def _map_runs(data: bytes) -> bytes:
    """Apply :func:`_simplify_run` to every run of non-ASCII characters (cached: a corpus has few
    distinct short runs, like curly quotes or accented letters)."""
    if data.isascii():
        return data
    high = np.frombuffer(data, np.uint8) >= 0x80
    bounds = [0, *(np.flatnonzero(high[1:] != high[:-1]) + 1).tolist(), len(data)]
    pieces = [data[lo:hi] for lo, hi in itertools.pairwise(bounds)]  # alternately ASCII and not
    first = 0 if high[0] else 1
    runs = pieces[first::2]
    cache = _run_cache
    if len(cache) > 200_000:
        cache.clear()
    for i, run in enumerate(runs):
        out = cache.get(run)
        if out is None:
            out = _simplify_run(run)
            if len(run) <= _CACHEABLE_RUN:
                cache[run] = out
        runs[i] = out
    pieces[first::2] = runs
    return b"".join(pieces)


def _doc_bytes(text: str) -> bytes:
    """Lowercase and numbers → 0 (datatrove's first steps, on the whole text), then ASCII
    punctuation → space on UTF-8 bytes; non-ASCII characters are left for :func:`_map_runs`.
    (A lone surrogate, which only reaches here from a caller that did not decode strictly, is
    carried through and becomes a separator, as it never is part of a datatrove word.)"""
    return NUMBERS_PATTERN.sub("0", text.lower()).encode("utf-8", "surrogatepass").translate(_ASCII_TABLE)


def exact_words(text: str) -> list[bytes]:
    """The reference: datatrove's ``simplify_text`` then ``\\w+`` words, UTF-8 encoded."""
    return [w.encode("utf-8") for w in _WORD.findall(simplify_text(text, DEF_TEXT_NORM_CONFIG))]


def words(text: str) -> list[bytes]:
    """The words MinHash shingles (UTF-8), equal to :func:`exact_words` for every text."""
    return _map_runs(_doc_bytes(text)).split()


def normalised_batch(texts: list[str]) -> bytes:
    """Every document's words (see :func:`words`), separated by spaces (runs of them), each
    document ended by a newline: the input of :func:`shingle_spans`."""
    return _map_runs(b"\n".join([_doc_bytes(t) for t in texts]) + b"\n")


# ---------------------------------------------------------------------------------------------
# SHA-1 of many short messages at once (FIPS 180-4), for the first 8 digest bytes


_SHA1_INIT = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0)
_SHA1_K = (0x5A827999, 0x6ED9EBA1, 0x8F1BBCDC, 0xCA62C1D6)
MAX_ONE_BLOCK = 55  # longest message whose padding fits one 64-byte block
MIN_VECTOR_BATCH = 4096  # below this many messages, hashlib's per-call cost beats numpy's per-pass cost
_SHA1_LANES = 16384  # messages per numpy pass: the ~11 arrays of 64 KiB a round touches stay in L2


def _sha1_rounds(w: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The 80 rounds over one 512-bit block per lane (``w``: 16 uint32 message words, overwritten
    by the schedule). Returns digest words h0, h1. Variables rotate by renaming; every op writes
    into an existing buffer, so a round costs ~14 numpy calls and no allocation."""
    n = len(w[0])
    a, b, c, d, e = (np.full(n, h, np.uint32) for h in _SHA1_INIT)
    t1, t2 = np.empty(n, np.uint32), np.empty(n, np.uint32)
    for t in range(80):
        wt = w[t & 15]
        if t >= 16:  # message schedule, in place: w[t] = rotl1(w[t-3] ^ w[t-8] ^ w[t-14] ^ w[t-16])
            np.bitwise_xor(w[(t - 3) & 15], w[(t - 8) & 15], out=t1)
            t1 ^= w[(t - 14) & 15]
            t1 ^= wt
            np.left_shift(t1, 1, out=wt)
            t1 >>= 31
            wt |= t1
        if t < 20:  # choose
            np.bitwise_xor(c, d, out=t1)
            t1 &= b
            t1 ^= d
        elif 40 <= t < 60:  # majority
            np.bitwise_or(b, c, out=t1)
            t1 &= d
            np.bitwise_and(b, c, out=t2)
            t1 |= t2
        else:  # parity
            np.bitwise_xor(b, c, out=t1)
            t1 ^= d
        t1 += e
        t1 += wt
        t1 += np.uint32(_SHA1_K[t // 20])
        np.left_shift(a, 5, out=e)  # e is free now: it becomes the new a = rotl5(a) + f + e + k + w
        np.right_shift(a, 27, out=t2)
        e |= t2
        e += t1
        np.left_shift(b, 30, out=t2)  # b becomes the new c = rotl30(b)
        b >>= 2
        b |= t2
        a, b, c, d, e = e, a, b, c, d
    a += np.uint32(_SHA1_INIT[0])
    b += np.uint32(_SHA1_INIT[1])
    return a, b


@functools.cache
def _padding_tables() -> tuple[np.ndarray, np.ndarray]:
    """For message word j and message length L (≤ 55): the mask keeping the message's bytes of that
    word, and the bits SHA-1 padding puts there (the 0x80 byte; word 15 holds the bit length)."""
    mask = np.zeros((16, MAX_ONE_BLOCK + 1), np.uint32)
    pad = np.zeros((16, MAX_ONE_BLOCK + 1), np.uint32)
    for length in range(MAX_ONE_BLOCK + 1):
        for j in range(14):
            rem = length - 4 * j  # message bytes in this word
            if rem >= 4:
                mask[j, length] = 0xFFFFFFFF
            elif rem >= 0:
                mask[j, length] = (0xFFFFFFFF << (32 - 8 * rem)) & 0xFFFFFFFF
                pad[j, length] = 0x80 << (24 - 8 * rem)
        pad[15, length] = 8 * length
    return mask, pad


def _word_lanes(data: bytes) -> np.ndarray:
    """``data`` as big-endian uint32 words at each of the 4 byte alignments, flattened:
    the word at byte offset i is ``lanes[(i % 4) * stride + i // 4]``, so every word of every
    message is a single gather (zeros past the end of ``data``)."""
    stride = len(data) // 4 + 17
    padded = data + bytes(4 * stride + 3 - len(data))
    lanes = np.empty((4, stride), np.uint32)
    for k in range(4):
        lanes[k] = np.frombuffer(padded[k : k + 4 * stride], ">u4")  # the slice is a copy: aligned, so a fast byteswap
    return lanes.ravel()


def _sha1_one_block(lanes: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """First 8 digest bytes (little-endian uint64) of messages ``data[s:s+L]`` with L ≤ 55."""
    mask, pad = _padding_tables()
    stride = len(lanes) // 4
    base = (starts & 3) * stride + (starts >> 2)
    top = int(lengths.max()) // 4
    w = [np.take(lanes[j:], base) & mask[j].take(lengths) | pad[j].take(lengths) if j <= top else pad[j].take(lengths) for j in range(16)]
    h0, h1 = _sha1_rounds(w)
    return h0.byteswap().astype(np.uint64) | (h1.byteswap().astype(np.uint64) << np.uint64(32))


def sha1_u64(data: bytes, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """``int.from_bytes(sha1(data[s:e]).digest()[:8], "little")`` for every (s, e), as uint64:
    datatrove's ``sha1_hash64`` of each slice."""
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    out = np.empty(len(starts), np.uint64)
    lengths = ends - starts
    short = lengths <= MAX_ONE_BLOCK
    if short.sum() >= MIN_VECTOR_BATCH:
        lanes = _word_lanes(data)
        idx = np.flatnonzero(short)
        for lo in range(0, len(idx), _SHA1_LANES):
            part = idx[lo : lo + _SHA1_LANES]
            out[part] = _sha1_one_block(lanes, starts[part], lengths[part])
    else:
        short[:] = False
    rest = np.flatnonzero(~short)
    if len(rest):
        sha1 = hashlib.sha1
        digests = b"".join([sha1(data[s:e]).digest()[:8] for s, e in zip(starts[rest].tolist(), ends[rest].tolist())])
        out[rest] = np.frombuffer(digests, "<u8")
    return out


# ---------------------------------------------------------------------------------------------
# shingles, permutations, signatures


def shingle_spans(data: bytes, n_grams: int) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    """Byte ranges of every document's n-grams of words, joined by single spaces.

    ``data`` is :func:`normalised_batch`'s output. Returns the buffer with runs of spaces made one,
    the start and end of each shingle in it, and per document the offset of its first shingle
    (length ``n_docs + 1``). A document of fewer than ``n_grams`` words has none, as in datatrove
    (whose ``ngrams`` yields nothing then).
    """
    raw = np.frombuffer(data, np.uint8)
    space = raw == 32
    keep = np.ones(len(raw), bool)
    keep[1:] = ~(space[1:] & space[:-1])
    arr = raw[keep]
    sep = arr <= 32  # space or newline: every other byte belongs to a word
    starts = np.flatnonzero(sep[:-1] > sep[1:]) + 1
    if len(sep) and not sep[0]:
        starts = np.concatenate([[0], starts])
    ends = np.flatnonzero(sep[1:] > sep[:-1]) + 1  # the buffer ends with a newline
    doc_ends = np.flatnonzero(arr == 10)
    first_word = np.searchsorted(starts, np.concatenate([[0], doc_ends[:-1]]))
    n_words = np.diff(np.append(first_word, len(starts)))
    per_doc = np.maximum(n_words - n_grams + 1, 0)
    offsets = np.concatenate([[0], np.cumsum(per_doc)])
    # shingle k of document d starts at word first_word[d] + k
    word = np.arange(offsets[-1]) + np.repeat(first_word - offsets[:-1], per_doc)
    return arr.tobytes(), starts[word], ends[word + n_grams - 1], offsets


class MinhashSigner:
    """datatrove's MinhashDedupSignature with 64-bit SHA-1 shingle hashes and its default text
    normalisation, for batches of documents."""

    BLOCK = 256  # shingles per permutation block: the four (hashes, BLOCK) uint64 arrays stay in L2

    def __init__(self, n_grams: int, num_buckets: int, hashes_per_bucket: int, seed: int) -> None:
        self.n_grams, self.num_buckets, self.hashes_per_bucket = n_grams, num_buckets, hashes_per_bucket
        num_hashes = num_buckets * hashes_per_bucket
        gen = np.random.RandomState(seed)  # exactly datatrove's MinhashDedupSignature.parameters
        a = gen.randint(1, MERSENNE, dtype=np.uint64, size=(1, num_hashes))
        b = gen.randint(0, MERSENNE, dtype=np.uint64, size=(1, num_hashes))
        self.a, self.b = a.reshape(-1, 1), b.reshape(-1, 1)

    def shingle_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Every document's shingle hashes (concatenated) and per document its first one's offset."""
        buf, starts, ends, offsets = shingle_spans(normalised_batch(texts), self.n_grams)
        return sha1_u64(buf, starts, ends), offsets

    def signatures(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Positions (in ``texts``) of the documents that have shingles, and their signatures:
        (docs, num_buckets * hashes_per_bucket) uint64, the minimum of each permuted hash."""
        hashes, offsets = self.shingle_hashes(texts)
        has = np.flatnonzero(offsets[1:] > offsets[:-1])
        return has, self.min_permuted(hashes, offsets[np.append(has, len(offsets) - 1)]).T

    def min_permuted(self, hashes: np.ndarray, doc_starts: np.ndarray) -> np.ndarray:
        """Per document (shingles ``doc_starts[d]:doc_starts[d+1]``, none empty) and hash function j,
        ``min((h * a_j + b_j) mod 2**64 mod p)`` over its shingles h: (hashes, docs) uint64.

        numpy runs a loop over contiguous rows about twice as fast as one with a broadcast column,
        hence the parameters spread over whole blocks."""
        shape = (len(self.a), self.BLOCK)
        a_full, b_full = np.broadcast_to(self.a, shape).copy(), np.broadcast_to(self.b, shape).copy()
        out = np.full((shape[0], len(doc_starts) - 1), np.iinfo(np.uint64).max, np.uint64)
        x, high = np.empty(shape, np.uint64), np.empty(shape, np.uint64)
        lows = np.arange(0, len(hashes), self.BLOCK)
        highs = np.minimum(lows + self.BLOCK, len(hashes))
        firsts = np.searchsorted(doc_starts, lows, side="right") - 1  # documents each block touches
        lasts = np.searchsorted(doc_starts, highs, side="left")
        for lo, hi, first, last in zip(lows.tolist(), highs.tolist(), firsts.tolist(), lasts.tolist()):
            xb, hb = x[:, : hi - lo], high[:, : hi - lo]
            np.multiply(a_full[:, : hi - lo], hashes[None, lo:hi], out=xb)  # wraps mod 2**64, as datatrove's
            xb += b_full[:, : hi - lo]
            np.right_shift(xb, 61, out=hb)  # x mod p = (x & p) + (x >> 61), less p once if that is >= p
            xb &= MERSENNE
            xb += hb
            if xb.max() >= MERSENNE:  # about once in 2**58 values
                xb[xb >= MERSENNE] -= MERSENNE
            cuts = np.maximum(doc_starts[first:last], lo) - lo
            part = out[:, first:last]
            np.minimum(part, np.minimum.reduceat(xb, cuts, axis=1), out=part)
        return out


def signature_records(doc_index: np.ndarray, signatures: np.ndarray, bucket: int, hashes_per_bucket: int) -> bytes:
    """One bucket's signature file: records of ``hashes_per_bucket`` little-endian uint64 and the
    uint32 document index, sorted by all fields (as datatrove sorts them)."""
    dtype = np.dtype([(f"field{i + 1}", "<u8") for i in range(hashes_per_bucket)] + [(f"field{hashes_per_bucket + 1}", "<u4")])
    records = np.empty(len(doc_index), dtype)
    cols = signatures[:, bucket * hashes_per_bucket : (bucket + 1) * hashes_per_bucket]
    for i in range(hashes_per_bucket):
        records[f"field{i + 1}"] = cols[:, i]
    records[f"field{hashes_per_bucket + 1}"] = doc_index
    order = np.lexsort([doc_index] + [cols[:, i] for i in reversed(range(hashes_per_bucket))])
    return records[order].tobytes()


def write_signature_files(sig_dir: Path, rank: int, doc_index: np.ndarray, signatures: np.ndarray, num_buckets: int, hashes_per_bucket: int) -> None:
    """``sig_dir/bucket_XXX/RANK.minhash.sig`` for every bucket, each written atomically.

    A killed earlier attempt may have left temp files next to them; datatrove's bucket step reads
    every file of a bucket directory, so those go first."""
    name = f"{rank:05d}.minhash.sig"
    for bucket in range(num_buckets):
        directory = sig_dir / f"bucket_{bucket:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(f".{name}.tmp.*"):
            stale.unlink(missing_ok=True)
        atomic_write_bytes(directory / name, signature_records(doc_index, signatures, bucket, hashes_per_bucket))


def write_signatures(texts: Iterable[str], rank: int, sig_dir: Path, signer: MinhashSigner, batch_docs: int = 1000) -> int:
    """Block 1 of MinHash dedup for one chunk: what ``MinhashDedupSignature.run(docs, rank)`` writes,
    document ids being positions in ``texts``. Returns the number of documents read."""
    indices, sigs = [], []
    count = 0
    it = iter(texts)
    while batch := list(itertools.islice(it, batch_docs)):
        has, sig = signer.signatures(batch)
        indices.append((has + count).astype(np.uint32))
        sigs.append(sig)
        count += len(batch)
    doc_index = np.concatenate(indices) if indices else np.zeros(0, np.uint32)
    signatures = np.concatenate(sigs) if sigs else np.zeros((0, signer.num_buckets * signer.hashes_per_bucket), np.uint64)
    write_signature_files(sig_dir, rank, doc_index, signatures, signer.num_buckets, signer.hashes_per_bucket)
    return count


# ---------------------------------------------------------------------------------------------
# LSH buckets: datatrove's MinhashDedupBuckets (one worker per bucket, no index), vectorised

SLICE_RECORDS = 2_000_000  # signature records sorted at once: ~200 MB, whatever the corpus size


def _signature_files(sig_dir: Path, bucket: int, hashes_per_bucket: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The bucket's signature files in datatrove's order (sorted names; a file's position is its
    ``file_id``), memory-mapped, and each one's rank (the number its name starts with)."""
    dtype = np.dtype([("sig", "<u8", (hashes_per_bucket,)), ("doc", "<u4")])
    paths = sorted(p for p in (sig_dir / f"bucket_{bucket:03d}").iterdir() if p.name.endswith(".minhash.sig") and not p.name.startswith("."))
    files = [np.memmap(p, dtype, mode="r") if p.stat().st_size else np.zeros(0, dtype) for p in paths]
    return files, np.array([int(p.name.removesuffix(".minhash.sig")) for p in paths], np.uint32)


def bucket_pairs(sig_dir: Path, bucket: int, hashes_per_bucket: int) -> bytes:
    """What ``MinhashDedupBuckets`` writes for one bucket: its records merged in order (signature,
    then file, then document), and for every record equal in signature to the one before it the
    pair ``(rank, doc, rank, doc)`` of the two, as little-endian uint32.

    Every file is sorted by signature, so the merge is done one range of first hash values at a
    time (equal signatures share their first value): memory stays bounded on a large corpus.
    """
    files, ranks = _signature_files(sig_dir, bucket, hashes_per_bucket)
    if not files:
        return b""
    n_slices = max(1, -(-sum(map(len, files)) // SLICE_RECORDS))
    bounds = [int(MERSENNE) * k // n_slices for k in range(n_slices + 1)]  # every hash is < p
    out = []
    for lo, hi in itertools.pairwise(bounds):
        parts, file_ids = [], []
        for file_id, records in enumerate(files):
            first = records["sig"][:, 0]
            a, b = bisect.bisect_left(first, lo), bisect.bisect_left(first, hi)
            parts.append(np.asarray(records[a:b]))
            file_ids.append(np.full(b - a, file_id, np.int64))
        rec, fid = np.concatenate(parts), np.concatenate(file_ids)
        sig = rec["sig"]
        order = np.lexsort([rec["doc"], fid, *(sig[:, i] for i in reversed(range(hashes_per_bucket)))])
        sig, doc, fid = sig[order], rec["doc"][order], fid[order]
        second = np.flatnonzero(np.all(sig[1:] == sig[:-1], axis=1)) + 1
        pairs = np.stack([ranks[fid[second - 1]], doc[second - 1], ranks[fid[second]], doc[second]], axis=1)
        out.append(pairs.astype("<u4").tobytes())
    return b"".join(out)
