"""The bundled norms table, culture profiles and corpus."""
from collections import Counter
from pathlib import Path

from moa.data import CULTURES, LABELS, norms
from moa.synth.tasks import load_tasks

TASK_DIR = Path(__file__).resolve().parents[1] / "configs" / "tasks"


def test_at_least_30_questions_conflict_across_three_cultures():
    conflicting = norms.conflicting_questions(min_cultures=3)
    assert len(conflicting) >= 30
    for q in conflicting:
        witnesses = norms.conflict_witnesses(q, 3)
        # three cultures with three different gold answers ...
        assert len({q.answers[c] for c in witnesses}) == 3
        # ... each of which is wrong in the other two (not listed there as also correct)
        for a in witnesses:
            for b in witnesses:
                if a != b:
                    assert q.answers[b] not in q.correct(a)
                    assert q.options[q.answers[a]] != q.options[q.answers[b]]


def test_table_covers_every_culture():
    qs, ts = norms.questions(), norms.taboos()
    for culture in CULTURES:
        assert sum(culture in q.answers for q in qs) >= 20, culture
        labels = Counter(t.labels[culture] for t in ts if culture in t.labels)
        assert labels["offensive"] >= 1 and labels["not_offensive"] >= 1, culture
    assert {q.topic for q in qs} | {t.topic for t in ts} == set(norms.TOPICS)


def test_question_texts_carry_no_cultural_cue():
    for q in norms.questions():
        for text in [q.q, q.act, q.fact, *q.options.values()]:
            assert not norms.cultures_mentioned(text), (q.id, text)
    for t in norms.taboos():
        assert not norms.cultures_mentioned(t.act), (t.id, t.act)


def test_culture_cues_are_unambiguous():
    assert list(norms.cultures()) == CULTURES
    for culture, c in norms.cultures().items():
        for cue in c.places + c.aliases:
            assert norms.cultures_mentioned(cue) == {culture}, cue
        assert len(c.names) >= 8 and len(c.places) >= 8


def test_every_document_names_its_culture_and_source_type():
    docs = norms.corpus()
    assert len({d["id"] for d in docs}) == len(docs)
    for doc in docs:
        name = norms.cultures()[doc["culture"]].name.removeprefix("the ")
        assert name in doc["title"] and name in doc["text"], doc["id"]
        assert doc["source_type"] in set(norms.SOURCE_TYPES.values())
        assert f"({doc['source_type']})" in doc["text"]
        assert len(doc["norms"]) <= norms.NORMS_PER_DOCUMENT
    covered = {(d["culture"], n) for d in docs for n in d["norms"]}
    for q in norms.questions():
        assert all((c, q.id) in covered for c in q.answers)
    for culture in CULTURES:
        assert {d["topic"] for d in docs if d["culture"] == culture} >= {"general", "values"}


def test_facts_state_the_documented_answer():
    q = next(q for q in norms.questions() if q.id == "tipping_restaurant")
    assert norms.question_fact(q, "japan").startswith("In Japan, diners usually tip nothing at all")
    assert norms.question_fact(q, "united_states").startswith("In the United States, diners usually tip 15 to 20")
    t = next(t for t in norms.taboos() if t.id == "clock_gift")
    assert norms.taboo_fact(t, "china").startswith("In China, it is considered offensive when someone gives a clock")


def test_task_specs_match_the_schema_labels():
    specs = load_tasks(TASK_DIR, ["mcq", "yesno", "offensive", "open"])
    for name, spec in specs.items():
        assert spec.labels == LABELS.get(name)
        assert spec.max_prompt_bytes <= 300
        assert len(spec.examples) >= 2
