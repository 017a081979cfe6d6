"""HTTP backends against real servers on loopback: the OpenAI-compatible chat API (through the openai
client) and SearXNG search (through moa's small HTTP client)."""
import asyncio
import email.utils
import json
import threading
import time

import pytest
from synth_helpers import Server, chat, samples_for

from moa.errors import UsageError
from moa.synth import pipeline
from moa.synth.backends import BackendError, OpenAIBackend, RateLimiter
from moa.synth.config import load_config
from moa.synth.httpjson import HttpClient
from moa.synth.prompting import SynthRequest
from moa.synth.retrieval import SearxngRetriever

SECRET = "sk-test-0123456789abcdef"


@pytest.fixture
def serve():
    servers = []

    def start(script):
        servers.append(Server(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def request():
    r = SynthRequest("japan", "yesno", 2, 2, "q", [{"id": "d", "source_type": "x", "title": "t", "text": "x"}])
    r.messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    return r


def backend(url, **kw):
    return OpenAIBackend(model="test-model", base_url=url + "/v1", api_key_env="MOA_TEST_KEY",
                         timeout_s=kw.pop("timeout_s", 5), max_retries=kw.pop("max_retries", 2), **kw)


def generate(b, r=None):
    return asyncio.run(b.generate(r or request()))


def test_openai_backend_sends_the_chat_request(serve, monkeypatch):
    monkeypatch.setenv("MOA_TEST_KEY", SECRET)
    server = serve([chat('{"samples": []}', prompt_tokens=7, completion_tokens=3)])
    b = backend(server.url)
    reply = generate(b)
    assert (reply.text, reply.prompt_tokens, reply.completion_tokens) == ('{"samples": []}', 7, 3)
    seen = server.seen[0]
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == f"Bearer {SECRET}"
    assert seen["body"]["model"] == "test-model" and seen["body"]["messages"][1]["content"] == "u"
    assert seen["body"]["response_format"] == {"type": "json_object"}
    assert SECRET not in repr(b) and SECRET not in json.dumps(b.identity())


@pytest.mark.parametrize("retry_after", ["seconds", "http-date"])
def test_429_is_retried_after_retry_after(serve, retry_after):
    wait = "1" if retry_after == "seconds" else email.utils.formatdate(time.time() + 2, usegmt=True)
    server = serve([{"status": 429, "payload": {"error": {"message": "slow down"}}, "headers": {"Retry-After": wait}},
                    chat("ok")])
    start = time.monotonic()
    assert generate(backend(server.url)).text == "ok"
    assert len(server.seen) == 2 and time.monotonic() - start >= 0.9


def test_persistent_429_and_5xx_give_up_with_the_status(serve):
    server = serve([{"status": 429, "payload": {"error": {"message": "quota"}}, "headers": {"Retry-After": "0.01"}}])
    with pytest.raises(BackendError, match="HTTP 429.*quota"):
        generate(backend(server.url, max_retries=2))
    assert len(server.seen) == 3
    server = serve([{"status": 503, "payload": {}, "headers": {"Retry-After": "0.01"}}, chat("back")])
    assert generate(backend(server.url)).text == "back"


def test_client_errors_are_not_retried_and_never_show_the_key(serve, monkeypatch):
    monkeypatch.setenv("MOA_TEST_KEY", SECRET)
    server = serve([{"status": 401, "payload": {"error": {"message": "bad key"}}}])
    with pytest.raises(BackendError) as info:
        generate(backend(server.url))
    assert "HTTP 401" in str(info.value) and SECRET not in str(info.value)
    assert len(server.seen) == 1


def test_malformed_replies(serve):
    server = serve([{"payload": {"id": "x", "object": "chat.completion"}}])
    with pytest.raises(BackendError, match=r"malformed reply"):
        generate(backend(server.url))
    server = serve([{"payload": b"<html>not json</html>", "content_type": "text/html"}])
    with pytest.raises(BackendError, match=r"malformed reply"):
        generate(backend(server.url))


def test_timeout_is_retried_then_reported(serve):
    server = serve([{"delay": 1.0, **chat("late")}])
    b = backend(server.url, timeout_s=0.2, max_retries=1)
    start = time.monotonic()
    with pytest.raises(BackendError, match="timed out after 0.2s"):
        generate(b)
    assert time.monotonic() - start < 2.0
    assert len(server.seen) == 2


def test_rate_limiter_keeps_to_the_minute_budgets():
    async def acquire_all(limiter, n, tokens):
        for _ in range(n):
            await limiter.acquire(tokens)
    for limiter, tokens in ((RateLimiter(requests_per_minute=1200), 0), (RateLimiter(tokens_per_minute=6000), 5)):
        asyncio.run(acquire_all(limiter, 1, tokens))
        limiter.levels = [0.0 if b is not None else None for b in limiter.budgets]  # budgets spent: refill only
        start = time.monotonic()
        asyncio.run(acquire_all(limiter, 5, tokens))  # 20 requests (or 100 tokens, 20 calls) a second
        assert 0.24 <= time.monotonic() - start < 1.0
    with pytest.raises(ValueError, match="tokens_per_minute must be positive"):
        RateLimiter(tokens_per_minute=0)


def test_search_client_reads_retry_after_as_seconds_or_a_date():
    client = HttpClient()
    assert client._delay(0, "2") == 2.0
    assert 2.0 <= client._delay(0, email.utils.formatdate(time.time() + 3, usegmt=True)) <= 3.0
    assert 0.75 <= client._delay(0, None) <= 1.0  # backoff less a random quarter


def test_rate_limit_spaces_requests_from_every_thread(serve):
    server = serve([{"payload": {"ok": True}}])
    client = HttpClient(timeout_s=5, requests_per_minute=600)
    start = time.monotonic()
    threads = [threading.Thread(target=client.request_json, args=("GET", server.url + "/x")) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.monotonic() - start >= 0.2 and client.attempts == len(server.seen) == 3


def test_searxng_results_become_documents(serve):
    results = [{"url": "https://a.example/jp", "title": "Tipping in Japan", "content": "No tipping."},
               {"url": "https://b.example", "title": "no content"},
               {"url": "https://c.example/jp2", "title": "Bowing", "content": "Bow when greeting."}]
    server = serve([{"status": 429, "payload": {}, "headers": {"Retry-After": "0"}}, {"payload": {"results": results}}])
    client = HttpClient(timeout_s=5, max_retries=2, sleep=lambda s: None)
    retriever = SearxngRetriever(server.url, client=client)
    docs = retriever.search("Japan tipping", "japan", k=5)
    assert [d["id"] for d in docs] == ["https://a.example/jp", "https://c.example/jp2"]
    assert all(d["culture"] == "japan" and d["source_type"] == "web search result" for d in docs)
    assert server.seen[-1]["path"].startswith("/search?q=Japan+tipping&format=json")
    SearxngRetriever(server.url, client=client, language="culture").search("日本の文化", "japan")
    assert "language=ja-JP" in server.seen[-1]["path"]
    server = serve([{"payload": {"answers": []}}])
    with pytest.raises(ValueError, match="no 'results' list"):
        SearxngRetriever(server.url, client=client).search("x", "japan")


def fake_llm(seen):
    """A chat server that writes valid yes/no samples naming the city it finds in the quoted passages."""
    user = seen["body"]["messages"][1]["content"]
    n = int(user.split("Write ")[1].split(" new")[0])
    query_tag = str(abs(hash(user)) % 10 ** 8)
    samples = [{"prompt": f"In Kyoto, Yuki bows ({query_tag}-{i}). Is this appropriate? Answer yes or no.",
                "response": "yes", "label": "yes"} for i in range(n)]
    samples.append({"prompt": "In Berlin, Yuki bows. Is this appropriate?", "response": "yes"})  # wrong culture
    samples.append({"prompt": "Bows?", "response": "perhaps"})                                    # bad label
    return chat(json.dumps({"samples": samples}))


def test_pipeline_with_the_openai_backend_and_cache(serve, tmp_path, monkeypatch):
    monkeypatch.setenv("MOA_TEST_KEY", SECRET)
    server = serve([{"status": 500, "payload": {}}, chat("no json here"), fake_llm])
    cfg = load_config(None, output_dir=str(tmp_path / "out"), cultures=["japan"], tasks=["yesno"], samples_per_task=12,
                      stage1_samples=0, samples_per_call=5, max_rounds=1,
                      llm={"backend": "openai", "model": "test-model", "base_url": server.url + "/v1",
                           "api_key_env": "MOA_TEST_KEY", "max_retries": 0, "concurrency": 1})
    summary = pipeline.run(cfg, progress=False)
    rejects = summary["rejects"]["japan"]["yesno"]
    assert rejects["backend_error"] == 1 and rejects["malformed_reply"] == 1
    assert rejects["other_culture_cue"] >= 1 and rejects["bad_label"] >= 1
    assert summary["counts"]["japan"]["yesno"] == 12
    rows = [json.loads(l) for f in (tmp_path / "out").glob("stage2_*.jsonl") for l in f.read_text().splitlines()]
    assert len(rows) == 12 and {r["source"] for r in rows} == {"openai:test-model"}
    assert all(r["provenance"]["doc_ids"] and r["provenance"]["query"] for r in rows)
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    calls = len(server.seen)
    # a fresh output dir with the same cache file would re-ask; the same dir resumes without any call
    pipeline.run(cfg, progress=False)
    assert len(server.seen) == calls


def test_run_stops_after_consecutive_backend_failures(serve, tmp_path):
    server = serve([{"status": 500, "payload": {"error": "down"}}])
    cfg = load_config(None, output_dir=str(tmp_path), cultures=["japan"], tasks=["mcq"], stage1_samples=0,
                      max_consecutive_errors=3,
                      llm={"backend": "openai", "model": "m", "base_url": server.url + "/v1", "max_retries": 0,
                           "concurrency": 1})
    with pytest.raises(UsageError, match="stopping after 3 failed LLM calls in a row.*HTTP 500"):
        pipeline.run(cfg, progress=False)
    assert len(server.seen) == 3 and not list(tmp_path.glob("*.jsonl"))


def test_web_searches_run_off_the_event_loop(serve, tmp_path):
    """The two jobs' first searches wait at a barrier until both have arrived: a search that held up
    the event loop would keep the other job's from being sent (the barrier breaks: HTTP 500)."""
    meeting, searches = threading.Barrier(2, timeout=10), []

    def route(record):
        if not record["path"].startswith("/search"):
            return chat(samples_for(record["body"]["messages"]))
        searches.append(record["path"])
        if len(searches) <= 2:
            try:
                meeting.wait()
            except threading.BrokenBarrierError:
                return {"status": 500, "payload": {"error": "the other search never came"}}
        return {"payload": {"results": [{"url": f"https://japan.example/{len(searches)}", "title": "Japan",
                                         "content": "Customs of Japan."}]}}

    server = serve([route])
    cfg = load_config(None, output_dir=str(tmp_path), cultures=["japan"], tasks=["yesno"], samples_per_task=2,
                      stage1_samples=2, samples_per_call=2, max_rounds=2,
                      retrieval={"backend": "searxng", "base_url": server.url, "max_retries": 0},
                      llm={"backend": "openai", "model": "m", "base_url": server.url + "/v1", "max_retries": 0})
    summary = pipeline.run(cfg, progress=False)
    assert summary["counts"] == {"japan": {"stage1": 2, "yesno": 2}}
    assert len(searches) == len(set(searches))  # a query is searched once, whatever the rounds
