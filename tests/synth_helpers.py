"""Loopback servers for the synthesis tests: a scripted HTTP server (chat completions, search) and an
LLM that writes valid yes/no samples as a pure function of the request."""
import email
import hashlib
import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Server:
    """A loopback HTTP server answering from a script: each request pops the next action (the last repeats).

    An action is a dict (status, payload, headers, delay) or a callable taking the request record
    ({"method", "path", "headers", "body"}) and returning one. Every request is recorded in `seen`."""

    def __init__(self, script):
        self.script, self.seen, self.lock = list(script), [], threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                record = {"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                          "body": body}
                with owner.lock:
                    owner.seen.append(record)
                    action = owner.script.pop(0) if len(owner.script) > 1 else owner.script[0]
                if callable(action):
                    action = action(record)
                status, payload, headers = action.get("status", 200), action.get("payload"), action.get("headers", {})
                time.sleep(action.get("delay", 0))
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", action.get("content_type", "application/json"))
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

    def chat_requests(self) -> list:
        with self.lock:
            return [r for r in self.seen if r["path"].endswith("/chat/completions") and isinstance(r["body"], dict)]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def chat(content, prompt_tokens=0, completion_tokens=0):
    return {"payload": {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": content}}],
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                  "total_tokens": prompt_tokens + completion_tokens}}}


def samples_for(messages) -> str:
    """Valid yes/no samples for a synthesis request, a pure function of it, with the rejects a real
    LLM makes: about every fourth reply is not JSON, and each reply repeats a prompt (a duplicate across
    calls, so which sample is kept depends on the order replies are read) and names another culture."""
    user = messages[-1]["content"]
    digest = hashlib.sha256(user.encode()).hexdigest()
    if int(digest[:8], 16) % 4 == 0:
        return f"Sorry, I cannot help with that ({digest[:10]})."
    n = int(re.search(r"Write (\d+) new", user).group(1))
    samples = [{"prompt": f"In Kyoto, Yuki bows ({digest[:10]}-{i}). Is this appropriate? Answer yes or no.",
                "response": "yes" if i % 2 else "no"} for i in range(n)]
    samples.append({"prompt": f"In Osaka, Ken bows ({int(digest[:2], 16) % 3}). Is this appropriate? Answer yes or no.",
                    "response": "yes"})
    samples.append({"prompt": "In Berlin, Yuki bows. Is this appropriate?", "response": "yes"})
    return json.dumps({"samples": samples})


def fake_llm(delay=lambda: 0.0):
    """A chat completions action answering with samples_for(messages) after delay() seconds."""
    def action(record):
        if not isinstance(record["body"], dict):  # the client died while sending
            return {"status": 400, "payload": {"error": {"message": "incomplete body"}}}
        text = samples_for(record["body"]["messages"])
        return {**chat(text, prompt_tokens=len(json.dumps(record["body"])) // 4, completion_tokens=len(text) // 4),
                "delay": delay()}
    return action


def random_delay(low, high, seed=0):
    rng, lock = random.Random(seed), threading.Lock()

    def delay():
        with lock:
            return rng.uniform(low, high)
    return delay


class BatchAPI:
    """The files and batches endpoints of the OpenAI API, as an action for Server: a batch completes
    (its replies written by samples_for) once `release` is set and it has been polled twice.

    A line for which failing(line, batch_id) is true (line: the input line as a dict) fails: every other
    one goes into the output file with HTTP 500, the rest into the error file (no response, an error
    object); `failed` holds the custom_ids of the failed lines in order."""

    def __init__(self, failing=lambda line, batch_id: False):
        self.failing, self.failed = failing, []
        self.files, self.batches, self.polls = {}, {}, {}
        self.release = threading.Event()
        self.release.set()

    def _file(self, content: bytes, purpose: str) -> dict:
        file_id = f"file-{len(self.files)}"
        self.files[file_id] = content
        return {"id": file_id, "object": "file", "bytes": len(content), "created_at": 0,
                "filename": "input.jsonl", "purpose": purpose, "status": "processed"}

    def _batch(self, batch_id: str) -> dict:
        batch = self.batches[batch_id]
        self.polls[batch_id] = self.polls.get(batch_id, 0) + 1
        if batch["status"] != "completed" and self.release.is_set() and self.polls[batch_id] > 2:
            lines = [json.loads(line) for line in self.files[batch["input_file_id"]].decode().splitlines()]
            out, errors = [], []
            for line in lines:
                key = line["custom_id"]
                if not self.failing(line, batch_id):
                    text = samples_for(line["body"]["messages"])
                    out.append({"id": "r", "custom_id": key, "error": None,
                                "response": {"status_code": 200, "request_id": "q", "body": chat(text, 10, 5)["payload"]}})
                    continue
                self.failed.append(key)
                if len(errors) % 2:
                    errors.append({"id": "r", "custom_id": key, "response": None,
                                   "error": {"code": "server_error", "message": "the line failed"}})
                else:
                    errors.append({"id": "r", "custom_id": key, "error": None,
                                   "response": {"status_code": 500, "request_id": "q",
                                                "body": {"error": {"message": "internal error"}}}})
            write = lambda items, purpose: self._file("".join(json.dumps(o) + "\n" for o in items).encode(), purpose)
            batch.update(status="completed", output_file_id=write(out + errors[::2], "batch_output")["id"],
                         error_file_id=write(errors[1::2], "batch_output")["id"] if errors[1::2] else None,
                         request_counts={"total": len(lines), "completed": len(out), "failed": len(errors)})
        return batch

    def __call__(self, record) -> dict:
        method, path = record["method"], record["path"].split("?")[0]
        if method == "POST" and path == "/v1/files":
            raw = record["body"]
            content_type = record["headers"]["content-type"]
            message = email.message_from_bytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
            part = next(p for p in message.get_payload() if p.get_filename())
            return {"payload": self._file(part.get_payload(decode=True), "batch")}
        if method == "POST" and path == "/v1/batches":
            body = record["body"]
            batch_id = f"batch-{len(self.batches)}"
            self.batches[batch_id] = {"id": batch_id, "object": "batch", "endpoint": body["endpoint"],
                                      "input_file_id": body["input_file_id"], "completion_window": "24h",
                                      "status": "in_progress", "created_at": 0, "metadata": body.get("metadata"),
                                      "request_counts": {"total": 0, "completed": 0, "failed": 0}}
            return {"payload": self.batches[batch_id]}
        if method == "GET" and path == "/v1/batches":
            return {"payload": {"object": "list", "data": list(self.batches.values())[::-1], "has_more": False}}
        if method == "GET" and path.startswith("/v1/batches/"):
            return {"payload": self._batch(path.rsplit("/", 1)[1])}
        if method == "GET" and path.startswith("/v1/files/") and path.endswith("/content"):
            return {"payload": self.files[path.split("/")[3]], "content_type": "application/octet-stream"}
        return {"status": 404, "payload": {"error": {"message": f"no route {method} {path}"}}}
