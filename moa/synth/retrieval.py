"""Retrieval backends: a local corpus searched with BM25 (default) and web search over HTTP.

Every backend returns documents as dicts with id, culture, title, source_type and text (the
bundled corpus adds topic and the norm ids behind each document).
"""
from __future__ import annotations

import urllib.parse
from abc import ABC, abstractmethod
from dataclasses import asdict

from moa.data import norms
from moa.data.schema import DataError, json_lines
from moa.errors import UsageError
from moa.synth.bm25 import BM25
from moa.synth.httpjson import HttpClient

DOC_FIELDS = ("id", "culture", "title", "source_type", "text")


class Retriever(ABC):
    """Interface: `search(query, culture, k)` returns up to k documents, best first."""

    name = "retriever"

    @abstractmethod
    def search(self, query: str, culture: str, k: int) -> list[dict]:
        """Up to k documents for `query`, best first."""

    def identity(self) -> dict:
        """What identifies this backend's results (part of the LLM cache key)."""
        return {"retriever": self.name}


def load_corpus(path) -> list[dict]:
    """Read a corpus JSONL (one document per line with DOC_FIELDS); every bad line is reported."""
    docs, problems, seen = [], [], set()
    for number, doc in json_lines(path, problems):
        if not isinstance(doc, dict):
            problems.append((str(path), number, f"expected a JSON object, got {type(doc).__name__}"))
            continue
        bad = [f for f in DOC_FIELDS if not isinstance(doc.get(f), str) or not doc.get(f)]
        if bad:
            problems.append((str(path), number, f"fields {bad} must be non-empty strings; expected {list(DOC_FIELDS)}"))
        elif doc["id"] in seen:
            problems.append((str(path), number, f"duplicate document id {doc['id']!r}"))
        else:
            seen.add(doc["id"])
            docs.append(doc)
    if problems:
        raise DataError(problems)
    return docs


class LocalRetriever(Retriever):
    """BM25 over a local corpus (the bundled one by default); the index covers title and text."""

    name = "bm25"

    def __init__(self, corpus="bundled", k1: float = 1.5, b: float = 0.75):
        self.corpus_name = str(corpus)
        self.docs = norms.corpus() if corpus == "bundled" else load_corpus(corpus)
        self.index = BM25([f"{d['title']}. {d['text']}" for d in self.docs], k1=k1, b=b)
        self.k1, self.b = k1, b

    def search(self, query: str, culture: str | None = None, k: int = 5) -> list[dict]:
        return [self.docs[i] for i, _ in self.index.top(query, k)]

    def identity(self) -> dict:
        return {"retriever": self.name, "corpus": self.corpus_name, "k1": self.k1, "b": self.b}


class SearxngRetriever(Retriever):
    """Web search through a SearXNG instance's JSON API: GET {base_url}/search?q=...&format=json.

    Results become documents with source_type "web search result" and the culture the query was
    made for. `language` is sent with every query: a fixed one ('en', 'ja-JP') or 'culture', the
    culture's main language and region ('ja-JP' for Japan). Timeouts, retries (429 with Retry-After, 5xx) and a request rate limit come from
    HttpClient.
    """

    name = "searxng"

    def __init__(self, base_url: str, timeout_s: float = 10.0, max_retries: int = 3,
                 requests_per_minute: float | None = 30, language: str = "en", client: HttpClient | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise UsageError(f"searxng base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.language = language
        self.client = client or HttpClient(timeout_s=timeout_s, max_retries=max_retries,
                                           requests_per_minute=requests_per_minute)

    def search_language(self, culture: str | None) -> str:
        """The search language: the configured one, or with 'culture' that culture's main language and region."""
        if self.language != "culture":
            return self.language
        c = norms.cultures().get(culture)
        if c is None:
            raise UsageError(f"searxng language 'culture' needs a bundled culture, got {culture!r}")
        return f"{c.language_codes[0]}-{c.region}"

    def search(self, query: str, culture: str | None = None, k: int = 5) -> list[dict]:
        params = urllib.parse.urlencode({"q": query, "format": "json", "language": self.search_language(culture)})
        reply = self.client.request_json("GET", f"{self.base_url}/search?{params}")
        results = reply.get("results") if isinstance(reply, dict) else None
        if not isinstance(results, list):
            raise UsageError(f"searxng reply from {self.base_url} has no 'results' list: {str(reply)[:200]}")
        docs = []
        for result in results:
            if not isinstance(result, dict) or not result.get("url") or not result.get("content"):
                continue
            docs.append({"id": result["url"], "culture": culture or "", "title": result.get("title") or result["url"],
                         "source_type": "web search result", "text": result["content"]})
            if len(docs) == k:
                break
        return docs

    def identity(self) -> dict:
        return {"retriever": self.name, "base_url": self.base_url, "language": self.language}


def make_retriever(retrieval) -> Retriever:
    """The retriever a `retrieval` config section (moa.synth.config) describes: bm25 or searxng."""
    options = {k: v for k, v in asdict(retrieval).items() if k not in ("backend", "top_k")}
    if retrieval.backend == "bm25":
        return LocalRetriever(**options)
    if retrieval.backend == "searxng":
        return SearxngRetriever(**options)
    raise UsageError(f"unknown retrieval backend {retrieval.backend!r}: expected 'bm25' or 'searxng'")


def recall_at_k(retriever: Retriever, labelled: list[dict], k: int = 5) -> float:
    """Mean over queries of |relevant ∩ top-k| / |relevant|; each item has query, culture, relevant."""
    total = 0.0
    for item in labelled:
        found = {d["id"] for d in retriever.search(item["query"], item["culture"], k)}
        total += len(found & set(item["relevant"])) / len(item["relevant"])
    return total / len(labelled)


def culture_precision_at_k(retriever: Retriever, labelled: list[dict], k: int = 5) -> float:
    """Mean share of the top-k documents that belong to the query's culture."""
    shares = []
    for item in labelled:
        docs = retriever.search(item["query"], item["culture"], k)
        shares.append(sum(d["culture"] == item["culture"] for d in docs) / k)
    return sum(shares) / len(shares)


