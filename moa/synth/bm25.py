"""Okapi BM25 over a corpus in any script, held as numpy arrays (a million passages fit in a few GiB).

score(q, d) = sum over query terms t of idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
with idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5)).

Terms: text is NFKC-normalised and case-folded. Scripts written with spaces give words (letters with
their combining marks, so accents stay: `Größe` and `groe` differ; Devanagari keeps its vowel signs);
scripts written without spaces (Chinese, Japanese, Korean Hangul, Thai, Lao, Khmer, Myanmar) give
overlapping character bigrams, so a corpus and its queries may mix languages freely. Arabic loses its
optional vowel marks and tatweel, unifies alef forms and drops the article al-. English stop words
are removed and ASCII words lightly stemmed (tips -> tip, tipping -> tip).
"""
from __future__ import annotations

import re
import sys
import unicodedata
from array import array

import numpy as np

from moa.errors import UsageError

STOP_WORDS = frozenset("""a an and are as at be by do does for from how in is it its of on or that the their
them then there these they this to was what when where which who why will with you your""".split())


def _marks() -> str:
    """A regex class body of every combining mark in the Basic Multilingual Plane."""
    ranges, start = [], None
    for cp in range(0x10000):
        is_mark = unicodedata.category(chr(cp)).startswith("M")
        if is_mark and start is None:
            start = cp
        elif not is_mark and start is not None:
            ranges.append(f"\\u{start:04x}-\\u{cp - 1:04x}")
            start = None
    return "".join(ranges)


# scripts written without spaces between words: Thai, Lao, Myanmar, Khmer, Hangul Jamo, CJK
# punctuation-free blocks (kana, CJK ideographs), Hangul syllables, CJK compatibility ideographs
UNSPACED = ("\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff"
            "\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff")
RUNS = re.compile(f"[{UNSPACED}]+|[^{UNSPACED}]+")  # a word cut where it enters or leaves an unspaced script
HAS_UNSPACED = re.compile(f"[{UNSPACED}]")
WORD = re.compile(f"[\\w{_marks()}]+")
ARABIC = re.compile("[\u0600-\u06ff]")
ARABIC_MARKS = re.compile("[\u0640\u064b-\u065f\u0670]")
ALEF = str.maketrans("أإآٱى", "اااای")


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


def _terms(word: str) -> list[str]:
    if HAS_UNSPACED.match(word):
        if len(word) == 1:
            return [word]
        return [word[i:i + 2] for i in range(len(word) - 1)]
    if word in STOP_WORDS or word == "_":
        return []
    if word.isascii():
        return [stem(word)]
    if ARABIC.match(word):
        word = ARABIC_MARKS.sub("", word).translate(ALEF)
        for article in ("وال", "بال", "فال", "كال", "لل", "ال"):
            if word.startswith(article) and len(word) > len(article) + 1:
                return [word[len(article):]]
    return [word]


def word_terms(word: str) -> list[str]:
    """The index terms of one word as `words` cuts them (a word may run from one script into another)."""
    if HAS_UNSPACED.search(word):
        return [term for run in RUNS.findall(word) for term in _terms(run)]
    return _terms(word)


def words(text: str) -> list[str]:
    """NFKC-normalised, case-folded runs of letters, digits and combining marks."""
    return WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def tokenize(text: str) -> list[str]:
    return [term for word in words(text) for term in word_terms(word)]


class BM25:
    """An index over `texts`; `scores(query)` gives one score per text, `top(query, k)` the best k.

    Postings are one array per corpus (term-major, like a CSC matrix): for term id t its documents
    are docs[starts[t]:starts[t + 1]] with their precomputed BM25 weights alongside."""

    def __init__(self, texts, k1: float = 1.5, b: float = 0.75):
        if k1 < 0 or not 0 <= b <= 1:
            raise UsageError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        vocab: dict[str, int] = {}
        flat, lengths = array("q"), array("q")  # every document's term ids, one after another
        known: dict[str, list[int]] = {}  # word -> its term ids: most words recur, so each is split once
        for text in texts:
            ids = []
            for word in words(text):
                got = known.get(word)
                if got is None:
                    got = [vocab.setdefault(term, len(vocab)) for term in word_terms(word)]
                    if len(word) <= 32:
                        known[word] = got
                ids += got
            flat.extend(ids)
            lengths.append(len(ids))
        del known
        if not lengths:
            raise UsageError("BM25 needs at least one document")
        self.n, self.vocab = len(lengths), vocab
        lengths = np.frombuffer(lengths, dtype=np.int64)
        flat = np.frombuffer(flat, dtype=np.int64)
        doc_of = np.repeat(np.arange(self.n, dtype=np.int64), lengths)
        # one (term, doc) pair per distinct occurrence, sorted term-major; tf = how often it occurs
        pairs, tf = np.unique(flat * self.n + doc_of, return_counts=True)
        del flat, doc_of
        terms, self.docs = np.divmod(pairs, self.n)
        self.docs = self.docs.astype(np.int32)
        del pairs
        self.starts = np.searchsorted(terms, np.arange(len(vocab) + 1))
        df = np.diff(self.starts)
        idf = np.log1p((self.n - df + 0.5) / (df + 0.5))
        avgdl = max(float(lengths.mean()), 1.0)
        norm = k1 * (1 - b + b * lengths / avgdl)
        tf = tf.astype(np.float32)
        self.weights = (idf[terms] * tf * (k1 + 1) / (tf + norm[self.docs])).astype(np.float32)

    def scores(self, query: str) -> np.ndarray:
        out = np.zeros(self.n, dtype=np.float32)
        for term in tokenize(query):
            t = self.vocab.get(term)
            if t is not None:
                lo, hi = self.starts[t], self.starts[t + 1]
                out[self.docs[lo:hi]] += self.weights[lo:hi]
        return out

    def top(self, query: str, k: int) -> list[tuple[int, float]]:
        """The k best (index, score) pairs with a positive score, best first (ties by index)."""
        s = self.scores(query)
        hits = np.flatnonzero(s > 0)
        if len(hits) > k:
            kth = np.partition(s[hits], len(hits) - k)[len(hits) - k]
            hits = hits[s[hits] >= kth]
        order = sorted(hits, key=lambda i: (-s[i], i))[:k]
        return [(int(i), float(s[i])) for i in order]

    def nbytes(self) -> int:
        """The index arrays' size in bytes (the vocabulary dict aside)."""
        return self.docs.nbytes + self.weights.nbytes + self.starts.nbytes + sys.getsizeof(self.vocab)
