"""The Batch API path against the files and batches endpoints on loopback: the same rows as one call
at a time, and a run killed while its batch is under way picks the batch up again without resubmitting."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from synth_helpers import BatchAPI, Server, fake_llm

from moa.errors import UsageError
from moa.synth import batch, pipeline
from moa.synth.config import load_config

SMALL = dict(cultures=["japan"], tasks=["yesno"], samples_per_task=30, stage1_samples=6, samples_per_call=4,
             max_rounds=2)


def llm(url, **extra):
    return {"backend": "openai", "model": "m", "base_url": url + "/v1", "max_retries": 0, **extra}


def outputs(out) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("*.jsonl"))}


def posts(server, path):
    return [r for r in server.seen if r["method"] == "POST" and r["path"] == path]


@pytest.fixture(scope="module")
def online(tmp_path_factory):
    """The outputs of the same config with one request a call."""
    server = Server([fake_llm()])
    out = tmp_path_factory.mktemp("online")
    pipeline.run(load_config(None, output_dir=str(out), **SMALL, llm=llm(server.url)), progress=False)
    server.close()
    return outputs(out)


def test_batch_api_gives_the_rows_of_single_calls(online, tmp_path):
    api = BatchAPI()
    server = Server([api])
    cfg = load_config(None, output_dir=str(tmp_path), **SMALL,
                      llm=llm(server.url, batch=True, batch_poll_s=0.01, input_price_per_1m=2.0, output_price_per_1m=8.0))
    summary = pipeline.run(cfg, progress=False)
    assert outputs(tmp_path) == online
    assert not [r for r in server.seen if "chat/completions" in r["path"]]
    batches = posts(server, "/v1/batches")
    assert len(batches) >= 2 and len(posts(server, "/v1/files")) == len(batches)  # rejects are replaced in a later batch
    first = [json.loads(l) for l in api.files["file-0"].decode().splitlines()]
    assert {l["url"] for l in first} == {"/v1/chat/completions"} and first[0]["body"]["model"] == "m"
    assert summary["llm_calls"] == sum(len(api.files[b["input_file_id"]].splitlines()) for b in api.batches.values())
    # the Batch API costs half: the estimate uses half the configured prices
    tokens = summary["tokens"]
    assert summary["cost_usd"] == round((tokens["prompt"] * 1.0 + tokens["completion"] * 4.0) / 1e6, 4)
    assert not (tmp_path / "work" / "batch.json").exists()
    server.close()


@pytest.mark.slow  # two synth subprocesses
def test_kill_between_submission_and_collection_resumes_the_same_batch(online, tmp_path):
    api = BatchAPI()
    api.release.clear()  # batches stay in progress until released
    server = Server([api])
    out = tmp_path / "out"
    path = tmp_path / "synth.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "output_dir": str(out), "plot": False,
                                    "llm": llm(server.url, batch=True, batch_poll_s=0.02)}))
    command = [sys.executable, "-m", "moa", "synth", str(path), "--no-progress"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    while not api.polls and proc.poll() is None:  # submitted and polled, not collected
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((out / "work" / "batch.json").read_text())
    assert state["batch_id"] == "batch-0" and len(posts(server, "/v1/batches")) == 1
    api.release.set()
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert outputs(out) == online
    files = posts(server, "/v1/files")
    created = posts(server, "/v1/batches")
    assert len(files) == len(created)  # the first batch was picked up, never uploaded or submitted again
    assert [b["input_file_id"] for b in api.batches.values()] == [f"file-{2 * i}" for i in range(len(created))]
    server.close()


def batch_keys(api) -> dict:
    """batch id -> the custom_ids (cache keys) of its input file."""
    return {b: [json.loads(l)["custom_id"] for l in api.files[batch["input_file_id"]].decode().splitlines()]
            for b, batch in api.batches.items()}


def one_in(n):
    """A line fails for one request in n, the same ones on every server (keys name the server's port)."""
    return lambda line: int(hashlib.sha256(line["body"]["messages"][-1]["content"].encode()).hexdigest()[:4], 16) % n == 0


def test_failed_lines_go_into_the_next_batch_and_replies_are_never_asked_again(online, tmp_path):
    api = BatchAPI(failing=lambda line, batch_id: batch_id == "batch-0" and one_in(3)(line))
    server = Server([api])
    cfg = load_config(None, output_dir=str(tmp_path), **SMALL, llm=llm(server.url, batch=True, batch_poll_s=0.01,
                                                                         max_retries=2))
    summary = pipeline.run(cfg, progress=False)
    server.close()
    assert outputs(tmp_path) == online and "backend_error" not in summary["rejects_total"]
    keys = batch_keys(api)
    assert api.failed and set(api.failed) <= set(keys["batch-1"])  # retried in the next batch
    sent = [k for ks in keys.values() for k in ks]
    assert {k for k in sent if sent.count(k) > 1} == set(api.failed)  # a line that succeeded is never sent again


def test_lines_that_keep_failing_become_failed_calls_the_same_way_after_an_interruption(tmp_path, monkeypatch):
    """Lines failing in every batch are sent 1 + max_retries times, then count as backend errors; a run
    interrupted between two batches resumes to the same outputs, having sent the same lines."""
    runs = {}
    for name in ("whole", "interrupted"):
        api = BatchAPI(failing=lambda line, batch_id: one_in(4)(line))
        server = Server([api])
        cfg = load_config(None, output_dir=str(tmp_path / name), **SMALL,
                          llm=llm(server.url, batch=True, batch_poll_s=0.01, max_retries=1))
        if name == "interrupted":
            real, made = batch.run_batch, []

            def interrupt_at_the_second(*args, **kwargs):
                made.append(1)
                if len(made) == 2:
                    raise KeyboardInterrupt
                return real(*args, **kwargs)
            monkeypatch.setattr(batch, "run_batch", interrupt_at_the_second)
            with pytest.raises(KeyboardInterrupt):
                pipeline.run(cfg, progress=False)
            monkeypatch.setattr(batch, "run_batch", real)
        summary = pipeline.run(cfg, progress=False)
        server.close()
        keys = batch_keys(api)
        sent = [k for ks in keys.values() for k in ks]
        failed = set(api.failed)
        assert failed and all(sent.count(k) == 2 for k in failed)
        assert all(sent.count(k) == 1 for k in set(sent) - failed)
        assert summary["rejects_total"]["backend_error"] == len(failed)
        runs[name] = outputs(tmp_path / name), summary["rejects"], [len(k) for k in keys.values()]
    assert runs["whole"] == runs["interrupted"]


def test_a_batch_without_any_reply_stops_the_run(tmp_path):
    server = Server([BatchAPI(failing=lambda line, batch_id: True)])
    cfg = load_config(None, output_dir=str(tmp_path), **SMALL, llm=llm(server.url, batch=True, batch_poll_s=0.01))
    with pytest.raises(UsageError, match="batch batch-0 ended 'completed' with no reply to any of its .* new "
                                         "requests \\(first error: batch batch-0: request failed with HTTP"):
        pipeline.run(cfg, progress=False)
    server.close()
