"""Okapi BM25 over a small in-memory corpus.

score(q, d) = sum over query terms t of idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
with idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5)). Terms are lower-cased, accent-free
alphanumeric words with stop words removed and a light suffix stemming (tips -> tip, tipping -> tip).
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter

import numpy as np

from moa.errors import UsageError

WORD = re.compile(r"[a-z0-9]+")
STOP_WORDS = frozenset("""a an and are as at be by do does for from how in is it its of on or that the their
them then there these they this to was what when where which who why will with you your""".split())


def stem(word: str) -> str:
    for suffix in ("ing", "ed"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            word = word[:-len(suffix)]
            if len(word) > 2 and word[-1] == word[-2]:
                word = word[:-1]
            return word
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return [stem(w) for w in WORD.findall(text) if w not in STOP_WORDS]


class BM25:
    """An index over `texts`; `scores(query)` gives one score per text, `top(query, k)` the best k."""

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75):
        if not texts:
            raise UsageError("BM25 needs at least one document")
        if k1 < 0 or not 0 <= b <= 1:
            raise UsageError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.n = len(texts)
        counts = [Counter(tokenize(t)) for t in texts]
        lengths = np.array([sum(c.values()) for c in counts], dtype=np.float64)
        avgdl = max(lengths.mean(), 1.0)
        norm = k1 * (1 - b + b * lengths / avgdl)
        postings: dict[str, list] = {}
        for doc, c in enumerate(counts):
            for term, tf in c.items():
                postings.setdefault(term, []).append((doc, tf))
        # term -> (doc indices, precomputed BM25 weights)
        self.postings = {}
        for term, entries in postings.items():
            docs = np.array([d for d, _ in entries])
            tf = np.array([t for _, t in entries], dtype=np.float64)
            idf = math.log(1 + (self.n - len(entries) + 0.5) / (len(entries) + 0.5))
            self.postings[term] = (docs, idf * tf * (k1 + 1) / (tf + norm[docs]))

    def scores(self, query: str) -> np.ndarray:
        out = np.zeros(self.n)
        for term in tokenize(query):
            if term in self.postings:
                docs, weights = self.postings[term]
                out[docs] += weights
        return out

    def top(self, query: str, k: int) -> list[tuple[int, float]]:
        """The k best (index, score) pairs with a positive score, best first (ties by index)."""
        s = self.scores(query)
        order = sorted(np.flatnonzero(s > 0), key=lambda i: (-s[i], i))[:k]
        return [(int(i), float(s[i])) for i in order]
