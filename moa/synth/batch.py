"""The OpenAI Batch API for synthesis (`llm.batch: true`): half the price, replies within a day.

A pass of the pipeline records every call it needs that the cache lacks (moa.synth.pipeline.Caller
with `defer`). `run_batch` writes them as a batch input file (one chat completions request a line,
`custom_id` = the call's cache key), uploads it, creates the batch, polls it and puts the replies
into the cache; the next pass reads them there, through the same validation, and may need more
calls (to replace rejected samples), which go into the next batch.

A failed line (an HTTP error, an unreadable reply, or no line at all for a request) is recorded in the
cache under the batch's id; the next pass sends the call again in the next batch, up to
`llm.max_retries` times, after which it counts as a failed call (a backend_error reject). What
succeeded is cached and never sent again, and a rerun after a kill retries exactly what an
uninterrupted run would. A batch of at least max_consecutive_errors calls, none sent before, that
gets no reply at all stops the run (the API refuses the requests themselves: model, parameters, quota).

What was submitted is recorded in OUTPUT/work/batch.json before and after each step (the uploaded
file's id, then the batch's id), so a run killed while a batch is under way picks the batch up again
on the rerun and never submits it twice.
"""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

from tqdm import tqdm

from moa.atomic import atomic_file
from moa.errors import UsageError
from moa.synth.backends import BackendError, OpenAIBackend

ENDPOINT = "/v1/chat/completions"
DONE = ("completed", "expired", "cancelled")


def _record(path: Path, state: dict) -> None:
    with atomic_file(path) as f:
        json.dump(state, f, indent=1)


def _submit(client, backend: OpenAIBackend, requests: dict, state_path: Path, state: dict) -> dict:
    """Upload the input file (unless batch.json records one) and create the batch (unless one was made from it)."""
    if "input_file_id" not in state:
        lines = [json.dumps({"custom_id": key, "method": "POST", "url": ENDPOINT, "body": backend.body(request)},
                            ensure_ascii=False) for key, request in sorted(requests.items())]
        data = ("\n".join(lines) + "\n").encode()
        uploaded = client.files.create(file=("moa-synth-batch.jsonl", io.BytesIO(data)), purpose="batch")
        state = {"input_file_id": uploaded.id, "requests": len(lines)}
        _record(state_path, state)
    made = [b for b in client.batches.list(limit=100) if b.input_file_id == state["input_file_id"]]
    batch = made[0] if made else client.batches.create(input_file_id=state["input_file_id"], endpoint=ENDPOINT,
                                                        completion_window="24h",
                                                        metadata={"created_by": "moa synth"})
    state = {**state, "batch_id": batch.id}
    _record(state_path, state)
    return state


def _collect(client, batch, caller) -> int:
    """Put the batch's replies into the cache and record its failed lines there (a failed line, an
    unreadable reply or a request without a line). Returns the replies cached."""
    failed = {}
    replies = 0
    for file_id in (batch.output_file_id, batch.error_file_id):
        if not file_id:
            continue
        for line in client.files.content(file_id).text.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, response = item.get("custom_id"), item.get("response") or {}
            if response.get("status_code") == 200:
                try:
                    reply = OpenAIBackend.parse_completion(response.get("body"), f"batch {batch.id}")
                except BackendError as e:
                    failed[key] = str(e)
                    continue
                caller.cache.put(key, reply.text)
                caller.count(reply.prompt_tokens, reply.completion_tokens)
                replies += 1
            else:
                body = response.get("body")
                error = item.get("error") or (body.get("error") if isinstance(body, dict) else body)
                message = error.get("message", error) if isinstance(error, dict) else error
                failed[key] = (f"batch {batch.id}: request failed with HTTP {response.get('status_code')}: "
                               f"{str(message)[:200]}")
    for key in caller.defer:
        if key not in failed and caller.cache.get(key) is None:
            failed[key] = f"batch {batch.id} ended {batch.status!r} without a line for this request"
    for key, error in sorted(failed.items()):
        caller.cache.fail(key, batch.id, error)
    return replies


def run_batch(backend, caller, work: Path, poll_s: float = 30.0, progress: bool = True) -> None:
    """Run one batch of the calls in `caller.defer` (or the batch batch.json records) into the cache."""
    from openai import OpenAI
    if not isinstance(backend, OpenAIBackend):
        raise UsageError(f"llm.batch needs the openai backend, got {backend.name!r}")
    state_path = work / "batch.json"
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.exists() else {}
    client = OpenAI(base_url=backend.base_url, api_key=backend.api_key(), timeout=backend.timeout_s,
                    max_retries=backend.max_retries)
    try:
        if "batch_id" not in state:
            state = _submit(client, backend, caller.defer, state_path, state)
        bar = tqdm(total=state["requests"], desc=f"batch {state['batch_id']}", unit="call", disable=not progress)
        while True:
            batch = client.batches.retrieve(state["batch_id"])
            counts = batch.request_counts
            if counts is not None:
                bar.n = counts.completed + counts.failed
                bar.set_postfix_str(batch.status)
            if batch.status == "failed":
                errors = [e.message for e in (batch.errors.data if batch.errors else [])]
                state_path.unlink()
                raise UsageError(f"batch {batch.id} failed: {errors[:3]}; rerun to submit the calls again")
            if batch.status in DONE:
                break
            time.sleep(poll_s)
        bar.close()
        replies = _collect(client, batch, caller)
    finally:
        client.close()
    state_path.unlink()
    failures = [caller.cache.failures(key) for key in caller.defer]
    if replies == 0 and len(failures) >= caller.max_errors and all(len(f) == 1 for f in failures):
        raise UsageError(f"batch {batch.id} ended {batch.status!r} with no reply to any of its {len(failures)} new "
                         f"requests (first error: {failures[0][0]}); the failures are recorded: a rerun sends each "
                         f"call again, up to llm.max_retries times")
