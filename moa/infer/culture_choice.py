"""What decides the culture of a request that leaves it to the model (`auto`, `--routing prompt`).

1. The router's pick for the prompt, when its confidence is at least `min_confidence`
   (`decided_by: "router"`). The router is trained to spread its probability evenly over the cultures
   on prompts that name none (moa.routing.NO_CULTURE), so a low top probability means "no culture".
2. Below it the router abstains, and the request's culture hint decides (`"hint"`): a culture name, or
   a locale (`ja-JP`) mapped through `locale_table`.
3. With no hint, the fallback (`"fallback"`): the base model, or a default culture the caller configures.

A request that names its culture is run with it (`"request"`); the router does not decide it.

The same rule runs in `moa serve` (and its `--upstream` front), `moa generate` and `moa eval`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from moa.errors import UsageError

DEFAULT_MIN_CONFIDENCE = 0.5  # see README "When the prompt names no culture" for the measurements behind it
DECIDERS = ("router", "hint", "fallback", "request")
# a BCP 47 language tag as Accept-Language and `locale` carry it: a language, then optional subtags (script, region)
LANGUAGE_TAG = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$")


@dataclass(frozen=True)
class CultureDecision:
    culture: str | None  # a culture name; None: the base model
    router_confidence: float | None  # the router's probability of its own pick (None when no router ran)
    decided_by: str  # one of DECIDERS

    def fields(self) -> dict:
        """The response's `moa` fields: culture ("base" for the base model), router_confidence, decided_by."""
        return {"culture": self.culture or "base", "router_confidence": self.router_confidence,
                "decided_by": self.decided_by}


def check_min_confidence(value: float, name: str = "--min-router-confidence") -> float:
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"{name} must be within [0, 1] (a probability), got {value}")
    return value


def decide(router_culture: str, router_confidence: float, hint: str | None, min_confidence: float,
           fallback: str | None = None) -> CultureDecision:
    """The culture a request runs with: the router's pick if confident enough, else the hint, else the fallback
    (None: the base model)."""
    if router_confidence >= min_confidence:
        return CultureDecision(router_culture, router_confidence, "router")
    if hint is not None:
        return CultureDecision(hint, router_confidence, "hint")
    return CultureDecision(fallback, router_confidence, "fallback")


def locale_table(cultures: list[str]) -> dict[str, str]:
    """{locale: culture} for the model's cultures that moa bundles a profile of (moa.data.norms): each culture's
    region (`JP`: any `*-JP` locale) and its main language where no other of these cultures shares it (`ja`).
    Keys are upper case for regions and lower case for languages."""
    from moa.data.norms import cultures as profiles

    known = {name: profiles()[name] for name in cultures if name in profiles()}
    table = {profile.region.upper(): name for name, profile in known.items()}
    main = {}
    for name, profile in known.items():
        main.setdefault(profile.language_codes[0].lower(), []).append(name)
    table.update({language: names[0] for language, names in main.items() if len(names) == 1})
    return table


def culture_for_locale(locale: str, table: dict[str, str]) -> str | None:
    """The culture a locale names through `table`: its region if it has one in the table, else its language;
    None when neither is there. ValueError when `locale` is not a language tag."""
    if not isinstance(locale, str) or not LANGUAGE_TAG.match(locale):
        raise ValueError(f"{locale!r} is not a language tag: expected e.g. 'ja-JP', 'pt-BR' or 'de'")
    language, *subtags = re.split(r"[-_]", locale)
    for region in (s.upper() for s in subtags if len(s) == 2 or s.isdigit()):
        if region in table:
            return table[region]
    return table.get(language.lower())


def accept_language_culture(header: str, table: dict[str, str]) -> str | None:
    """The culture of the most preferred language range of an Accept-Language header that the table maps
    (`fr-FR, ja;q=0.8` -> japan); None when none maps. ValueError on a range that is not a language tag."""
    ranges = []
    for position, item in enumerate(part.strip() for part in header.split(",")):
        if not item:
            continue
        tag, _, params = item.partition(";")
        q = 1.0
        match = re.fullmatch(r"\s*q\s*=\s*([01](?:\.\d{0,3})?)\s*", params) if params else None
        if params and match is None:
            raise ValueError(f"Accept-Language range {item!r}: expected 'tag' or 'tag;q=0.5'")
        if match is not None:
            q = float(match.group(1))
        ranges.append((-q, position, tag.strip()))
    for _, _, tag in sorted(ranges):
        if tag == "*" or (culture := culture_for_locale(tag, table)) is None:
            continue
        return culture
    return None
