"""GPT-2 tokenization of a batch of documents into one flat uint16 array, EOT before every document."""

from __future__ import annotations

import itertools

import numpy as np
import tiktoken


def tokenize_documents(enc: tiktoken.Encoding, texts: list[str], num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Return (tokens, lengths): ``<|endoftext|>`` + tokens of each text, concatenated; per-doc lengths include the EOT.

    `encode_ordinary_batch` runs in tiktoken's Rust core; flattening with ``np.fromiter`` over a
    chained iterator avoids building one numpy array per document, which would dominate for short docs.
    """
    encoded = enc.encode_ordinary_batch(texts, num_threads=num_threads)
    lengths = np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded))
    eot = enc.eot_token
    total = int(lengths.sum())
    tokens = np.fromiter(
        itertools.chain.from_iterable(itertools.chain((eot,), e) for e in encoded), dtype=np.uint16, count=total
    )
    return tokens, lengths
