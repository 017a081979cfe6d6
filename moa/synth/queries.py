"""Search queries per (culture, task): task-specific ones from the task spec's templates over the norm
topics, and task-agnostic ones over broad cultural topics."""
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


@dataclass(frozen=True)
class Query:
    text: str
    kind: str  # "task" (task-specific) or "broad" (task-agnostic)


def make_queries(culture: Culture, spec: TaskSpec | None, broad=BROAD_QUERIES, topics=TOPICS) -> list[Query]:
    """Task-specific queries (each template of `spec` for each topic) followed by the broad ones.

    With spec=None (the stage-1 broad set) only the broad queries and one per topic are made.
    """
    name = culture.name.removeprefix("the ")
    templates = spec.queries if spec is not None else ["{culture} {topic} customs"]
    queries = [Query(t.format(culture=name, topic=topic), "task") for t in templates for topic in topics]
    queries += [Query(b.format(culture=name), "broad") for b in broad]
    return queries
