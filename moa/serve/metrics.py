"""The one metrics source of `moa serve`: the engine and the HTTP app count into it, /metrics and /health read it.

Counters and histograms are updated under a small lock and read as a snapshot of numbers (no history
is copied); the gauges (queue depth, running batch, cache tokens) are read from the scheduler when
rendered. `render(gauges)` is the Prometheus text format.
"""
from __future__ import annotations

import bisect
import threading

from moa.infer.culture_choice import DECIDERS

# seconds; the upper bounds of the latency histograms (Prometheus adds +Inf)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FINISH_REASONS = ("stop", "length", "cancelled", "error")
GAUGES = (("moa_queue_depth", "queue_depth", "Requests waiting for a slot in the running batch."),
          ("moa_running_batch_size", "running", "Requests in the running (decode) batch."),
          ("moa_prefilling", "prefilling", "Requests admitted whose prompts are being prefilled."),
          ("moa_cache_tokens", "cache_tokens", "KV-cache tokens held by the running batch."))


class Histogram:
    """A Prometheus histogram: bucket counts, the sum and the count of observations."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * (len(buckets) + 1), 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip(self.buckets, self.counts):
            total += n
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    def __init__(self, models: list[str]):
        self._lock = threading.Lock()
        self.requests = dict.fromkeys(models, 0)  # requests that started generating, by the culture that ran them
        self.tokens = dict.fromkeys(models, 0)  # new tokens, by culture
        self.decisions = dict.fromkeys(DECIDERS, 0)  # requests that started generating, by what decided their culture
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self.rejected: dict[int, int] = {}  # answered with an error before running, by HTTP status
        self.failures: dict[str, int] = {}  # requests failed while running, by stage (prefill, sampling, ...)
        self.steps = 0  # decode steps
        self.peak_cache_tokens = 0
        self.ttft, self.itl = Histogram(), Histogram()

    def add_models(self, models: list[str]) -> None:
        """Count these models too (after a switch to a run with more cultures)."""
        with self._lock:
            for name in models:
                self.requests.setdefault(name, 0)
                self.tokens.setdefault(name, 0)

    def started(self, culture: str, decided_by: str) -> None:
        with self._lock:
            self.requests[culture] += 1
            self.decisions[decided_by] += 1

    def token(self, culture: str, latency_s: float, first: bool) -> None:
        with self._lock:
            self.tokens[culture] += 1
            (self.ttft if first else self.itl).observe(latency_s)

    def step(self, cache_tokens: int) -> None:
        with self._lock:
            self.steps += 1
            self.peak_cache_tokens = max(self.peak_cache_tokens, cache_tokens)

    def finish(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] += 1

    def failure(self, stage: str) -> None:
        with self._lock:
            self.failures[stage] = self.failures.get(stage, 0) + 1

    def reject(self, status: int) -> None:
        with self._lock:
            self.rejected[status] = self.rejected.get(status, 0) + 1

    def counts(self) -> dict:
        """peak_cache_tokens, steps, per_culture ({name: {requests, tokens}}), decided_by ({decider: requests}),
        finished, failures and first_tokens (requests that got a first token), read at one moment."""
        with self._lock:
            return {"peak_cache_tokens": self.peak_cache_tokens, "steps": self.steps,
                    "per_culture": {c: {"requests": self.requests[c], "tokens": self.tokens[c]} for c in self.requests},
                    "decided_by": dict(self.decisions),
                    "finished": dict(self.finished), "failures": dict(self.failures), "first_tokens": self.ttft.count}

    def render(self, gauges: dict) -> str:
        with self._lock:
            lines = ["# HELP moa_requests_total Requests that started generating, by the culture that ran them.",
                     "# TYPE moa_requests_total counter"]
            lines += [f'moa_requests_total{{culture="{c}"}} {n}' for c, n in self.requests.items()]
            lines += ["# HELP moa_generated_tokens_total New tokens generated, by culture.",
                      "# TYPE moa_generated_tokens_total counter"]
            lines += [f'moa_generated_tokens_total{{culture="{c}"}} {n}' for c, n in self.tokens.items()]
            lines += ["# HELP moa_culture_decisions_total Requests that started generating, by what decided their culture "
                      "(router, hint, fallback, request).", "# TYPE moa_culture_decisions_total counter"]
            lines += [f'moa_culture_decisions_total{{decided_by="{d}"}} {n}' for d, n in self.decisions.items()]
            lines += ["# HELP moa_finished_requests_total Requests finished, by finish reason (stop, length, cancelled, error).",
                      "# TYPE moa_finished_requests_total counter"]
            lines += [f'moa_finished_requests_total{{reason="{r}"}} {n}' for r, n in self.finished.items()]
            lines += ["# HELP moa_rejected_requests_total Requests answered with an error before they ran, by HTTP status.",
                      "# TYPE moa_rejected_requests_total counter"]
            lines += [f'moa_rejected_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.rejected.items())]
            lines += ["# HELP moa_request_failures_total Requests that failed while running, by stage "
                      "(prefill, decode, sampling, detokenize).", "# TYPE moa_request_failures_total counter"]
            lines += [f'moa_request_failures_total{{stage="{s}"}} {n}' for s, n in sorted(self.failures.items())]
            lines += ["# HELP moa_decode_steps_total Decode forwards run.", "# TYPE moa_decode_steps_total counter",
                      f"moa_decode_steps_total {self.steps}"]
            for name, key, text in GAUGES:
                lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {gauges[key]}"]
            lines += ["# HELP moa_time_to_first_token_seconds From the request's arrival to its first new token.",
                      "# TYPE moa_time_to_first_token_seconds histogram", *self.ttft.lines("moa_time_to_first_token_seconds"),
                      "# HELP moa_inter_token_latency_seconds Between consecutive new tokens of a request.",
                      "# TYPE moa_inter_token_latency_seconds histogram", *self.itl.lines("moa_inter_token_latency_seconds")]
        return "\n".join(lines) + "\n"
