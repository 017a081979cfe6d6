"""BM25 scoring, the local corpus retriever and its recall on a labelled query set."""
import json
import math
from pathlib import Path

import pytest

from moa.data import CULTURES, DataError, norms
from moa.synth.bm25 import BM25, tokenize
from moa.synth.retrieval import LocalRetriever, load_corpus, recall_at_k

LABELLED = Path(norms.BUNDLED) / "retrieval_queries.jsonl"


def labelled_queries():
    docs = norms.corpus()
    items = []
    for line in LABELLED.read_text().splitlines():
        item = json.loads(line)
        item["relevant"] = [d["id"] for d in docs if d["culture"] == item["culture"] and item["norm"] in d["norms"]]
        assert item["relevant"], item
        items.append(item)
    return items


def test_tokenize_lowercases_strips_accents_stop_words_and_suffixes():
    assert tokenize("Tipping the Waiters in São Paulo") == ["tip", "waiter", "sao", "paulo"]
    assert tokenize("customs, tips; TIP") == ["custom", "tip", "tip"]


def test_bm25_matches_the_formula():
    texts = ["tea tea coffee", "coffee milk", "water"]
    index = BM25(texts, k1=1.2, b=0.75)
    avgdl = (3 + 2 + 1) / 3
    idf = lambda df: math.log(1 + (3 - df + 0.5) / (df + 0.5))
    term = lambda tf, dl, df: idf(df) * tf * 2.2 / (tf + 1.2 * (1 - 0.75 + 0.75 * dl / avgdl))
    expected = [term(2, 3, 1) + term(1, 3, 2), term(1, 2, 2), 0.0]
    assert index.scores("tea coffee") == pytest.approx(expected)
    assert index.top("tea coffee", 5) == [(0, pytest.approx(expected[0])), (1, pytest.approx(expected[1]))]
    assert index.top("unknown words", 5) == []


def test_recall_at_5_on_labelled_culture_queries():
    items = labelled_queries()
    assert len(items) >= 50 and {i["culture"] for i in items} == set(CULTURES)
    retriever = LocalRetriever()
    assert recall_at_k(retriever, items, k=5) >= 0.9
    assert recall_at_k(retriever, items, k=1) >= 0.8


def test_country_topic_queries_find_that_cultures_documents():
    retriever = LocalRetriever()
    hits = total = 0
    for culture, c in norms.cultures().items():
        for topic in norms.TOPICS:
            docs = retriever.search(f"{norms.TOPIC_TITLES[topic]} in {c.name}", culture, 5)
            total += 1
            hits += any(d["culture"] == culture and d["topic"] == topic for d in docs)
    assert hits / total >= 0.95


def test_custom_corpus_file_and_its_errors(tmp_path):
    good = {"id": "d1", "culture": "japan", "title": "Bowing", "source_type": "blog", "text": "People bow deeply."}
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "d2", "text": "Shoes off indoors."}) + "\n")
    retriever = LocalRetriever(corpus=path)
    assert [d["id"] for d in retriever.search("shoes indoors", "japan", 5)] == ["d2"]
    path.write_text(json.dumps(good) + "\n[1]\n" + json.dumps({**good, "text": ""}) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(DataError) as info:
        load_corpus(path)
    assert [line for _, line, _ in info.value.problems] == [2, 3, 4]
    assert f"{path}:4: duplicate document id 'd1'" in str(info.value)
