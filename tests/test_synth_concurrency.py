"""Concurrent LLM calls against a chat server on loopback: the output never depends on how many calls
run at once or the order they finish in; 429s slow a run down and lose nothing; a run killed at any
point resumes without repeating a cached call."""
import email.utils
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from synth_helpers import Server, fake_llm, random_delay, samples_for

from moa.synth import pipeline
from moa.synth.config import load_config

SMALL = dict(cultures=["japan"], tasks=["yesno"], samples_per_task=30, stage1_samples=6, samples_per_call=4,
             max_rounds=2)


def config(out, url, **llm):
    return load_config(None, output_dir=str(out), **SMALL,
                       llm={"backend": "openai", "model": "m", "base_url": url + "/v1", "max_retries": 3, **llm})


def outputs(out) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("*.jsonl"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A run at concurrency 1: its outputs and how many calls it made."""
    server = Server([fake_llm()])
    out = tmp_path_factory.mktemp("reference")
    summary = pipeline.run(config(out, server.url, concurrency=1), progress=False)
    calls = len(server.chat_requests())
    server.close()
    assert summary["counts"]["japan"] == {"stage1": 6, "yesno": 30}
    assert summary["rejects_total"]["malformed_reply"] and summary["rejects_total"]["duplicate"]
    return outputs(out), calls, summary


@pytest.mark.parametrize("concurrency", [4, 16])
def test_output_is_byte_identical_whatever_the_concurrency_and_completion_order(reference, tmp_path, concurrency):
    files, calls, ref_summary = reference
    server = Server([fake_llm(random_delay(0, 0.03, seed=concurrency))])  # replies finish in shuffled order
    summary = pipeline.run(config(tmp_path, server.url, concurrency=concurrency), progress=False)
    server.close()
    assert outputs(tmp_path) == files
    assert summary["rejects"] == ref_summary["rejects"]
    assert len(server.chat_requests()) == calls == summary["llm_calls"]
    assert summary["tokens"]["prompt"] > 0 and summary["cost_usd"] is None


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_429_with_retry_after_slows_the_run_and_loses_nothing(reference, tmp_path, form):
    files, calls, _ = reference
    wait = "1" if form == "seconds" else email.utils.formatdate(time.time() + 2, usegmt=True)
    too_many = {"status": 429, "payload": {"error": {"message": "rate limited"}}, "headers": {"Retry-After": wait}}
    server = Server([too_many] * 4 + [fake_llm()])
    start = time.monotonic()
    summary = pipeline.run(config(tmp_path, server.url, concurrency=4, max_retries=5), progress=False)
    server.close()
    assert time.monotonic() - start >= 0.9
    assert outputs(tmp_path) == files and "backend_error" not in summary["rejects_total"]
    assert len(server.chat_requests()) == calls + 4


def test_prices_give_a_cost_estimate(tmp_path):
    server = Server([fake_llm()])
    summary = pipeline.run(config(tmp_path, server.url, input_price_per_1m=2.5, output_price_per_1m=10.0),
                           progress=False)
    server.close()
    tokens = summary["tokens"]
    assert summary["cost_usd"] == round((tokens["prompt"] * 2.5 + tokens["completion"] * 10.0) / 1e6, 4) > 0


def cached_replies(out) -> set:
    path = Path(out) / "work" / "cache.sqlite"
    if not path.exists():
        return set()
    db = sqlite3.connect(str(path))
    try:
        return {reply for (reply,) in db.execute("SELECT reply FROM calls")}
    except sqlite3.OperationalError:  # the run has not made its table yet
        return set()
    finally:
        db.close()


@pytest.mark.slow  # three synth subprocesses
def test_sigkill_at_random_points_then_resume(reference, tmp_path):
    files, calls, _ = reference
    server = Server([fake_llm(random_delay(0.01, 0.05, seed=7))])
    out = tmp_path / "out"
    path = tmp_path / "synth.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "output_dir": str(out), "plot": False,
                                    "llm": {"backend": "openai", "model": "m", "base_url": server.url + "/v1",
                                            "concurrency": 8}}))
    command = [sys.executable, "-m", "moa", "synth", str(path), "--no-progress"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    kept_before_kill, rng = [], random.Random(0)
    for kill_after in (calls // 3, 2 * calls // 3):  # requests the server has seen when the run is killed
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while (len(server.chat_requests()) < kill_after or not cached_replies(out)) and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        kept_before_kill.append((cached_replies(out), len(server.chat_requests())))
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert outputs(out) == files
    asked = [samples_for(r["body"]["messages"]) for r in server.chat_requests()]
    for kept, asked_before in kept_before_kill:
        assert kept
        assert not kept & set(asked[asked_before:])  # no call cached before a kill was made again after it
    assert len(asked) <= calls + 2 * 8  # at most the calls in flight at each kill are made twice
    server.close()
