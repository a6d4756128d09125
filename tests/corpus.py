"""Synthetic but English-looking corpora with planted duplicates, for the data-stage tests.

Words are letters only: datatrove's normaliser maps digits to 0, so numbered words would collide.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = """the of and to in is was that for on are with as his they be at one have this from or had by
word but what some we can out other were all there when up use your how said an each she which do their
time if will way about many then them write would like so these her long make thing see him two has look
more day could go come did number sound most people over know water than call first who may down side been
now find any new work part take get place made live where after back little only round man year came show
every good give our under name very through just form sentence great think say help low line differ turn
cause much mean before move right boy old too same tell does set three want air well also play small end put
home read hand port large spell add even land here must big high such follow act why ask men change went
light kind off need house picture try again animal point mother world near build self earth father head
stand own page should country found answer school grow study still learn plant cover food sun four between
state keep eye never last let thought city tree cross farm hard start might story saw far sea draw left late
run while press close night real life few north open seem together next white children begin got walk
example ease paper group always music those both mark often letter until mile river car feet care second
book carry took science eat room friend began idea fish mountain stop once base hear horse cut sure watch
color face wood main enough plain girl usual young ready above ever red list though feel talk bird soon body
dog family direct pose leave song measure door product black short numeral class wind question happen
complete ship area half rock order fire south problem piece told knew pass since top whole king space heard
best hour better true during hundred five remember step early hold west ground interest reach fast verb
sing listen six table travel less morning ten simple several vowel toward war lay against pattern slow
center love person money serve appear road map rain rule govern pull cold notice voice unit power town fine
certain fly fall lead cry dark machine note wait plan figure star box noun field rest correct able pound
done beauty drive stood contain front teach week final gave green quick develop ocean warm free minute
strong special mind behind clear tail produce fact street inch multiply nothing course stay wheel full force
blue object decide surface deep moon island foot system busy test record boat common gold possible plane
stead dry wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes
distant fill east paint language among""".split()


def english_doc(rng: random.Random, n_sentences: int) -> str:
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 18))]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"]))
    paragraphs = [" ".join(sentences[i : i + 4]) for i in range(0, len(sentences), 4)]
    return "\n\n".join(paragraphs)


def near_copy(rng: random.Random, text: str, edits: int = 1) -> str:
    """A copy with a word replaced: of a 150+ word text, Jaccard ≈ 0.93 over 5-grams, far above
    MinHash's threshold (detection probability > 0.9999 with 14 buckets × 8 hashes), never exact."""
    words = text.split(" ")
    for _ in range(edits):
        i = rng.randrange(len(words))
        words[i] = rng.choice(WORDS) + "s"
    return " ".join(words)


@dataclass
class Corpus:
    docs: list[dict] = field(default_factory=list)  # {"id", "text"} in corpus order
    exact_ids: set[str] = field(default_factory=set)  # planted exact copies (later occurrences)
    near_ids: set[str] = field(default_factory=set)  # planted near copies
    files: list[Path] = field(default_factory=list)


def make_corpus(directory: Path, n_unique: int = 1500, n_exact: int = 100, n_near: int = 100, n_files: int = 3, seed: int = 0) -> Corpus:
    """Write `n_files` files (parquet and jsonl alternating) of unique docs with planted copies.

    Copies always come after their original in corpus order, so "keep the first" is well defined.
    """
    rng = random.Random(seed)
    corpus = Corpus()
    originals = []
    for i in range(n_unique):
        doc = {"id": f"doc-{i:05d}", "text": english_doc(rng, rng.randint(3, 16))}
        corpus.docs.append(doc)
        originals.append(doc)
    plants = []
    for i in range(n_exact):
        src = rng.choice(originals[: n_unique // 2])
        # same text up to case/whitespace: still an exact duplicate after normalisation
        text = src["text"] if i % 2 else "  " + src["text"].upper().replace(" ", "   ") + "\n"
        plants.append(({"id": f"exact-{i:04d}", "text": text}, "exact"))
    long_originals = [d for d in originals[: n_unique // 2] if len(d["text"].split()) >= 150]
    for i in range(n_near):
        src = rng.choice(long_originals)
        plants.append(({"id": f"near-{i:04d}", "text": near_copy(rng, src["text"])}, "near"))
    # Plants go into the second half of the corpus, after every original they copy.
    second_half = corpus.docs[n_unique // 2 :]
    for doc, kind in plants:
        second_half.insert(rng.randrange(len(second_half) + 1), doc)
        (corpus.exact_ids if kind == "exact" else corpus.near_ids).add(doc["id"])
    corpus.docs = corpus.docs[: n_unique // 2] + second_half
    write_files(directory, corpus, n_files)
    return corpus


def write_files(directory: Path, corpus: Corpus, n_files: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    per = -(-len(corpus.docs) // n_files)
    for f in range(n_files):
        part = corpus.docs[f * per : (f + 1) * per]
        if f % 2 == 0:
            path = directory / f"part_{f:02d}.parquet"
            pq.write_table(pa.table({"id": [d["id"] for d in part], "text": [d["text"] for d in part]}), path, row_group_size=100)
        else:
            path = directory / f"part_{f:02d}.jsonl"
            path.write_text("".join(json.dumps(d) + "\n" for d in part))
        corpus.files.append(path)
