"""A small JSON-over-HTTP client with timeouts, retries with backoff and jitter, Retry-After (seconds
or an HTTP date) and a rate limit, for the web-search backend (LLM calls go through the `openai`
client, moa.synth.backends).

Retried: timeouts, connection failures, HTTP 429 and 5xx. Not retried: other 4xx and replies that
are not JSON. Error messages name the URL and status but never the request headers (API keys).
"""
from __future__ import annotations

import email.utils
import http.client
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request

from moa.errors import UsageError


class HttpError(UsageError):
    """A request that failed for good; `status` is the last HTTP status (None for network errors)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class HttpClient:
    def __init__(self, timeout_s: float = 30.0, max_retries: int = 3, backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0, requests_per_minute: float | None = None, sleep=time.sleep):
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0:
            raise UsageError(f"need timeout_s > 0, max_retries >= 0, backoff_s >= 0; got {timeout_s}, "
                             f"{max_retries}, {backoff_s}")
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.min_interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self.sleep = sleep
        self._last_start = None
        self._lock = threading.Lock()  # the pipeline searches from several threads at once
        self.attempts = 0  # total HTTP attempts made, retries included

    def _wait_for_rate_limit(self) -> None:
        with self._lock:  # one thread waits its turn at a time, so the requests stay spaced
            if self._last_start is not None and self.min_interval:
                wait = self._last_start + self.min_interval - time.monotonic()
                if wait > 0:
                    self.sleep(wait)
            self._last_start = time.monotonic()
            self.attempts += 1

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """Retry-After when the server gives one, else exponential backoff less up to a quarter (jitter)."""
        if retry_after:
            try:
                return min(max(float(retry_after), 0.0), self.max_backoff_s)
            except ValueError:
                date = email.utils.parsedate_tz(retry_after)
                if date is not None:
                    return min(max(email.utils.mktime_tz(date) - time.time(), 0.0), self.max_backoff_s)
        return min(self.backoff_s * 2 ** attempt, self.max_backoff_s) * (1 - 0.25 * random.random())

    def request_json(self, method: str, url: str, body=None, headers: dict | None = None):
        """Send `body` as JSON (if given) and return the decoded JSON reply."""
        data = json.dumps(body, allow_nan=False).encode() if body is not None else None
        all_headers = {"Accept": "application/json", **({"Content-Type": "application/json"} if data else {}),
                       **(headers or {})}
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            self._wait_for_rate_limit()
            request = urllib.request.Request(url, data=data, headers=all_headers, method=method)
            retry_after, status = None, None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    raw = reply.read()
                try:
                    return json.loads(raw)
                except json.JSONDecodeError:
                    raise HttpError(f"{method} {url}: reply is not JSON: {raw[:200]!r}", status=200) from None
            except urllib.error.HTTPError as e:
                status, retry_after = e.code, e.headers.get("Retry-After")
                detail = e.read()[:200].decode(errors="replace")
                last = f"HTTP {e.code}: {detail}"
                if e.code != 429 and e.code < 500:
                    raise HttpError(f"{method} {url} failed with {last}", status=e.code) from None
            except (socket.timeout, TimeoutError):
                last = f"timed out after {self.timeout_s}s"
            except urllib.error.URLError as e:
                if isinstance(e.reason, (socket.timeout, TimeoutError)):
                    last = f"timed out after {self.timeout_s}s"
                else:
                    last = f"connection failed: {e.reason}"
            except (ConnectionError, http.client.HTTPException) as e:
                last = f"connection failed: {type(e).__name__}: {e}"
            if attempt < self.max_retries:
                self.sleep(self._delay(attempt, retry_after))
        raise HttpError(f"{method} {url} failed after {self.max_retries + 1} attempt(s): {last}", status=status)

