"""When the prompt names no culture, on real servers on loopback: `moa serve` and its `--upstream` front.

Thresholds make the router's decision deterministic without training: at --min-router-confidence 1 the
router always abstains (its probability is below 1), at 0 it always decides. An abstaining `auto`
request runs its culture hint (the body's `moa.culture_hint`, else `moa.locale`, else Accept-Language)
and equals the same request naming that culture; with no hint it runs the fallback (the base model
here); what decided is in every response and in /metrics; a bad hint is a 400 naming it.
"""
import json

import pytest
import torch
from helpers import save_text_run
from openai import BadRequestError
from serve_helpers import Server

from moa.base_model import load_moa
from moa.data import encode_prompt

pytestmark = pytest.mark.slow  # every test here starts server processes

CULTURES = ["japan", "india", "nigeria"]
PROMPT = "Greet an elder."
SAMPLED = {"max_tokens": 8, "temperature": 0.9, "seed": 11}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return save_text_run(tmp_path_factory.mktemp("run") / "run", CULTURES)


@pytest.fixture(scope="module")
def confidence(run_dir):
    model, tokenizer = load_moa(run_dir)
    return float(model.route_sequences(torch.tensor([encode_prompt(tokenizer, PROMPT)]))[1][0])


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), "--model", run_dir, "--min-router-confidence", 1)
    yield s
    s.close()


@pytest.fixture(scope="module")
def front(run_dir, server, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("front"), "--model", run_dir, "--upstream", server.url, "--min-router-confidence", 1)
    yield s
    s.close()


def chat(server, model, stream=False, moa=None, headers=None):
    """(text, moa field) of a sampled chat request for PROMPT through the openai client."""
    kw = {"extra_body": {"moa": moa} if moa is not None else None, "extra_headers": headers}
    messages = [{"role": "user", "content": PROMPT}]
    if not stream:
        r = server.client.chat.completions.create(model=model, messages=messages, **SAMPLED, **kw)
        return r.choices[0].message.content, r.model_extra["moa"]
    chunks = list(server.client.chat.completions.create(model=model, messages=messages, stream=True, **SAMPLED, **kw))
    assert all("moa" not in c.model_extra for c in chunks[1:])
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[0].model_extra["moa"]


def completion(server, model, moa=None):
    r = server.client.completions.create(model=model, prompt="User: " + PROMPT + "\nAssistant: ", **SAMPLED,
                                         extra_body={"moa": moa} if moa is not None else None)
    return r.choices[0].text, r.model_extra["moa"], r.choices[0].model_extra["moa"]


def test_a_hint_runs_its_culture_and_equals_naming_it(server, confidence):
    for stream in (False, True):
        text, moa = chat(server, "auto", stream, moa={"culture_hint": "india"})
        assert moa == {"culture": "india", "router_confidence": pytest.approx(confidence, abs=1e-5), "decided_by": "hint"}
        named, named_moa = chat(server, "india", stream)
        assert text == named and named_moa["decided_by"] == "request" and named_moa["culture"] == "india"
    text, moa, choice_moa = completion(server, "auto", moa={"culture_hint": "nigeria"})
    assert moa == choice_moa and (moa["culture"], moa["decided_by"]) == ("nigeria", "hint")
    assert text == completion(server, "nigeria")[0]
    # a request naming its culture runs it: the hint only matters for `auto`
    assert chat(server, "japan", moa={"culture_hint": "india"})[1]["culture"] == "japan"


def test_without_a_hint_the_base_model_runs(server):
    for stream in (False, True):
        text, moa = chat(server, "auto", stream)
        assert (moa["culture"], moa["decided_by"]) == ("base", "fallback")
        base, base_moa = chat(server, "base", stream)
        assert text == base and (base_moa["culture"], base_moa["decided_by"]) == ("base", "request")
    # an Accept-Language none of whose ranges maps to a culture of the model gives no hint
    assert chat(server, "auto", headers={"Accept-Language": "fr-FR, de;q=0.9, *;q=0.1"})[1]["decided_by"] == "fallback"


def test_locale_and_accept_language_map_through_the_table(server):
    japan = chat(server, "japan")[0]
    for moa, headers, culture in (({"locale": "ja-JP"}, None, "japan"), ({"locale": "ja"}, None, "japan"),
                                  ({"locale": "en-NG"}, None, "nigeria"),
                                  (None, {"Accept-Language": "fr-FR, ja;q=0.8"}, "japan"),
                                  (None, {"Accept-Language": "ja;q=0.5, en-IN"}, "india"),
                                  ({"locale": "en-NG"}, {"Accept-Language": "ja-JP"}, "nigeria"),  # the body first
                                  ({"culture_hint": "india", "locale": "ja-JP"}, None, "india")):  # culture_hint first
        text, got = chat(server, "auto", moa=moa, headers=headers)
        assert (got["culture"], got["decided_by"]) == (culture, "hint"), (moa, headers)
        if culture == "japan":
            assert text == japan


BAD = [  # (moa field, headers, the param named, text in the message)
    ({"culture_hint": "france"}, None, "moa.culture_hint", f"unknown culture hint 'france': expected one of {CULTURES}"),
    ({"locale": "fr-FR"}, None, "moa.locale", "locale 'fr-FR' maps to none of this model's cultures"),
    ({"locale": "x!"}, None, "moa.locale", "locale 'x!' is not a language tag"),
    ({"locale": 5}, None, "moa.locale", "locale 5 is not a language tag"),
    ({"culture": "japan"}, None, "moa.culture", "unsupported field 'moa.culture'"),
    ("japan", None, "moa", "'moa' must be an object"),
    (None, {"Accept-Language": "ja;q=2"}, "Accept-Language", "Accept-Language range 'ja;q=2'"),
    (None, {"Accept-Language": "j@pan"}, "Accept-Language", "Accept-Language range 'j@pan': not a language tag"),
]


@pytest.mark.parametrize("moa,headers,param,text", BAD, ids=[b[2] + "-" + str(i) for i, b in enumerate(BAD)])
def test_a_bad_hint_is_a_400_naming_it(server, front, moa, headers, param, text):
    for s in (server, front):
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                           ("/v1/completions", {"prompt": "Hi"})):
            status, _, raw = s.request("POST", path, {"model": "auto", "max_tokens": 2, "moa": moa, **body},
                                       headers=headers)
            error = json.loads(raw)["error"]
            assert status == 400 and error["param"] == param and text in error["message"], raw
    with pytest.raises(BadRequestError, match="unknown culture hint 'france'"):
        server.client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hi"}],
                                              extra_body={"moa": {"culture_hint": "france"}})


def test_metrics_count_decisions_by_what_decided(server):
    before = server.metrics()
    chat(server, "auto", moa={"culture_hint": "india"})
    chat(server, "auto")
    chat(server, "japan")
    after = server.metrics()
    for decider, n in (("hint", 1), ("fallback", 1), ("request", 1), ("router", 0)):
        key = f'moa_culture_decisions_total{{decided_by="{decider}"}}'
        assert after[key] - before[key] == n, decider


def test_front_applies_the_same_rule_and_forwards_the_decided_culture(front, server, confidence):
    for stream in (False, True):
        text, moa = chat(front, "auto", stream, moa={"culture_hint": "india"})
        assert moa == {"culture": "india", "router_confidence": pytest.approx(confidence, abs=1e-5), "decided_by": "hint"}
        assert text == chat(server, "india")[0]
        text, moa = chat(front, "auto", stream)
        assert moa == {"culture": "base", "router_confidence": pytest.approx(confidence, abs=1e-5),
                       "decided_by": "fallback"}
        assert text == chat(server, "base")[0]  # forwarded as `base`, the base model's name upstream
    text, moa = chat(front, "auto", headers={"Accept-Language": "en-NG"})
    assert (moa["culture"], moa["decided_by"], text) == ("nigeria", "hint", chat(server, "nigeria")[0])
    text, moa = chat(front, "japan", moa={"locale": "en-IN"})
    assert moa == {"culture": "japan", "router_confidence": None, "decided_by": "request"}


def test_the_settings_are_checked_before_serving(run_dir, capsys):
    from moa.cli import main

    for flags, text in ((["--min-router-confidence", "1.5"], "--min-router-confidence must be within [0, 1]"),
                        (["--fallback-culture", "france"], f"--fallback-culture 'france' is not one of the model's cultures {CULTURES}"),
                        (["--fallback-culture", "france", "--upstream", "http://127.0.0.1:9"], "--fallback-culture 'france'")):
        assert main(["serve", "--model", str(run_dir), "--port", "0", *flags]) == 2
        assert text in capsys.readouterr().err
