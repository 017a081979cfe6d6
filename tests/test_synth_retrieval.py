"""BM25 scoring, the local corpus retriever and its recall on a labelled query set."""
import json
import math
from pathlib import Path

import pytest

from moa.data import CULTURES, DataError, norms
from moa.synth.bm25 import BM25, tokenize
from moa.synth.queries import make_queries
from moa.synth.retrieval import LocalRetriever, load_corpus, recall_at_k

LABELLED = Path(norms.BUNDLED) / "retrieval_queries.jsonl"
DATA = Path(__file__).parent / "data"


def labelled_queries():
    docs = norms.corpus()
    items = []
    for line in LABELLED.read_text().splitlines():
        item = json.loads(line)
        item["relevant"] = [d["id"] for d in docs if d["culture"] == item["culture"] and item["norm"] in d["norms"]]
        assert item["relevant"], item
        items.append(item)
    return items


def test_tokenize_folds_case_keeps_accents_and_reads_every_script():
    assert tokenize("Tipping the Waiters in São Paulo") == ["tip", "waiter", "são", "paulo"]
    assert tokenize("customs, tips; TIP") == ["custom", "tip", "tip"]
    assert tokenize("Größe") == tokenize("GRÖSSE") != tokenize("groe")
    assert tokenize("ﾃｽﾄ ＡＢＣ") == ["テス", "スト", "abc"]  # NFKC: half-width kana and full-width letters
    assert tokenize("日本の茶道") == ["日本", "本の", "の茶", "茶道"]  # unspaced scripts: character bigrams
    assert tokenize("서울에서") == ["서울", "울에", "에서"] and tokenize("茶") == ["茶"]
    assert tokenize("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # vowel signs and virama stay in the word
    assert tokenize("القَهْوَة") == tokenize("قهوة")  # Arabic: vowel marks and the article dropped
    assert tokenize("Ελληνικός ΚΑΦΈΣ") == ["ελληνικόσ", "καφέσ"]
    assert tokenize("tea 中文 чай") == ["tea", "中文", "чай"]


def test_recall_at_5_in_every_script_on_a_mixed_language_corpus():
    """Documents in eight languages (eight scripts) in one corpus, each the others' distractors;
    queries in each language must find their document."""
    items = [json.loads(line) for line in (DATA / "multilingual_queries.jsonl").read_text(encoding="utf-8").splitlines()]
    retriever = LocalRetriever(corpus=DATA / "multilingual_corpus.jsonl")
    languages = dict.fromkeys(i["language"] for i in items)
    assert set(languages) >= {"de", "ru", "el", "ar", "hi", "zh", "ja", "ko"}
    report = {}
    for language in languages:
        mine = [{**i, "culture": None} for i in items if i["language"] == language]
        report[language] = recall_at_k(retriever, mine, k=5)
    print("recall@5 per language:", report)
    assert all(r >= 0.9 for r in report.values()), report


def test_native_queries_find_documents_in_the_cultures_language(tmp_path):
    docs = [{"id": "ja-1", "culture": "japan", "title": "日本の文化と習慣", "source_type": "blog",
             "text": "日本ではお辞儀で挨拶し、家に上がるときは靴を脱ぎます。"},
            {"id": "ar-1", "culture": "egypt", "title": "ثقافة مصر", "source_type": "blog",
             "text": "عادات مصر في الطعام والأعياد وآداب السلوك."},
            {"id": "en-1", "culture": "japan", "title": "Japan", "source_type": "blog", "text": "Bowing in Japan."}]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    retriever = LocalRetriever(corpus=path)
    cultures = norms.cultures()
    assert cultures["japan"].language_codes[0] == "ja" and cultures["egypt"].region == "EG"
    for culture, doc_id in (("japan", "ja-1"), ("egypt", "ar-1")):
        queries = make_queries(cultures[culture], None, languages="native")
        assert queries and {q.kind for q in queries} == {"native"}
        assert all(retriever.search(q.text, culture, 1)[0]["id"] == doc_id for q in queries)
    both = make_queries(cultures["japan"], None, languages="both")
    assert {q.kind for q in both} == {"task", "broad", "native"}


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
