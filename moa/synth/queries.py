"""Search queries per (culture, task): task-specific ones from the task spec's templates over the norm
topics, task-agnostic ones over broad cultural topics, and (where the config asks) queries in the
culture's own languages, for documents written in them."""
from __future__ import annotations

from dataclasses import dataclass

from moa.data.norms import TOPICS, Culture
from moa.synth.tasks import TaskSpec

BROAD_QUERIES = [
    "{culture} culture core values",
    "{culture} general facts capital language currency",
    "everyday life and social customs in {culture}",
    "{culture} family traditions",
    "{culture} food and dining culture",
    "{culture} festivals and public holidays",
    "{culture} manners visitors should know",
    "{culture} work culture and business etiquette",
]

# Broad queries per language (BCP 47 code); {culture} is the culture's native_name.
NATIVE_QUERIES = {
    "zh": ["{culture}的文化和习俗", "{culture}的礼仪和禁忌", "{culture}的饮食文化", "{culture}的传统节日"],
    "hi": ["{culture} की संस्कृति और रीति-रिवाज", "{culture} में शिष्टाचार", "{culture} का भोजन", "{culture} के त्योहार"],
    "ja": ["{culture}の文化と習慣", "{culture}のマナーとタブー", "{culture}の食文化", "{culture}の年中行事"],
    "ko": ["{culture}의 문화와 풍습", "{culture}의 예절과 금기", "{culture}의 음식 문화", "{culture}의 명절"],
    "de": ["Kultur und Bräuche in {culture}", "Umgangsformen und Tabus in {culture}", "Essen und Trinken in {culture}",
           "Feiertage in {culture}"],
    "pt": ["cultura e costumes do {culture}", "etiqueta e tabus no {culture}", "culinária do {culture}",
           "festas e feriados do {culture}"],
    "ar": ["ثقافة وعادات {culture}", "آداب السلوك والمحرمات في {culture}", "الطعام في {culture}", "الأعياد في {culture}"],
    "es": ["cultura y costumbres de {culture}", "etiqueta y tabúes en {culture}", "comida de {culture}",
           "fiestas de {culture}"],
}


@dataclass(frozen=True)
class Query:
    text: str
    kind: str  # "task" (task-specific), "broad" (task-agnostic) or "native" (in the culture's language)


def make_queries(culture: Culture, spec: TaskSpec | None, broad=BROAD_QUERIES, topics=TOPICS,
                 languages: str = "english", native: dict = NATIVE_QUERIES) -> list[Query]:
    """Task-specific queries (each template of `spec` for each topic) followed by the broad ones, then
    (languages "both" or "native") the `native` templates of every language the culture declares;
    "native" leaves out the English ones.

    With spec=None (the stage-1 broad set) only the broad queries and one per topic are made.
    """
    name = culture.name.removeprefix("the ")
    templates = spec.queries if spec is not None else ["{culture} {topic} customs"]
    queries = []
    if languages in ("english", "both"):
        queries += [Query(t.format(culture=name, topic=topic), "task") for t in templates for topic in topics]
        queries += [Query(b.format(culture=name), "broad") for b in broad]
    if languages in ("native", "both"):
        queries += [Query(t.format(culture=culture.native_name), "native")
                    for code in culture.language_codes for t in native.get(code, [])]
    return queries
