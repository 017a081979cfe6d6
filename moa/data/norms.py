"""The bundled cultural knowledge: culture profiles, the norms table and the corpus built on it.

`bundled/cultures.yaml` holds each culture's names and cues, `bundled/norms.yaml` the norm
questions (one correct option per culture) and taboos (offensive or not, per culture). The local
corpus is written from these: one short document per culture and topic (at most three norms
each) plus a general profile and a values document per culture. Every document names its culture
and its source type.
"""
from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from moa.config_loader import load_yaml
from moa.data.schema import CULTURES
from moa.errors import UsageError

BUNDLED = Path(__file__).parent / "bundled"
TOPICS = ["greetings", "dining", "tipping", "gifts", "hospitality", "punctuality", "family", "work", "dress",
          "holidays"]
TOPIC_TITLES = {
    "greetings": "Greetings and gestures", "dining": "Dining etiquette", "tipping": "Tipping, money and markets",
    "gifts": "Gift giving", "hospitality": "Hospitality and home visits", "punctuality": "Punctuality and time",
    "family": "Family life", "work": "Work and business etiquette", "dress": "Dress and appearance",
    "holidays": "Holidays and celebrations",
}
SOURCE_TYPES = {
    "greetings": "etiquette guide", "dining": "etiquette guide", "tipping": "travel guide",
    "gifts": "etiquette guide", "hospitality": "travel guide", "punctuality": "business etiquette guide",
    "family": "encyclopedia", "work": "business etiquette guide", "dress": "travel guide",
    "holidays": "encyclopedia", "general": "encyclopedia", "values": "cultural studies text",
}
TABOO_LABELS = ("offensive", "not_offensive")
NORMS_PER_DOCUMENT = 3


@dataclass(frozen=True)
class Culture:
    key: str
    name: str
    adjective: str
    aliases: list
    capital: str
    languages: str
    currency: str
    dishes: str
    holidays: str
    values: str
    places: list
    names: list
    language_codes: list  # BCP 47 codes of the languages its documents and queries may be in, main first
    region: str  # ISO 3166-1 alpha-2, passed to web search with the language
    native_name: str  # the country's name in its main language (the {culture} slot of native queries)

    @property
    def title(self) -> str:
        """The name with a capital first letter, for the start of a sentence."""
        return self.name[0].upper() + self.name[1:]


@dataclass(frozen=True)
class Question:
    id: str
    topic: str
    q: str
    fact: str
    act: str
    options: dict
    answers: dict
    also: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    yesno: bool = True

    def correct(self, culture: str) -> set:
        """Every option letter that is correct in `culture` (the answer and its `also` letters)."""
        return {self.answers[culture], *self.also.get(culture, [])}


@dataclass(frozen=True)
class Taboo:
    id: str
    topic: str
    act: str
    labels: dict
    notes: dict = field(default_factory=dict)


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise UsageError(f"{where}: {message}")


def _check_cultures(mapping: dict, where: str, what: str) -> None:
    for key in mapping:
        _require(key in CULTURES, where, f"unknown culture {key!r} in {what}: expected one of {CULTURES}")


@functools.lru_cache(maxsize=None)
def cultures() -> dict:
    """culture key -> Culture, in the order of moa.data.CULTURES."""
    raw = load_yaml(BUNDLED / "cultures.yaml")
    _require(list(raw) == CULTURES, "cultures.yaml", f"cultures {list(raw)} must be {CULTURES} in that order")
    return {key: Culture(key=key, **fields) for key, fields in raw.items()}


def _question(raw: dict) -> Question:
    where = f"norms.yaml question {raw.get('id')!r}"
    question = Question(**raw)
    _require(question.topic in TOPICS, where, f"unknown topic {question.topic!r}: expected one of {TOPICS}")
    _require(2 <= len(question.options) <= 4, where, "needs 2 to 4 options")
    _require(list(question.options) == ["A", "B", "C", "D"][:len(question.options)], where,
             f"option letters {list(question.options)} must run A, B, ...")
    for text in (question.fact, question.act):
        _require("{o}" in text, where, f"{text!r} needs an {{o}} slot")
    _check_cultures(question.answers, where, "answers")
    _check_cultures(question.also, where, "also")
    _check_cultures(question.notes, where, "notes")
    for culture, letters in [(c, [a]) for c, a in question.answers.items()] + list(question.also.items()):
        for letter in letters:
            _require(letter in question.options, where, f"{culture}: unknown option {letter!r}")
    _require(len(set(question.answers.values())) >= 2, where, "answers must differ between cultures")
    return question


def _taboo(raw: dict) -> Taboo:
    where = f"norms.yaml taboo {raw.get('id')!r}"
    taboo = Taboo(**raw)
    _require(taboo.topic in TOPICS, where, f"unknown topic {taboo.topic!r}: expected one of {TOPICS}")
    _check_cultures(taboo.labels, where, "labels")
    _check_cultures(taboo.notes, where, "notes")
    for culture, label in taboo.labels.items():
        _require(label in TABOO_LABELS, where, f"{culture}: label {label!r} is not one of {TABOO_LABELS}")
    return taboo


@functools.lru_cache(maxsize=None)
def _norms() -> tuple:
    raw = load_yaml(BUNDLED / "norms.yaml")
    qs = [_question(q) for q in raw["questions"]]
    ts = [_taboo(t) for t in raw["taboos"]]
    ids = [n.id for n in qs + ts]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    _require(not duplicates, "norms.yaml", f"duplicate norm ids {duplicates}")
    return qs, ts


def questions() -> list:
    """The norm questions of the bundled table."""
    return list(_norms()[0])


def taboos() -> list:
    """The taboos (behaviours judged offensive or not) of the bundled table."""
    return list(_norms()[1])


def norm_ids() -> list:
    return [n.id for n in questions() + taboos()]


def conflict_witnesses(question: Question, size: int = 3) -> tuple | None:
    """`size` cultures whose answers are pairwise different and each wrong in the others, if any."""
    for group in itertools.combinations(question.answers, size):
        if all(question.answers[b] not in question.correct(a) for a in group for b in group if a != b):
            return group
    return None


def conflicting_questions(min_cultures: int = 3) -> list:
    """Questions on which at least `min_cultures` cultures have mutually exclusive correct answers."""
    return [q for q in questions() if conflict_witnesses(q, min_cultures)]


def question_fact(question: Question, culture: str) -> str:
    """The documented custom as a sentence, with its supporting note."""
    c = cultures()[culture]
    text = f"In {c.name}, {question.fact.format(o=question.options[question.answers[culture]])}."
    note = question.notes.get(culture)
    return f"{text} {note}" if note else text


def taboo_fact(taboo: Taboo, culture: str) -> str:
    c = cultures()[culture]
    verdict = "considered offensive" if taboo.labels[culture] == "offensive" else "not considered offensive"
    text = f"In {c.name}, it is {verdict} when someone {taboo.act}."
    note = taboo.notes.get(culture)
    return f"{text} {note}" if note else text


def profile_facts(culture: str) -> dict:
    """General-knowledge facts about a culture: name -> sentence."""
    c = cultures()[culture]
    return {
        "capital": f"The capital of {c.name} is {c.capital}.",
        "languages": f"The main language of {c.name}: {c.languages}.",
        "currency": f"The currency of {c.name} is {c.currency}.",
        "dishes": f"Well-known dishes of {c.name} include {c.dishes}.",
        "holidays": f"Major holidays in {c.name} include {c.holidays}.",
    }


@functools.lru_cache(maxsize=None)
def _corpus() -> tuple:
    docs = []
    for culture, c in cultures().items():
        docs.append({"id": f"{culture}-general", "culture": culture, "topic": "general",
                     "source_type": SOURCE_TYPES["general"], "title": f"{c.title}: general profile",
                     "norms": [], "text": f"{c.title}: general profile (encyclopedia). "
                                          + " ".join(profile_facts(culture).values())})
        docs.append({"id": f"{culture}-values", "culture": culture, "topic": "values",
                     "source_type": SOURCE_TYPES["values"], "title": f"Core values in {c.name}",
                     "norms": [], "text": f"Core values in {c.name} (cultural studies text). {c.values}"})
        for topic in TOPICS:
            facts = [(q.id, question_fact(q, culture)) for q in questions() if q.topic == topic and culture in q.answers]
            facts += [(t.id, taboo_fact(t, culture)) for t in taboos() if t.topic == topic and culture in t.labels]
            for part, start in enumerate(range(0, len(facts), NORMS_PER_DOCUMENT), start=1):
                chunk = facts[start:start + NORMS_PER_DOCUMENT]
                docs.append({"id": f"{culture}-{topic}-{part}", "culture": culture, "topic": topic,
                             "source_type": SOURCE_TYPES[topic], "title": f"{TOPIC_TITLES[topic]} in {c.name}",
                             "norms": [norm for norm, _ in chunk],
                             "text": f"{TOPIC_TITLES[topic]} in {c.name} ({SOURCE_TYPES[topic]}). "
                                     + " ".join(text for _, text in chunk)})
    return tuple(docs)


def corpus() -> list:
    """The bundled local corpus: dicts with id, culture, topic, source_type, title, norms, text."""
    return [dict(doc) for doc in _corpus()]


@functools.lru_cache(maxsize=None)
def _cue_patterns() -> dict:
    patterns = {}
    for culture, c in cultures().items():
        words = sorted(set(c.aliases) | set(c.places), key=len, reverse=True)
        patterns[culture] = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b")
    return patterns


def cultures_mentioned(text: str) -> set:
    """The bundled cultures whose country name, adjective or place names occur in `text`."""
    return {culture for culture, pattern in _cue_patterns().items() if pattern.search(text)}
