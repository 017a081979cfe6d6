"""The engine's scheduler: which requests wait, prefill and decode, and the running batch's KV-slab rows.

Every list here changes under one lock (`Scheduler.lock`): `add` from the threads that submit, the
rest from the engine's step thread. Requests are admitted in arrival order while the batch has a free
row (`max_batch_size` rows, counting the ones prefilling); a step prefills at most `prefill_chunk`
prompt tokens over all new requests: those whose whole prompts fit the step's budget together in one
left-padded forward (`StepPlan.whole`), a longer prompt alone, chunk by chunk over several steps
(`StepPlan.chunks`). A prefilled request joins the running batch as the slab's last row; a finished
one leaves and the slab's last row takes its place. While a switch to another model waits, nothing
new is admitted; once the running requests are done, the next step is the switch (`StepPlan.switch`).
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

from moa.serve.kv_slab import KVSlab


class QueueFull(Exception):
    """`max_queue` requests already wait; retry after `retry_after_s` seconds."""

    def __init__(self, depth: int, retry_after_s: float):
        super().__init__(f"the engine's queue is full ({depth} requests waiting); retry in {retry_after_s:.1f}s")
        self.retry_after_s = retry_after_s


@dataclass
class StepPlan:
    cancelled: list = field(default_factory=list)  # sequences cancelled before they ran (to be finished)
    whole: list = field(default_factory=list)  # sequences whose whole prompts prefill together
    chunks: list = field(default_factory=list)  # (sequence, prompt tokens to prefill this step)
    switch: tuple | None = None  # (model, done event): nothing runs; the engine switches to the model now


class Scheduler:
    def __init__(self, slab: KVSlab, max_batch_size: int, max_queue: int, prefill_chunk: int):
        self.slab, self.max_batch_size, self.max_queue, self.prefill_chunk = slab, max_batch_size, max_queue, prefill_chunk
        self.lock = threading.Condition()
        self.waiting: collections.deque = collections.deque()
        self.prefilling: list = []
        self.running: list = []  # in slab row order
        self.culture_ids: list[int] = []  # of the running rows, -1 = base
        self.stopping = False  # no new requests
        self.deadline_passed = False  # the step loop ends the requests left
        self.switch: tuple | None = None  # (model, done event) waiting for the running requests to finish
        self._durations = collections.deque(maxlen=100)  # seconds of recently finished requests

    def add(self, seq) -> None:
        with self.lock:
            if self.stopping:
                raise RuntimeError("the engine is shutting down: it admits no new requests")
            if len(self.waiting) >= self.max_queue:
                mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
                raise QueueFull(len(self.waiting), max(1.0, mean * (1 + len(self.waiting) / self.max_batch_size)))
            self.waiting.append(seq)
            self.lock.notify()

    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def next_step(self) -> StepPlan | None:
        """What the next step prefills (waiting up to 50 ms for work); None once the loop must end."""
        with self.lock:
            if self.deadline_passed or (self.stopping and not self.busy()):
                return None
            plan = StepPlan()
            for seq in [s for s in self.waiting if s.cancelled] + [s for s in self.prefilling if s.cancelled]:
                (self.waiting if seq in self.waiting else self.prefilling).remove(seq)
                plan.cancelled.append(seq)
            if self.switch is not None and not (self.prefilling or self.running):
                plan.switch, self.switch = self.switch, None
                return plan
            while self.switch is None and self.waiting and len(self.running) + len(self.prefilling) < self.max_batch_size:
                self.prefilling.append(self.waiting.popleft())
            if not (self.prefilling or self.running or plan.cancelled):
                self.lock.wait(0.05)
                return plan
            budget = self.prefill_chunk
            for seq in self.prefilling:  # in arrival order, while the step's budget lasts
                if budget == 0:
                    break
                left = len(seq.prompt_ids) - seq.prefilled
                if seq.cache is None and left <= budget:
                    plan.whole.append(seq)
                else:
                    plan.chunks.append((seq, min(left, budget)))
                budget -= min(left, budget)
            return plan

    def join(self, seqs: list, kv, rows: list[int]) -> None:
        """Prefilled sequences (rows `rows` of a left-padded prefill cache's tensors `kv`) leave the prefill list and
        join the running batch, in one step under the lock (so they are never out of both)."""
        with self.lock:
            self.slab.join(kv, rows, [len(seq.prompt_ids) for seq in seqs])
            self.prefilling = [seq for seq in self.prefilling if seq not in seqs]
            self.running += seqs
            self.culture_ids += [seq.culture_id for seq in seqs]

    def leave(self, seqs: list) -> None:
        """Remove sequences from wherever they are (the slab moves its last rows into freed ones)."""
        if not seqs:
            return
        with self.lock:
            for seq in seqs:
                if seq in self.prefilling:
                    self.prefilling.remove(seq)
            order = self.slab.remove([row for row, seq in enumerate(self.running) if seq in seqs])
            self.running = [self.running[row] for row in order]
            self.culture_ids = [self.culture_ids[row] for row in order]

    def finished(self, seq) -> None:
        with self.lock:
            self._durations.append(time.perf_counter() - seq.arrival)

    def drain(self) -> list:
        """Every sequence still held (the loop has ended), the slab cleared."""
        with self.lock:
            left = list(self.waiting) + self.prefilling + self.running
            if self.switch is not None:  # abandoned: the engine stops
                self.switch[1].set()
                self.switch = None
            self.waiting.clear()
            self.prefilling, self.running, self.culture_ids = [], [], []
            self.slab.clear()
            self.lock.notify_all()
            return left

    def cache_tokens(self) -> int:
        return self.slab.tokens_held() + sum(seq.prefilled for seq in self.prefilling)

    def gauges(self) -> dict:
        with self.lock:
            return {"queue_depth": len(self.waiting), "running": len(self.running), "prefilling": len(self.prefilling),
                    "cache_tokens": self.cache_tokens()}
