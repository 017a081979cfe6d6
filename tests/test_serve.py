"""moa serve: real servers on loopback (subprocesses), driven by the openai client and raw HTTP.

Greedy outputs equal `moa generate`'s and a request alone; `auto` is the router's pick (at
--min-router-confidence 0 the router always decides; tests/test_serve_culture_choice.py has it abstain) and
`base` the plain base model; bad requests get OpenAI-style 4xx errors naming the field and disturb no
request in flight; a full queue gets 429; a client that goes away frees its slot; SIGTERM drains
and exits 0; the --upstream router front forwards to a second server.
"""
import asyncio
import http.client
import json
import signal
import socket
import threading
import time

import pytest
import torch
from helpers import TEXT_TINY, save_text_run
from serve_helpers import Server

from moa.base_model import BaseModelConfig, load_base_model, load_moa
from moa.data import encode_prompt
from moa.infer import generate_rows

pytestmark = pytest.mark.slow  # every test here starts server processes

CULTURES = ["japan", "india", "nigeria"]
PROMPTS = ["Tea?", "What do people eat for breakfast here?", "Greet an elder.", "How is a guest welcomed at home?",
           "Gifts", "Which hand do you eat with at a shared meal?"]
TINY = TEXT_TINY
LONG = ("Tell me everything.", "japan")  # greedy, this run's answer goes past 200 tokens without an EOS


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return save_text_run(tmp_path_factory.mktemp("run") / "run", CULTURES)


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_moa(run_dir)


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), "--model", run_dir, "--max-batch-size", 16, "--max-queue", 128,
               "--max-body-bytes", 65536, "--min-router-confidence", 0)
    yield s
    s.close()


def completion(server, model, prompt, max_tokens, stream=False, **kw):
    """(text, moa field, finish_reason) of a /v1/completions call through the openai client."""
    if not stream:
        r = server.client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)
        return r.choices[0].text, r.model_extra["moa"], r.choices[0].finish_reason
    chunks = list(server.client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                   stream=True, **kw))
    assert chunks[0].choices[0].text == "" and all("moa" not in c.model_extra for c in chunks[1:])
    return "".join(c.choices[0].text for c in chunks), chunks[0].model_extra["moa"], chunks[-1].choices[0].finish_reason


def chat(server, model, prompt, max_tokens, stream=False):
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        r = server.client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content, r.model_extra["moa"], r.choices[0].finish_reason
    chunks = list(server.client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                        temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and "moa" in chunks[0].model_extra
    return ("".join(c.choices[0].delta.content or "" for c in chunks), chunks[0].model_extra["moa"],
            chunks[-1].choices[0].finish_reason)


def plain_prompt(tokenizer, prompt):
    """The raw completion text whose tokens are moa.data.encode_prompt's (the byte tokenizer has no BOS)."""
    return tokenizer.decode(encode_prompt(tokenizer, prompt))


def context_length(server) -> int:
    return server.client.models.list().data[0].model_extra["max_model_len"]


def test_models_and_health(server):
    ids = [m.id for m in server.client.models.list().data]
    assert ids == CULTURES + ["auto", "base"]
    status, _, body = server.request("GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_equals_moa_generate(server, loaded, stream):
    model, tokenizer = loaded
    rows = [{"prompt": p, "culture": CULTURES[i % 3]} for i, p in enumerate(PROMPTS)]
    want = generate_rows(model, tokenizer, rows, routing="oracle", max_new_tokens=12)
    for row, expected in zip(rows, want):
        stopped = expected["new_tokens"] > len(expected["text"])  # generate_rows counts the EOS it stopped at
        for text, info, finish in (chat(server, row["culture"], row["prompt"], 12, stream=stream),
                                   completion(server, row["culture"], plain_prompt(tokenizer, row["prompt"]), 12, stream=stream)):
            assert text == expected["text"], row
            assert info["culture"] == row["culture"]
            assert finish == ("stop" if stopped else "length")


def test_auto_picks_the_routers_culture_and_base_runs_no_adapter(server, loaded, run_dir):
    model, tokenizer = loaded
    rows = [{"prompt": p} for p in PROMPTS]
    want = generate_rows(model, tokenizer, rows, routing="prompt", max_new_tokens=10, min_router_confidence=0.0)
    base, _ = load_base_model(BaseModelConfig(tiny=TINY))
    for row, expected in zip(rows, want):
        text, info, _ = chat(server, "auto", row["prompt"], 10)
        ids = torch.tensor([encode_prompt(tokenizer, row["prompt"])])
        culture, confidence = model.route_sequences(ids)
        assert info["culture"] == CULTURES[int(culture)] == expected["routed_culture"]
        assert info["router_confidence"] == pytest.approx(float(confidence), abs=1e-5)
        assert info["decided_by"] == expected["decided_by"] == "router"
        assert text == expected["text"]
        text, info, _ = chat(server, "base", row["prompt"], 10)
        out = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                            pad_token_id=0)[0, ids.shape[1]:].tolist()
        out = out[:out.index(1)] if 1 in out else out
        assert info["culture"] == "base" and info["decided_by"] == "request"
        assert text == tokenizer.decode(out, skip_special_tokens=True)


def assert_same_or_near_tie(model, tokenizer, prompt, culture, got, alone):
    """Equal texts, or at their first difference the top-2 logits of the request run alone are within 1e-3."""
    if got == alone:
        return
    same = next(i for i in range(min(len(got), len(alone)) + 1) if i == min(len(got), len(alone)) or got[i] != alone[i])
    ids = torch.tensor([encode_prompt(tokenizer, prompt) + tokenizer.encode(alone[:same], add_special_tokens=False)])
    culture_id = -1 if culture == "base" else CULTURES.index(culture)
    with torch.no_grad():
        logits = model(input_ids=ids, culture_ids=torch.tensor([culture_id]), routing="oracle").logits[0, -1]
    top = logits.topk(2).values
    assert float(top[0] - top[1]) <= 1e-3, f"{prompt!r} ({culture}): {got!r} != {alone!r} at {same}, top-2 {top.tolist()}"


def test_64_concurrent_streams_equal_each_request_alone(server, loaded):
    model, tokenizer = loaded
    names = CULTURES + ["auto", "base"]
    requests = [(PROMPTS[i % len(PROMPTS)] + " " * (i % 3), names[i % len(names)], 4 + (7 * i) % 21) for i in range(64)]

    async def stream(prompt, name, max_tokens):
        chunks = [c async for c in await server.aclient.chat.completions.create(
            model=name, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, stream=True)]
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[0].model_extra["moa"]["culture"]

    async def all_at_once():
        return await asyncio.gather(*(stream(*r) for r in requests))

    together = asyncio.run(all_at_once())
    for (prompt, name, max_tokens), (text, culture) in zip(requests, together):
        alone, info, _ = chat(server, name, prompt, max_tokens)
        assert culture == info["culture"]
        assert_same_or_near_tie(model, tokenizer, prompt, culture, text, alone)
    metrics = server.metrics()
    assert metrics["moa_running_batch_size"] == 0 and metrics["moa_queue_depth"] == 0
    assert sum(metrics[f'moa_requests_total{{culture="{c}"}}'] for c in CULTURES + ["base"]) >= 128
    assert metrics["moa_time_to_first_token_seconds_count"] >= 128


def open_stream(server, body, events=1):
    """A raw streaming request whose first `events` events have arrived: (connection, response)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    for _ in range(events):
        event = response.readline()
        assert event.startswith(b"data: {") and b'"finish_reason": null' in event, event
        assert response.readline() == b"\n"
    return conn, response


def read_stream(response) -> tuple[str, str]:
    """(text, finish_reason) of the rest of a raw event stream, which must end in [DONE]."""
    text, finish, last = "", None, None
    for line in response:
        if line.startswith(b"data: "):
            last = line[6:].strip()
            if last != b"[DONE]":
                choice = json.loads(last)["choices"][0]
                text, finish = text + choice["text"], choice["finish_reason"] or finish
    assert last == b"[DONE]"
    return text, finish


def test_disconnect_frees_the_slot(server, loaded):
    before = server.metrics()
    conn, response = open_stream(server, {"model": LONG[1], "prompt": plain_prompt(loaded[1], LONG[0]),
                                          "max_tokens": context_length(server) - 100, "temperature": 0}, events=4)
    assert server.metrics()["moa_running_batch_size"] == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        after = server.metrics()
        if after["moa_running_batch_size"] == 0:
            break
        time.sleep(0.02)
    assert after["moa_running_batch_size"] == 0
    assert after.get('moa_finished_requests_total{reason="cancelled"}', 0) == \
        before.get('moa_finished_requests_total{reason="cancelled"}', 0) + 1


BAD = [  # (body or raw bytes, status, field named)
    ({"model": "mars", "prompt": "Hi"}, 404, "model"),
    ({"prompt": "Hi"}, 400, "model"),
    ({"model": "japan", "prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "japan", "prompt": "Hi", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "japan", "prompt": "x" * 3000}, 400, "prompt"),
    ({"model": "japan", "prompt": "Hi", "temperature": -0.5}, 400, "temperature"),
    ({"model": "japan", "prompt": "Hi", "top_p": 0}, 400, "top_p"),
    ({"model": "japan", "prompt": "Hi", "top_p": 1.5}, 400, "top_p"),
    ({"model": "japan", "prompt": "Hi", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "japan", "prompt": "Hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": "japan", "prompt": "Hi", "stream": "yes"}, 400, "stream"),
    ({"model": "japan", "prompt": "Hi", "seed": 1.5}, 400, "seed"),
    ({"model": "japan", "prompt": "Hi", "stop": 3}, 400, "stop"),
    ({"model": "japan", "prompt": 5}, 400, "prompt"),
    ({"model": "japan", "messages": "hi"}, 400, "messages"),
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"model": "japan", "prompt": "' + b"y" * 70000 + b'"}', 413, None),
]


def test_bad_requests_get_openai_errors_and_disturb_nothing_in_flight(server, loaded):
    model, tokenizer = loaded
    assert context_length(server) < 3000  # the prompt of 3000 tokens above is past it
    body = {"model": "india", "prompt": plain_prompt(tokenizer, "A long answer, please."), "max_tokens": 300,
            "temperature": 0}
    alone = server.client.completions.create(**body).choices[0].text
    conn, response = open_stream(server, body)
    for bad, status, field in BAD:
        path = "/v1/chat/completions" if isinstance(bad, dict) and "messages" in bad else "/v1/completions"
        got, _, raw = server.request("POST", path, bad)
        error = json.loads(raw)["error"]
        assert got == status, (bad, raw)
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == field, (bad, error)
        if field is not None:
            assert repr(field)[1:-1] in error["message"] or field in error["message"]
    text, finish = read_stream(response)
    conn.close()
    assert finish == "length" or text != ""
    assert_same_or_near_tie(model, tokenizer, "A long answer, please.", "india", text, alone)


def test_full_queue_gets_429_with_retry_after(run_dir, tmp_path, loaded):
    tokenizer = loaded[1]
    s = Server(tmp_path, "--model", run_dir, "--max-batch-size", 1, "--max-queue", 1)
    try:
        body = {"model": LONG[1], "prompt": plain_prompt(tokenizer, LONG[0]), "max_tokens": 200, "temperature": 0}
        running, first = open_stream(s, body, events=2)  # running
        queued = {}
        thread = threading.Thread(target=lambda: queued.update(zip(("status", "headers", "body"),
                                                                   s.request("POST", "/v1/completions", {**body, "max_tokens": 5}))))
        thread.start()
        deadline = time.monotonic() + 10
        while s.metrics()["moa_queue_depth"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, headers, raw = s.request("POST", "/v1/completions", body)
        assert status == 429, raw
        assert int(headers["Retry-After"]) >= 1
        assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
        text, finish = read_stream(first)  # the requests in flight finish
        running.close()
        thread.join(60)
        assert finish == "length" and len(text) == body["max_tokens"] - 1  # all of it but the token read above
        assert queued["status"] == 200 and json.loads(queued["body"])["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        s.close()


def test_sigterm_finishes_requests_in_flight_then_exits_0(run_dir, tmp_path, loaded):
    tokenizer = loaded[1]
    s = Server(tmp_path, "--model", run_dir, "--shutdown-timeout", 60)
    try:
        body = {"model": LONG[1], "prompt": plain_prompt(tokenizer, LONG[0]), "max_tokens": 120, "temperature": 0}
        conn, response = open_stream(s, body, events=4)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((s.host, s.port), timeout=5)
        text, finish = read_stream(response)
        conn.close()
        assert finish == "length" and len(text) == body["max_tokens"] - 3  # all of it but the 3 tokens read above
        assert s.proc.wait(timeout=60) == 0, s.stderr()
    finally:
        s.close()


def test_upstream_front_forwards_and_reports_upstream_down(server, run_dir, tmp_path, loaded):
    model, tokenizer = loaded
    front = Server(tmp_path, "--model", run_dir, "--upstream", server.url + "/v1", "--min-router-confidence", 0)
    try:
        assert [m.id for m in front.client.models.list().data] == CULTURES + ["auto", "base"]
        for prompt in PROMPTS[:4]:
            culture, confidence = model.route_sequences(torch.tensor([encode_prompt(tokenizer, prompt)]))
            for stream in (False, True):
                text, info, _ = chat(front, "auto", prompt, 10, stream=stream)
                assert info["culture"] == CULTURES[int(culture)] and info["decided_by"] == "router"
                assert info["router_confidence"] == pytest.approx(float(confidence), abs=1e-5)
                assert text == chat(server, info["culture"], prompt, 10)[0]
            text, info, _ = completion(front, "india", prompt, 8, stream=True)
            assert info == {"culture": "india", "router_confidence": None, "decided_by": "request"}
            assert text == completion(server, "india", prompt, 8)[0]
        status, _, raw = front.request("POST", "/v1/completions", {"model": "japan", "prompt": "Hi", "max_tokens": 0})
        assert status == 400 and json.loads(raw)["error"]["param"] == "max_tokens"  # the upstream's own error
    finally:
        front.close()
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    down = Server(tmp_path, "--model", run_dir, "--upstream", dead)
    try:
        for stream in (False, True):
            status, _, raw = down.request("POST", "/v1/chat/completions",
                                          {"model": "auto", "messages": [{"role": "user", "content": "Hi"}], "stream": stream})
            assert status in (502, 503)
            assert f"upstream {dead} is not reachable" in json.loads(raw)["error"]["message"]
    finally:
        down.close()


def test_upstream_front_times_out_with_504(run_dir, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        front = Server(tmp_path, "--model", run_dir, "--upstream", url, "--upstream-timeout", 1)
        try:
            status, _, raw = front.request("POST", "/v1/completions", {"model": "japan", "prompt": "Hi"})
            assert status == 504
            assert json.loads(raw)["error"]["message"] == f"upstream {url} did not answer within 1.0s (ReadTimeout)"
        finally:
            front.close()
