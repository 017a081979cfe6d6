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
from moa.infer.sampling import short

DEFAULT_MIN_CONFIDENCE = 0.5  # see README "When the prompt names no culture" for the measurements behind it
DECIDERS = ("router", "hint", "fallback", "request")
# a BCP 47 language tag as Accept-Language and `locale` carry it: a language, then optional subtags (script, region)
LANGUAGE_TAG = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$")
QVALUE = re.compile(r"\s*q\s*=\s*(0(?:\.\d{0,3})?|1(?:\.0{0,3})?)\s*")


@dataclass(frozen=True)
class CultureDecision:
    culture: str | None  # a culture name; None: the base model
    router_confidence: float | None  # the router's probability of its own pick (None when no router ran)
    decided_by: str  # one of DECIDERS

    def fields(self) -> dict:
        """The response's `moa` fields: culture ("base" for the base model), router_confidence, decided_by."""
        return {"culture": self.culture or "base", "router_confidence": self.router_confidence,
                "decided_by": self.decided_by}


def add_arguments(parser, who: str, default: float | None = DEFAULT_MIN_CONFIDENCE) -> None:
    """--min-router-confidence and --fallback-culture on a CLI whose `who` ("an `auto` request") the rule decides."""
    parser.add_argument("--min-router-confidence", type=float, default=default,
                        help=f"{who} runs the router's pick only when the router gives it at least this probability, "
                             f"else its culture hint, else --fallback-culture (default: {DEFAULT_MIN_CONFIDENCE})")
    parser.add_argument("--fallback-culture", default=None,
                        help=f"the culture {who} runs when the router abstains and there is no hint (default: the base "
                             f"model, no adapter)")


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
    region (`JP`: any `*-JP` locale) and its main language where no other bundled culture shares it (`ja`; not
    `en`, the main language of nigeria and united_states, whichever of them the model holds). Keys are upper
    case for regions and lower case for languages."""
    from moa.data.norms import cultures as profiles

    bundled = profiles()
    speakers: dict[str, list[str]] = {}
    for name, profile in bundled.items():
        speakers.setdefault(profile.language_codes[0].lower(), []).append(name)
    table = {}
    for name in cultures:
        if name in bundled:
            table[bundled[name].region.upper()] = name
            language = bundled[name].language_codes[0].lower()
            if speakers[language] == [name]:
                table[language] = name
    return table


def culture_for_locale(locale: str, table: dict[str, str]) -> str | None:
    """The culture a locale names through `table`: its region if it has one in the table, else its language;
    None when neither is there. ValueError when `locale` is not a language tag."""
    if not isinstance(locale, str) or not LANGUAGE_TAG.match(locale):
        raise ValueError(f"{short(locale)} is not a language tag: expected e.g. 'ja-JP', 'pt-BR' or 'de'")
    language, *subtags = re.split(r"[-_]", locale)
    for region in (s.upper() for s in subtags if len(s) == 2 or s.isdigit()):
        if region in table:
            return table[region]
    return table.get(language.lower())


def accept_language_culture(header: str, table: dict[str, str]) -> str | None:
    """The culture of the most preferred language range of an Accept-Language header that the table maps
    (`fr-FR, ja;q=0.8` -> japan); None when none maps (`*` and ranges of q=0 never do). ValueError on a range
    that is not a language tag or a q-value that is not one (RFC 9110: 0 to 1, at most three decimals)."""
    ranges = []
    for position, item in enumerate(part.strip() for part in header.split(",")):
        if not item:
            continue
        tag, _, params = item.partition(";")
        q = 1.0
        if params:
            match = QVALUE.fullmatch(params)
            if match is None:
                raise ValueError(f"Accept-Language range {short(item)}: expected 'tag' or 'tag;q=0.5' (q from 0 to 1)")
            q = float(match.group(1))
        tag = tag.strip()
        if tag != "*" and not LANGUAGE_TAG.match(tag):
            raise ValueError(f"Accept-Language range {short(item)}: not a language tag (e.g. 'ja-JP', 'de')")
        if q > 0 and tag != "*":
            ranges.append((-q, position, tag))
    for _, _, tag in sorted(ranges):
        if (culture := culture_for_locale(tag, table)) is not None:
            return culture
    return None


class HintError(ValueError):
    """A culture hint that cannot be used; `param` names its field (culture_hint, locale, accept_language)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def request_hint(cultures: list[str], culture_hint: str | None = None, locale: str | None = None,
                 accept_language: str | None = None) -> str | None:
    """A request's culture hint, every given source checked, the first that names a culture winning:
    `culture_hint` (one of `cultures`), else `locale` mapped through `locale_table(cultures)`, else the
    Accept-Language header's most preferred range that the table maps (a header none of whose ranges maps
    gives no hint: browsers send one on every request). HintError naming the field: a culture hint that is
    not one of `cultures`, a locale that is not a language tag or maps to none of them, a malformed header."""
    table = locale_table(cultures)
    if culture_hint is not None and culture_hint not in cultures:
        raise HintError("culture_hint", f"unknown culture hint {short(culture_hint)}: expected one of {list(cultures)}")
    from_locale = None
    if locale is not None:
        try:
            from_locale = culture_for_locale(locale, table)
        except ValueError as e:
            raise HintError("locale", f"locale {e}") from None
        if from_locale is None:
            raise HintError("locale", f"locale {short(locale)} maps to none of this model's cultures {list(cultures)}: "
                                      f"the locales it maps are {sorted(table)}")
    from_header = None
    if accept_language is not None:
        try:
            from_header = accept_language_culture(accept_language, table)
        except ValueError as e:
            raise HintError("accept_language", str(e)) from None
    return culture_hint or from_locale or from_header


def check_fallback(fallback: str | None, cultures: list[str]) -> str | None:
    """The fallback culture, checked to be one of `cultures` (None: the base model)."""
    if fallback is not None and fallback not in cultures:
        raise UsageError(f"--fallback-culture {fallback!r} is not one of the model's cultures {list(cultures)} "
                         "(leave it out to fall back to the base model)")
    return fallback
