"""Duplicate removal and decontamination for distillation data (docs/recipes.md §1, §3).

- `filter_duplicates`: exact duplicates (normalised text), then near duplicates:
  Jaccard similarity of word 5-gram shingle sets >= 0.8, candidates found by MinHash LSH.
- `filter_contaminated`: decontamination against evaluation files: a problem that
  shares any word 8-gram (normalised case, punctuation, whitespace; maths
  operators count as words) with an evaluation problem is dropped, and the
  evaluation file is named.

Both follow `distill.filters`' contract: `f(records, options) -> FilterResult`.
"""
from __future__ import annotations

import re
import zlib
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from pydantic import Field

from distill.filters import AnyRecord, FilterResult, partition, problem_of, record_name
from reason.config import Section
from reason.problems import load_problems, prompt_text
from reason.records import Problem, Rollout, existing

# ---------------------------------------------------------------- text normalisation

_HYPHEN = re.compile(r"(?<=[^\W\d_])-(?=[^\W\d_])")  # between letters: punctuation, not a minus
_TOKEN = re.compile(r"[^\W_]+|[-+*/=<>^÷×−()\[\]]")


def normalize_words(text: str) -> list[str]:
    """Lower-case words, maths operators and brackets; other punctuation and whitespace go.

    Operators and brackets stay so that "2 * (3 + 4)", "2 * 3 + 4" and "2 * 3 - 4"
    are different problems.
    >>> normalize_words("Well-known: 2+3, ANSWER!")
    ['well', 'known', '2', '+', '3', 'answer']
    """
    return _TOKEN.findall(_HYPHEN.sub(" ", text.lower()))


def ngrams(words: list[str], n: int) -> list[str]:
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


def _dedup_text(rec: AnyRecord) -> str:
    if isinstance(rec, Problem):
        return prompt_text(rec)
    response = rec.completion if isinstance(rec, Rollout) else f"{rec.reasoning}\n{rec.answer}"
    return prompt_text(rec.problem) + "\n" + response


# ---------------------------------------------------------------- duplicates

class DedupOptions(Section):
    near: bool = True
    shingle: int = Field(5, ge=1)  # words per shingle
    threshold: float = Field(0.8, gt=0, le=1)  # Jaccard similarity of shingle sets that makes a near duplicate
    bands: int = Field(16, ge=1)  # MinHash LSH: bands x rows permutations; 16 x 6 finds >99% of pairs at 0.8
    rows: int = Field(6, ge=1)
    bucket_cap: int = Field(64, ge=1)  # records kept per LSH bucket: bounds the work when texts share a template
    seed: int = 0


_PRIME = (1 << 32) - 5  # a*h + b stays below 2**64 for a, b < _PRIME and 32-bit h
_SLACK = 0.15  # candidates whose MinHash estimate is this far under the threshold still get an exact check
_MAX_CHECKS = 8  # exact checks per record, best estimates first: bounds the work on templated text


def shingles(words: list[str], n: int) -> set[str]:
    return set(ngrams(words, n)) or {" ".join(words)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class MinHashIndex:
    """MinHash signatures of shingle sets, and an LSH index to find similar ones fast.

    Two sets share a band (`rows` equal min-hashes) with probability s**rows at
    Jaccard similarity s; only texts sharing a band are compared, and only by
    signature, so finding candidates costs the same for 1K or 1M texts.
    """

    def __init__(self, opts: DedupOptions, capacity: int):
        self.opts = opts
        rng = np.random.default_rng(opts.seed)
        k = opts.bands * opts.rows
        self.a = rng.integers(1, _PRIME, size=(k, 1), dtype=np.uint64)
        self.b = rng.integers(0, _PRIME, size=(k, 1), dtype=np.uint64)
        # A band's key is a 64-bit mix of its rows, offset per band; a collision only adds a candidate.
        self.mix = rng.integers(1, 1 << 63, size=opts.rows, dtype=np.uint64)  # [R]
        self.offset = rng.integers(0, 1 << 63, size=opts.bands, dtype=np.uint64)  # [B]
        self.sigs = np.empty((capacity, k), dtype=np.uint32)  # [N, K], the first `size` rows used
        self.size = 0
        self.buckets: dict[int, list[int]] = {}

    def signature(self, shingle_set: set[str]) -> np.ndarray:
        h = np.fromiter((zlib.crc32(s.encode()) for s in shingle_set), dtype=np.uint64,
                        count=len(shingle_set))  # [S]
        return ((self.a * h[None, :] + self.b) % _PRIME).min(axis=1).astype(np.uint32)  # [K]

    def band_keys(self, sig: np.ndarray) -> list[int]:
        rows = sig.reshape(self.opts.bands, self.opts.rows).astype(np.uint64)  # [B, R]
        return ((rows * self.mix).sum(axis=1) + self.offset).tolist()  # wraps mod 2**64: fine for a hash

    def candidates(self, sig: np.ndarray, keys: list[int], floor: float) -> list[int]:
        """Indexed texts sharing a band whose estimated similarity is >= floor, most similar first."""
        cands = list({j for key in keys for j in self.buckets.get(key, ())})
        if not cands:
            return []
        est = (self.sigs[cands] == sig[None, :]).mean(axis=1)  # [C]
        return [cands[i] for i in np.argsort(-est, kind="stable") if est[i] >= floor]

    def add(self, sig: np.ndarray, keys: list[int]) -> None:
        self.sigs[self.size] = sig
        for key in keys:
            bucket = self.buckets.setdefault(key, [])
            if len(bucket) < self.opts.bucket_cap:
                bucket.append(self.size)
        self.size += 1


def filter_duplicates(records: Sequence[AnyRecord], opts: DedupOptions | None = None) -> FilterResult:
    """Keep the first of each group of exact or near-duplicate records.

    The text compared is a Problem's prompt, or a Trace's / Rollout's prompt plus
    response, after `normalize_words`. A near duplicate has an exact Jaccard
    similarity of word 5-gram sets >= 0.8 with a kept record (MinHash LSH only picks
    which pairs to compare). Changing one word in the middle of an N-word text
    gives (N-9)/(N+1): short problems that differ in one number stay distinct.
    """
    opts = opts or DedupOptions()
    index = MinHashIndex(opts, capacity=len(records))

    @lru_cache(maxsize=8192)  # templated texts keep hitting the same few kept records
    def kept_shingles(pos: int) -> set[str]:
        return shingles(normalize_words(_dedup_text(records[pos])), opts.shingle)

    first: dict[str, str] = {}  # normalised text -> name of the record kept for it
    kept_at: list[int] = []  # index entry -> position of its record
    verdicts = []
    for pos, rec in enumerate(records):
        words = normalize_words(_dedup_text(rec))
        key = " ".join(words)
        if key in first:
            verdicts.append(("duplicate", f"same text as {first[key]}"))
            continue
        if opts.near:
            mine = shingles(words, opts.shingle)
            sig = index.signature(mine)
            keys = index.band_keys(sig)
            sims = ((records[kept_at[j]], jaccard(mine, kept_shingles(kept_at[j])))  # lazy: stops at the first hit
                    for j in index.candidates(sig, keys, opts.threshold - _SLACK)[:_MAX_CHECKS])
            hit = next(((other, sim) for other, sim in sims if sim >= opts.threshold), None)
            if hit is not None:
                verdicts.append(("near_duplicate", f"Jaccard {hit[1]:.2f} with {record_name(hit[0])}"))
                continue
            index.add(sig, keys)
            kept_at.append(pos)
        first[key] = record_name(rec)
        verdicts.append(None)
    return partition("dedup", records, verdicts, {"threshold": opts.threshold, "shingle": opts.shingle})


# ---------------------------------------------------------------- decontamination

class DecontamOptions(Section):
    eval_files: list[str]
    n: int = Field(8, ge=1)  # word n-gram length (the common public method)
    fields: dict[str, str] | None = None  # column names for load_problems, if not the common ones


class EvalIndex(NamedTuple):
    grams: dict[str, str]  # normalised n-gram -> eval file it came from
    short: dict[str, str]  # whole normalised text of eval problems under n words -> eval file


def build_eval_index(eval_files: Sequence[str | Path], n: int, fields: dict[str, str] | None) -> EvalIndex:
    """Index the n-grams of every evaluation problem (first file wins on a shared n-gram)."""
    grams: dict[str, str] = {}
    short: dict[str, str] = {}
    for path in eval_files:
        name = Path(path).name
        for p in load_problems(existing(path, "decontam.eval_files"), fields, require_answer=False):
            words = normalize_words(prompt_text(p))
            if len(words) < n:  # too short to have an n-gram: match it only whole
                short.setdefault(" ".join(words), name)
            for g in ngrams(words, n):
                grams.setdefault(g, name)
    return EvalIndex(grams, short)


def contamination(problem: Problem, index: EvalIndex, n: int) -> tuple[str, str] | None:
    """(eval file, shared n-gram) for the first n-gram of the problem found in the index."""
    words = normalize_words(prompt_text(problem))
    whole = " ".join(words)
    if whole in index.short:
        return index.short[whole], whole
    for g in ngrams(words, n):
        if g in index.grams:
            return index.grams[g], g
    return None


def filter_contaminated(records: Sequence[AnyRecord], opts: DecontamOptions) -> FilterResult:
    """Drop records whose problem shares a word n-gram with any evaluation problem."""
    index = build_eval_index(opts.eval_files, opts.n, opts.fields)
    verdicts, by_file = [], Counter()
    for rec in records:
        hit = contamination(problem_of(rec), index, opts.n)
        if hit is None:
            verdicts.append(None)
        else:
            by_file[hit[0]] += 1
            verdicts.append(("contaminated", f"shares {opts.n}-gram '{hit[1]}' with {hit[0]}"))
    details = {"n": opts.n, "eval_files": [str(f) for f in opts.eval_files], "eval_ngrams": len(index.grams),
               "by_eval_file": dict(by_file)}
    return partition("decontaminate", records, verdicts, details)
