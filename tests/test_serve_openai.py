"""moa serve as an OpenAI/vLLM drop-in: real servers on loopback, the openai client and raw HTTP.

No request can hurt another (the poison temperature, ragged bodies, slow clients); logprobs, echo,
token and list prompts, n and best_of, penalties and stream usage work as the OpenAI API documents
them, and logprobs equal the model's own log-softmax; fields the server does not implement are refused
naming them; the API key guards /v1/* and the tokenizer endpoints, and the --upstream front forwards it.
"""
import asyncio
import http.client
import json
import signal
import socket
import time

import pytest
import torch
from helpers import save_text_run
from openai import AuthenticationError, BadRequestError, OpenAI
from serve_helpers import Server

from moa.base_model import load_moa
from moa.data import encode_prompt

pytestmark = pytest.mark.slow  # every test here starts server processes

CULTURES = ["japan", "india", "nigeria"]
KEY = "sk-test-key"
PROMPT = "User: How is a guest welcomed at home?\nAssistant: "
LONG = "User: Tell me everything.\nAssistant: "


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return save_text_run(tmp_path_factory.mktemp("run") / "run", CULTURES)


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_moa(run_dir)


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), "--model", run_dir, "--max-batch-size", 16, "--max-queue", 256,
               "--api-key", KEY, "--header-timeout", 1, "--body-timeout", 1, api_key=KEY)
    yield s
    s.close()


def raw_stream(server, path, body):
    """The data payloads of a raw streamed request, [DONE] included."""
    status, _, raw = server.request("POST", path, {**body, "stream": True})
    assert status == 200, raw
    return [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]


def model_logprobs(model, culture, ids):
    """log_softmax of MoA's forward over `ids` under `culture`: [len(ids), V]."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), culture_ids=[CULTURES.index(culture)], routing="oracle").logits[0]
    return logits.float().log_softmax(-1)


def test_poison_temperature_is_greedy_and_hurts_no_stream(server):
    body = {"model": "india", "prompt": LONG, "max_tokens": 120, "temperature": 0.8, "seed": 5}
    alone = [raw_stream(server, "/v1/completions", {**body, "seed": s}) for s in range(3)]
    greedy = server.client.completions.create(model="japan", prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text

    async def together():
        streams = [asyncio.to_thread(raw_stream, server, "/v1/completions", {**body, "seed": s}) for s in range(3)]
        poisons = [server.aclient.completions.create(model="japan", prompt=PROMPT, max_tokens=20, **kw)
                   for kw in ({"temperature": 1e-40}, {"temperature": 1e-300}, {"temperature": 1e-300, "top_p": 1e-300})]
        return await asyncio.gather(*streams, *poisons)

    *streams, p1, p2, p3 = asyncio.run(together())
    for got, want in zip(streams, alone):  # byte for byte, but for the ids and timestamps
        strip = lambda events: [{k: v for k, v in json.loads(e).items() if k not in ("id", "created")} if e != "[DONE]" else e
                                for e in events]  # noqa: E731
        assert strip(got) == strip(want)
    assert p1.choices[0].text == p2.choices[0].text == p3.choices[0].text == greedy
    assert server.metrics().get('moa_finished_requests_total{reason="error"}', 0) == 0


def test_logprobs_and_echo_equal_the_models_log_softmax(server, loaded):
    model, tokenizer = loaded
    r = server.client.completions.create(model="nigeria", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=5, echo=True)
    choice = r.choices[0]
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    generated = tokenizer(choice.text[len(PROMPT):], add_special_tokens=False)["input_ids"]
    ids = prompt_ids + generated
    assert choice.text.startswith(PROMPT) and len(choice.logprobs.tokens) == len(ids)
    expected = model_logprobs(model, "nigeria", ids)
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(expected[i - 1, ids[i]]), abs=1e-4)
        top = expected[i - 1].topk(5)
        want = {tokenizer.decode([t]): float(v) for t, v in zip(top.indices.tolist(), top.values)}
        got = lp.top_logprobs[i]
        assert set(want) <= set(got) and all(got[t] == pytest.approx(v, abs=1e-4) for t, v in want.items())
    assert lp.text_offset == list(range(len(ids)))  # one character per byte token
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == 6
    scored = server.client.completions.create(model="nigeria", prompt=prompt_ids, max_tokens=0, echo=True, logprobs=1)
    assert scored.choices[0].text == PROMPT and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:len(prompt_ids)], abs=1e-5)
    chat = server.client.chat.completions.create(model="nigeria", messages=[{"role": "user", "content": "Tea?"}],
                                                 max_completion_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    ids = encode_prompt(tokenizer, "Tea?") + [tokenizer.convert_tokens_to_ids(c.token) for c in chat.choices[0].logprobs.content]
    expected = model_logprobs(model, "nigeria", ids)
    for i, entry in enumerate(chat.choices[0].logprobs.content):
        position = len(ids) - 4 + i - 1
        assert entry.logprob == pytest.approx(float(expected[position, ids[position + 1]]), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([t]) for t in expected[position].topk(3).indices]


def test_64_mixed_requests_each_equal_the_same_request_alone(server):
    def body(i):
        kind = i % 6
        b = {"model": (CULTURES + ["auto", "base"])[i % 5], "prompt": PROMPT[:20 + i % 17], "max_tokens": 4 + i % 9,
             "temperature": 0.9, "seed": i}
        if kind == 1:
            b.update(logprobs=2)
        elif kind == 2:
            b.update(echo=True, logprobs=1)
        elif kind == 3:
            b.update(n=2)
        elif kind == 4:
            b.update(presence_penalty=1.5, frequency_penalty=-0.5, logit_bias={"101": 5})
        elif kind == 5:
            b.update(prompt=[b["prompt"], PROMPT[5:30]], best_of=3, n=2)
        return b

    def post(b):
        status, _, raw = server.request("POST", "/v1/completions", b)
        assert status == 200, raw
        out = json.loads(raw)
        return [(c["text"], c["finish_reason"], c["logprobs"]) for c in out["choices"]], out["usage"]

    async def together():
        return await asyncio.gather(*(asyncio.to_thread(post, body(i)) for i in range(64)))

    for i, (choices, usage) in enumerate(asyncio.run(together())):
        alone, alone_usage = post(body(i))
        assert usage == alone_usage
        for (text, finish, lp), (text_a, finish_a, lp_a) in zip(choices, alone, strict=True):
            assert (text, finish) == (text_a, finish_a), body(i)
            if lp is not None:
                assert lp["tokens"] == lp_a["tokens"] and lp["text_offset"] == lp_a["text_offset"]
                assert [v is None for v in lp["token_logprobs"]] == [v is None for v in lp_a["token_logprobs"]]
                assert [v for v in lp["token_logprobs"] if v is not None] == pytest.approx(
                    [v for v in lp_a["token_logprobs"] if v is not None], abs=1e-4)


def test_completions_take_token_and_list_prompts_n_and_best_of(server, loaded):
    tokenizer = loaded[1]
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    text = server.client.completions.create(model="japan", prompt=PROMPT, max_tokens=5, temperature=0).choices[0].text
    r = server.client.completions.create(model="japan", prompt=[PROMPT, ids, ids[:10]], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.text for c in r.choices[:4]] == [text] * 4
    assert r.usage.prompt_tokens == 2 * len(ids) + 10 and r.usage.completion_tokens == 30
    best = server.client.completions.create(model="japan", prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3,
                                            n=1, best_of=4, logprobs=0)
    candidates = [server.client.completions.create(model="japan", prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3 + j,
                                                   logprobs=0).choices[0] for j in range(4)]
    assert best.choices[0].text == max(candidates, key=lambda c: sum(c.logprobs.token_logprobs)).text
    assert best.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in candidates)
    stream = list(server.client.chat.completions.create(model="india", messages=[{"role": "user", "content": "Tea?"}],
                                                        max_tokens=3, n=2, temperature=0, stream=True,
                                                        stream_options={"include_usage": True}))
    assert {c.choices[0].index for c in stream if c.choices} == {0, 1}
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in stream[:-1])


def test_max_completion_tokens_and_text_parts_are_used(server):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell me everything."}]}]
    r = server.client.chat.completions.create(model="japan", messages=messages, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    same = server.client.chat.completions.create(model="japan", messages=[{"role": "user", "content": "Tell me everything."}],
                                                 max_tokens=3, temperature=0)
    assert r.choices[0].message.content == same.choices[0].message.content


REFUSED = [  # (path, extra body fields, the field named)
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"presence_penalty": 5.0}, "presence_penalty"),
    ("/v1/chat/completions", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("/v1/chat/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"99999": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"n": 0}, "n"),
    ("/v1/chat/completions", {"temperature": 2.5}, "temperature"),
    ("/v1/chat/completions", {"top_k": 5}, "top_k"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"n": 3, "best_of": 2}, "best_of"),
    ("/v1/completions", {"best_of": 2, "stream": True}, "best_of"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": [[1, 2], "mixed", 3]}, "prompt"),
    ("/v1/completions", {"prompt": [5, 100000]}, "prompt"),
    ("/v1/completions", {"stop": ["x" * 1000] * 1000}, "stop"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
]


@pytest.mark.parametrize("path,extra,field", REFUSED, ids=[f"{p[4:]}-{f}" for p, _, f in REFUSED])
def test_unsupported_or_bad_fields_get_a_400_naming_them(server, path, extra, field):
    base = {"model": "japan", "messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else \
        {"model": "japan", "prompt": "Hi"}
    status, _, raw = server.request("POST", path, {**base, **extra})
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == field and field in error["message"], raw
    assert len(raw) < 1000  # a long bad value is never echoed whole


def test_ragged_edges_get_json_errors(server):
    for body, status, text in ((b'{"a":' * 100000, 400, "nested too deeply"),
                               (b'{"model": "japan", "prompt": "a\\ud800b"}', 400, "surrogate"),
                               (json.dumps({"model": "m" * 900_000, "prompt": "Hi"}).encode(), 404, "characters")):
        got, headers, raw = server.request("POST", "/v1/completions", body)
        assert got == status and text in json.loads(raw)["error"]["message"] and len(raw) < 1000, raw
        assert headers["Content-Type"] == "application/json"
    got, _, raw = server.request("POST", "/v1/completions", b'{"model": "japan", "prompt": "Hi"}',
                                 headers={"Content-Type": "text/plain"})
    assert got == 415 and json.loads(raw)["error"]["code"] == "unsupported_media_type"
    got, headers, raw = server.request("GET", "/v1/nothing-here", headers={"X-Request-Id": "trace-42"})
    assert got == 404 and json.loads(raw)["error"]["message"] and headers["X-Request-Id"] == "trace-42"
    assert server.client.models.retrieve("india").id == "india"
    status, headers, _ = server.request("GET", "/health")
    assert status == 200 and len(headers["X-Request-Id"]) == 32


def test_slow_clients_are_timed_out(server):
    with socket.create_connection((server.host, server.port)) as slow:  # headers one byte a second
        start = time.monotonic()
        try:
            for byte in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n":
                slow.sendall(bytes([byte]))
                time.sleep(0.25)
            closed = False
        except OSError:
            closed = True
        closed = closed or slow.recv(1) == b""
        assert closed and time.monotonic() - start < 5
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)  # a body that never comes
    conn.putrequest("POST", "/v1/completions")
    for name, value in (("Content-Type", "application/json"), ("Content-Length", "100"), ("Authorization", f"Bearer {KEY}")):
        conn.putheader(name, value)
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 408 and json.loads(response.read())["error"]["code"] == "request_timeout"
    conn.close()


def test_tokenizer_endpoints_speak_vllms_shapes(server, loaded, run_dir):
    from transformers import AutoTokenizer

    tokenizer = loaded[1]
    status, _, raw = server.request("GET", "/tokenizer_info")
    info = json.loads(raw)
    assert status == 200 and info["eos_token"] == tokenizer.eos_token and "chat_template" in info
    status, _, raw = server.request("POST", "/tokenize", {"prompt": "Hi there", "add_special_tokens": False})
    tokens = json.loads(raw)["tokens"]
    assert tokens == tokenizer("Hi there", add_special_tokens=False)["input_ids"] and json.loads(raw)["count"] == len(tokens)
    status, _, raw = server.request("POST", "/detokenize", {"tokens": tokens})
    assert json.loads(raw) == {"prompt": "Hi there"}
    status, _, raw = server.request("POST", "/detokenize", {"tokens": [1, -1]})
    assert status == 400 and json.loads(raw)["error"]["param"] == "tokens"
    assert json.loads(server.request("GET", "/version")[2])["version"]
    assert AutoTokenizer.from_pretrained(run_dir)("Hi there", add_special_tokens=False)["input_ids"] == tokens


def test_api_key_guards_the_api_but_not_health(server):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}x"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/tokenize"),
                             ("GET", "/tokenizer_info")):
            status, _, raw = server.request(method, path, {"model": "japan", "prompt": "Hi"}, headers=headers)
            assert status == 401 and json.loads(raw)["error"]["type"] == "authentication_error"
    assert server.request("GET", "/health", headers={"Authorization": ""})[0] == 200
    assert server.request("GET", "/metrics", headers={"Authorization": ""})[0] == 200
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in server.client.models.list().data] == CULTURES + ["auto", "base"]


def test_front_forwards_the_clients_key_to_an_upstream_that_requires_it(server, run_dir, tmp_path):
    front = Server(tmp_path, "--model", run_dir, "--upstream", server.url, api_key=KEY)
    try:
        r = front.client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Tea?"}], max_tokens=4,
                                                 temperature=0)
        direct = server.client.chat.completions.create(model=r.model_extra["moa"]["culture"],
                                                       messages=[{"role": "user", "content": "Tea?"}], max_tokens=4,
                                                       temperature=0)
        assert r.choices[0].message.content == direct.choices[0].message.content
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=front.url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
                model="japan", messages=[{"role": "user", "content": "Tea?"}], max_tokens=4)
        with pytest.raises(BadRequestError):
            front.client.completions.create(model="auto", prompt=["a", "b"], max_tokens=2)
    finally:
        front.close()


def test_sigterm_ends_streams_past_the_deadline_with_an_error_event_and_done(run_dir, tmp_path):
    s = Server(tmp_path, "--model", run_dir, "--shutdown-timeout", 1, api_key="unused")
    try:
        conn = http.client.HTTPConnection(s.host, s.port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({"model": "japan", "prompt": LONG, "max_tokens": 1500,
                                                                 "temperature": 0, "stream": True}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.readline().startswith(b"data: {")
        s.proc.send_signal(signal.SIGTERM)
        events = [line[6:].strip() for line in response if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        assert "shut down" in json.loads(events[-2])["error"]["message"]
        assert s.proc.wait(timeout=30) == 0, s.stderr()
    finally:
        s.close()
