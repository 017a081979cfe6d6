"""HTTP backends against real servers on loopback: the OpenAI-compatible chat API and SearXNG search."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from moa.errors import UsageError
from moa.synth import pipeline
from moa.synth.backends import BackendError, OpenAIBackend
from moa.synth.config import load_config
from moa.synth.httpjson import HttpClient
from moa.synth.prompting import SynthRequest
from moa.synth.retrieval import SearxngRetriever

SECRET = "sk-test-0123456789abcdef"


class Server:
    """A loopback HTTP server answering from a script: each request pops the next reply (the last repeats)."""

    def __init__(self, script):
        self.script, self.seen = list(script), []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                owner.seen.append({"path": self.path, "headers": dict(self.headers),
                                   "body": json.loads(body) if body else None})
                action = owner.script.pop(0) if len(owner.script) > 1 else owner.script[0]
                if callable(action):
                    action = action(owner.seen[-1])
                status, payload, headers = action.get("status", 200), action.get("payload"), action.get("headers", {})
                time.sleep(action.get("delay", 0))
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = _reply

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(script):
        servers.append(Server(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def chat(content):
    return {"payload": {"choices": [{"message": {"role": "assistant", "content": content}}]}}


def request():
    r = SynthRequest("japan", "yesno", 2, 2, "q", [{"id": "d", "source_type": "x", "title": "t", "text": "x"}])
    r.messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    return r


def backend(url, **kw):
    sleeps = []
    client = HttpClient(timeout_s=kw.pop("timeout_s", 5), max_retries=kw.pop("max_retries", 2), backoff_s=0.01,
                        sleep=sleeps.append)
    return OpenAIBackend(model="test-model", base_url=url + "/v1", api_key_env="MOA_TEST_KEY", client=client, **kw), sleeps


def test_openai_backend_sends_the_chat_request(serve, monkeypatch):
    monkeypatch.setenv("MOA_TEST_KEY", SECRET)
    server = serve([chat('{"samples": []}')])
    b, _ = backend(server.url)
    assert b.generate(request()) == '{"samples": []}'
    seen = server.seen[0]
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert seen["body"]["model"] == "test-model" and seen["body"]["messages"][1]["content"] == "u"
    assert seen["body"]["response_format"] == {"type": "json_object"}
    assert SECRET not in repr(b) and SECRET not in json.dumps(b.identity())


def test_429_is_retried_after_retry_after(serve):
    server = serve([{"status": 429, "payload": {"error": "slow down"}, "headers": {"Retry-After": "0.05"}},
                    chat("ok")])
    b, sleeps = backend(server.url)
    assert b.generate(request()) == "ok"
    assert len(server.seen) == 2 and sleeps == [0.05]


def test_persistent_429_and_5xx_give_up_with_the_status(serve):
    server = serve([{"status": 429, "payload": {"error": "quota"}}])
    b, sleeps = backend(server.url, max_retries=2)
    with pytest.raises(BackendError, match="after 3 attempt.*HTTP 429"):
        b.generate(request())
    assert len(server.seen) == 3 and sleeps == [0.01, 0.02]
    server = serve([{"status": 503, "payload": {}}, chat("back")])
    assert backend(server.url)[0].generate(request()) == "back"


def test_client_errors_are_not_retried_and_never_show_the_key(serve, monkeypatch):
    monkeypatch.setenv("MOA_TEST_KEY", SECRET)
    server = serve([{"status": 401, "payload": {"error": "bad key"}}])
    b, _ = backend(server.url)
    with pytest.raises(BackendError) as info:
        b.generate(request())
    assert "HTTP 401" in str(info.value) and SECRET not in str(info.value)
    assert len(server.seen) == 1


def test_malformed_replies(serve):
    server = serve([{"payload": b"<html>not json</html>"}])
    with pytest.raises(BackendError, match="not JSON"):
        backend(server.url)[0].generate(request())
    server = serve([{"payload": {"id": "x", "object": "chat.completion"}}])
    with pytest.raises(BackendError, match=r"expected choices\[0\]\.message\.content"):
        backend(server.url)[0].generate(request())


def test_timeout_is_retried_then_reported(serve):
    server = serve([{"delay": 1.0, **chat("late")}])
    b, sleeps = backend(server.url, timeout_s=0.2, max_retries=1)
    start = time.monotonic()
    with pytest.raises(BackendError, match="timed out after 0.2s"):
        b.generate(request())
    assert time.monotonic() - start < 1.5
    assert len(server.seen) == 2 and len(sleeps) == 1


def test_rate_limit_spaces_requests(serve):
    server = serve([{"payload": {"ok": True}}])
    client = HttpClient(timeout_s=5, requests_per_minute=600)
    start = time.monotonic()
    for _ in range(3):
        client.request_json("GET", server.url + "/x")
    assert time.monotonic() - start >= 0.2


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
    server = serve([{"payload": b"garbage"}, chat("no json here"), fake_llm])
    cfg = load_config(None, output_dir=str(tmp_path / "out"), cultures=["japan"], tasks=["yesno"], samples_per_task=12,
                      stage1_samples=0, samples_per_call=5, max_rounds=1,
                      llm={"backend": "openai", "model": "test-model", "base_url": server.url + "/v1",
                           "api_key_env": "MOA_TEST_KEY", "max_retries": 0})
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
                      llm={"backend": "openai", "model": "m", "base_url": server.url + "/v1", "max_retries": 0})
    with pytest.raises(UsageError, match="stopping after 3 failed LLM calls in a row.*HTTP 500"):
        pipeline.run(cfg, progress=False)
    assert len(server.seen) == 3 and not list(tmp_path.glob("*.jsonl"))
