"""moa serve switches to a newer saved run of the same base without a restart (POST /admin/switch).

Streams running through the switch finish, none dropped, each equal to its run alone on the weights it
started with; a request arriving during the switch waits and runs on the new run; /v1/models lists the
new cultures from then on; a run of another base or rank is refused while the old one keeps serving.
"""
import json
import threading

import pytest
from helpers import TEXT_TINY, fresh_base, randomize_adapters, save_text_run
from serve_helpers import Server

import moa
from moa.config import BaseModelConfig
from moa.tiny import byte_tokenizer

pytestmark = pytest.mark.slow  # server processes
KEY = "sk-switch"
OLD = ["japan", "india", "nigeria"]
NEW = ["egypt", "japan", "india", "nigeria"]
LONG = "User: Tell me everything.\nAssistant: "


def save_run(path, cultures, seed, r=4, tiny=TEXT_TINY):
    model = moa.MoAForCausalLM.from_base(fresh_base(**tiny), moa.MoAConfig(cultures=cultures, r=r, alpha=2 * r))
    randomize_adapters(model, std=0.2, seed=seed)
    model.save_pretrained(path, base_spec=BaseModelConfig(tiny=tiny), tokenizer=byte_tokenizer())
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    return {"old": save_text_run(tmp / "old", OLD), "new": save_run(tmp / "new", NEW, seed=7),
            "other_base": save_run(tmp / "other_base", OLD, seed=1, tiny={**TEXT_TINY, "hidden_size": 48}),
            "other_rank": save_run(tmp / "other_rank", OLD, seed=1, r=8)}


def stream(server, culture, results, key):
    status, _, raw = server.request("POST", "/v1/completions", {"model": culture, "prompt": LONG, "max_tokens": 80,
                                                                "temperature": 0, "stream": True})
    events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    results[key] = (status, events)


def text(events):
    return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if "choices" in json.loads(e))


def complete(server, culture, max_tokens=80):
    return server.client.completions.create(model=culture, prompt=LONG, max_tokens=max_tokens, temperature=0).choices[0].text


def test_switch_drains_streams_on_their_weights_and_serves_the_new_run(runs, tmp_path):
    server = Server(tmp_path, "--model", runs["old"], "--api-key", KEY, api_key=KEY)
    try:
        alone_old = {c: complete(server, c) for c in OLD}
        results, threads = {}, []
        for culture in OLD:
            threads.append(threading.Thread(target=stream, args=(server, culture, results, culture)))
            threads[-1].start()
        while server.metrics()["moa_running_batch_size"] < len(OLD):
            pass
        switched = {}
        switcher = threading.Thread(target=lambda: switched.update(
            zip(("status", "headers", "body"), server.request("POST", "/admin/switch", {"model": str(runs["new"])}, timeout=600))))
        switcher.start()
        while not json.loads(server.request("GET", "/health")[2])["switching"]:
            pass
        late = {}
        latecomer = threading.Thread(target=lambda: late.update(text=complete(server, "india", 20)))
        latecomer.start()  # arrives during the switch: waits, then runs on the new run
        for thread in threads + [switcher, latecomer]:
            thread.join(300)
        assert switched["status"] == 200, switched["body"]
        assert json.loads(switched["body"])["cultures"] == NEW
        for culture in OLD:
            status, events = results[culture]
            assert status == 200 and events[-1] == "[DONE]" and "error" not in events[-2]
            assert text(events) == alone_old[culture]  # finished on the weights it started with
        alone_new = {c: complete(server, c) for c in NEW}
        assert any(alone_new[c] != alone_old[c] for c in OLD)  # the new run's weights differ
        assert late["text"] == complete(server, "india", 20) == alone_new["india"][:len(late["text"])]
        assert [m.id for m in server.client.models.list().data] == NEW + ["auto", "base"]
        for name, code in (("other_base", 409), ("other_rank", 409)):
            status, _, raw = server.request("POST", "/admin/switch", {"model": str(runs[name])})
            assert status == code and json.loads(raw)["error"]["code"] == "incompatible_run", raw
        status, _, raw = server.request("POST", "/admin/switch", {"model": str(tmp_path / "nothing")})
        assert status == 400 and "not a saved MoA run" in json.loads(raw)["error"]["message"]
        status, _, _ = server.request("POST", "/admin/switch", {"model": str(runs["old"])}, headers={"Authorization": ""})
        assert status == 401
        assert complete(server, "egypt", 5) == alone_new["egypt"][:len(complete(server, "egypt", 5))]
        assert server.metrics().get('moa_finished_requests_total{reason="error"}', 0) == 0
    finally:
        server.close()


def test_a_run_without_the_fallback_culture_is_refused(runs, tmp_path):
    """A server started with --fallback-culture refuses to switch to a run lacking that culture (409 naming it) and
    keeps serving its run; requests the router abstains on still run the fallback culture."""
    server = Server(tmp_path, "--model", runs["new"], "--api-key", KEY, "--fallback-culture", "egypt",
                    "--min-router-confidence", "1", api_key=KEY)
    try:
        status, _, raw = server.request("POST", "/admin/switch", {"model": str(runs["old"])})
        error = json.loads(raw)["error"]
        assert status == 409 and error["code"] == "incompatible_run", raw
        assert "no culture 'egypt', the fallback culture this server runs with" in error["message"]
        assert [m.id for m in server.client.models.list().data] == NEW + ["auto", "base"]
        response = server.client.completions.create(model="auto", prompt=LONG, max_tokens=5, temperature=0)
        assert response.model_extra["moa"]["culture"] == "egypt"
        assert response.model_extra["moa"]["decided_by"] == "fallback"
        assert response.choices[0].text == complete(server, "egypt", 5)
    finally:
        server.close()
