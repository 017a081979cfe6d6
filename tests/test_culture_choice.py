"""The culture decision rule of `auto` / `--routing prompt`: the locale table, locale and Accept-Language parsing, decide."""
import pytest

from moa.data import CULTURES
from moa.errors import UsageError
from moa.infer.culture_choice import (DECIDERS, DEFAULT_MIN_CONFIDENCE, HintError, accept_language_culture,
                                      check_fallback, check_min_confidence, culture_for_locale, decide, locale_table,
                                      request_hint)

THREE = ["japan", "india", "nigeria"]


def test_locale_table_maps_regions_and_unshared_main_languages():
    assert locale_table(CULTURES) == {
        "CN": "china", "IN": "india", "JP": "japan", "KR": "south_korea", "DE": "germany", "BR": "brazil",
        "NG": "nigeria", "EG": "egypt", "MX": "mexico", "US": "united_states",
        "zh": "china", "hi": "india", "ja": "japan", "ko": "south_korea", "de": "germany", "pt": "brazil",
        "ar": "egypt", "es": "mexico"}
    # English is the main language of two bundled cultures: it maps to neither, even where the model holds one
    assert locale_table(THREE) == {"JP": "japan", "ja": "japan", "IN": "india", "hi": "india", "NG": "nigeria"}
    assert locale_table(["shared", "my_town"]) == {}  # cultures moa bundles no profile of have no locale


@pytest.mark.parametrize("locale,culture", [
    ("ja-JP", "japan"), ("ja", "japan"), ("JA_jp", "japan"), ("en-IN", "india"), ("en-NG", "nigeria"),
    ("hi", "india"), ("zh-Hant-JP", "japan"), ("en", None), ("en-US", None), ("fr-FR", None), ("ja-FR", "japan"),
])
def test_culture_for_locale_reads_the_region_then_the_language(locale, culture):
    assert culture_for_locale(locale, locale_table(THREE)) == culture


@pytest.mark.parametrize("locale", ["", "j", "japanese-x", "ja JP", "12-JP", "ja-", "*", 5, None])
def test_culture_for_locale_refuses_what_is_no_language_tag(locale):
    with pytest.raises(ValueError, match="is not a language tag"):
        culture_for_locale(locale, locale_table(THREE))


@pytest.mark.parametrize("header,culture", [
    ("ja-JP", "japan"),
    ("fr-FR, ja;q=0.8", "japan"),  # the first range maps to nothing: the next preferred one decides
    ("ja;q=0.5, en-IN;q=0.9", "india"),  # by q-value, not by position
    ("en-NG;q=0.7, hi;q=0.7", "nigeria"),  # equal q: the first wins
    ("fr, de", None),  # well-formed, nothing maps: no hint
    ("*", None),
    ("ja;q=0, fr", None),  # q=0: not acceptable
    ("  ja-JP ; q = 1.000 ,", "japan"),
])
def test_accept_language_takes_the_most_preferred_range_that_maps(header, culture):
    assert accept_language_culture(header, locale_table(THREE)) == culture


@pytest.mark.parametrize("header", ["ja;q=2", "ja;q=1.5", "ja;q=0.1234", "ja;level=1", "ja-", "j@pan", "ja;q="])
def test_accept_language_refuses_a_malformed_range(header):
    with pytest.raises(ValueError, match="Accept-Language range"):
        accept_language_culture(header, locale_table(THREE))


def test_request_hint_precedence_and_errors_naming_the_field():
    assert request_hint(THREE) is None
    assert request_hint(THREE, "india", "ja-JP", "en-NG") == "india"
    assert request_hint(THREE, None, "ja-JP", "en-NG") == "japan"
    assert request_hint(THREE, None, None, "en-NG") == "nigeria"
    assert request_hint(THREE, None, None, "fr-FR") is None
    for kwargs, param, text in (({"culture_hint": "france"}, "culture_hint", "unknown culture hint 'france'"),
                                ({"culture_hint": "india", "locale": "fr-FR"}, "locale", "'fr-FR' maps to none"),
                                ({"locale": "x!"}, "locale", "'x!' is not a language tag"),
                                ({"locale": "ja", "accept_language": "ja;q=9"}, "accept_language", "'ja;q=9'")):
        with pytest.raises(HintError, match=text) as e:
            request_hint(THREE, **kwargs)
        assert e.value.param == param
    with pytest.raises(HintError, match=r"expected one of \['japan', 'india', 'nigeria'\]"):
        request_hint(THREE, "germany")


def test_decide_router_above_the_threshold_then_hint_then_fallback():
    assert decide("japan", 0.9, "india", 0.5).fields() == {"culture": "japan", "router_confidence": 0.9,
                                                           "decided_by": "router"}
    assert decide("japan", 0.5, None, 0.5).decided_by == "router"  # at the threshold the router decides
    assert decide("japan", 0.49, "india", 0.5).fields() == {"culture": "india", "router_confidence": 0.49,
                                                            "decided_by": "hint"}
    assert decide("japan", 0.49, None, 0.5).fields() == {"culture": "base", "router_confidence": 0.49,
                                                         "decided_by": "fallback"}
    assert decide("japan", 0.49, None, 0.5, fallback="nigeria").culture == "nigeria"
    assert decide("japan", 0.999, None, 1.0).decided_by == "fallback"  # 1.0: the router always abstains
    assert decide("japan", 0.0, "india", 0.0).decided_by == "router"  # 0.0: the router always decides
    assert {"router", "hint", "fallback", "request"} == set(DECIDERS)


def test_settings_are_checked():
    assert check_min_confidence(DEFAULT_MIN_CONFIDENCE) == DEFAULT_MIN_CONFIDENCE
    for bad in (-0.1, 1.5):
        with pytest.raises(UsageError, match=f"--min-router-confidence must be within \\[0, 1\\].*{bad}"):
            check_min_confidence(bad)
    assert check_fallback(None, THREE) is None and check_fallback("india", THREE) == "india"
    with pytest.raises(UsageError, match="--fallback-culture 'france' is not one of the model's cultures"):
        check_fallback("france", THREE)
