"""Token-level culture routing: the per-layer gate and the per-call routing state.

A forward call of `MoAForCausalLM` opens a `RoutingCall` and makes it current in a
`contextvars.ContextVar` for the duration of the call. Decoder layers read it, let their gate
decide, and publish the resulting `AdapterPlan` on the call for the projections inside them.
The state lives on the call object, tagged with the owning model: two models, or two threads,
never see each other's routing.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moa.compat import cached_length
from moa.kernels import AdapterPlan, plan_adapters

_CURRENT: contextvars.ContextVar["RoutingCall | None"] = contextvars.ContextVar("moa_routing_call", default=None)


class PlanCache:
    """Oracle plans shared by a model's calls, keyed by (culture ids, batch, seq, device): a decode loop
    calling forward once per step builds its plan once. Keeps the `size` newest; thread-safe; a copy
    (deepcopy, pickle) starts empty."""

    def __init__(self, size: int = 8):
        self.size = size
        self._plans: dict = {}
        self._lock = threading.Lock()

    def get(self, key, build) -> AdapterPlan:
        with self._lock:
            plan = self._plans.get(key)
        if plan is None:
            plan = build()
            with self._lock:
                if key not in self._plans and len(self._plans) >= self.size:
                    self._plans.pop(next(iter(self._plans)))  # the oldest
                self._plans[key] = plan
        return plan

    def __len__(self) -> int:
        return len(self._plans)

    def __getstate__(self) -> dict:
        return {"size": self.size}

    def __setstate__(self, state: dict):
        self.__init__(state["size"])


@dataclass(eq=False)
class RoutingCall:
    """Routing for one forward (or one `generate`) call of one model."""

    owner: object  # the model's routing key
    mode: str  # "oracle" | "router" | "topk"
    num_cultures: int
    culture_ids: torch.Tensor | None = None  # [B] long, -1 = base model
    culture_key: tuple | None = None  # culture_ids as a tuple of ints (derived when not given)
    top_k: int = 1
    attention_mask: torch.Tensor | None = None  # [B, S_total] of the current step, captured per base forward
    collect_logits: bool = True
    router_logits: list = field(default_factory=list)  # per layer [B, S, K]
    active: tuple | None = None  # (plan, weights) of the decoder layer running now
    router_input: torch.Tensor | None = None  # hidden states entering the first decoder layer, this step
    oracle_plans: PlanCache = field(default_factory=PlanCache)  # the model passes the one its calls share

    def __post_init__(self):
        if self.culture_ids is not None and self.culture_key is None:
            self.culture_key = tuple(self.culture_ids.tolist())

    def oracle_plan(self, batch: int, seq: int, device) -> AdapterPlan:
        """Every token takes its row's culture; built once per culture ids and shape and shared by all
        layers (and, through the model's `oracle_plans`, by later calls: every decode step of a batch)."""
        ids = self.culture_ids
        if ids.shape[0] != batch and batch % ids.shape[0]:
            raise ValueError(f"culture_ids has {ids.shape[0]} rows but the batch has {batch}")

        def build() -> AdapterPlan:
            rows = ids.to(device).repeat_interleave(batch // ids.shape[0])
            return plan_adapters(rows[:, None].expand(batch, seq).reshape(-1), self.num_cultures, row_len=seq)

        return self.oracle_plans.get((self.culture_key, batch, seq, str(device)), build)

    def route(self, logits: torch.Tensor) -> tuple[AdapterPlan, torch.Tensor | None]:
        """Adapter plan and per-token weights for one layer, from its gate logits [B, S, K]."""
        batch, seq, k = logits.shape
        if self.mode == "oracle":
            return self.oracle_plan(batch, seq, logits.device), None
        flat = logits.reshape(-1, k)
        if self.mode == "router":
            return plan_adapters(flat.argmax(-1), k, row_len=seq), None
        probs = flat.float().softmax(-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        return plan_adapters(top_i, k), (top_w / top_w.sum(-1, keepdim=True)).to(logits.dtype)

    @contextlib.contextmanager
    def running(self, plan: AdapterPlan, weights):
        previous, self.active = self.active, (plan, weights)
        try:
            yield
        finally:
            self.active = previous


def current_call(owner: object) -> RoutingCall | None:
    """The routing call of `owner` in progress in this context, if any."""
    call = _CURRENT.get()
    return call if call is not None and call.owner is owner else None


@contextlib.contextmanager
def routing_call(call: RoutingCall):
    token = _CURRENT.set(call)
    try:
        yield call
    finally:
        _CURRENT.reset(token)


def replay_routing_context():
    """`context_fn` for torch.utils.checkpoint: the recompute in backward runs under the routing
    (call and active plan) of the original forward, so checkpointed layers get the same adapters."""
    call = _CURRENT.get()
    active = call.active if call is not None else None
    return contextlib.nullcontext(), _replay(call, active)


@contextlib.contextmanager
def _replay(call: RoutingCall | None, active):
    token = _CURRENT.set(call)
    previous = call.active if call is not None else None
    if call is not None:
        call.active = active
    try:
        yield
    finally:
        if call is not None:
            call.active = previous
        _CURRENT.reset(token)


class TokenRouter(nn.Module):
    """Per-layer gate: culture logits for every token.

    It reads hidden states (the decoder stack's input, see `MoADecoderLayer`), RMS-normalised, and pools them causally over the
    tokens so far (padding excluded) with learned attention weights: token s gets weight
    exp(score_s), score_s = C·tanh(sqrt(d)·w·h_s / C), so the pool can settle on the tokens that name a
    culture (a city, a personal name) instead of averaging them away, and even the first layer,
    whose input is just the token embedding, sees the cues earlier in the sequence. The linear
    gate reads the RMS-normalised pool. `score` starts at zero (a plain prefix mean). Scores are
    bounded by C, so the weighted sums need no running maximum; under a KV cache they are kept on
    the cache object, and decoding one token at a time gives the same logits as a full forward.
    """

    SCORE_BOUND = 10.0

    def __init__(self, hidden_size: int, num_cultures: int, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.score = nn.Linear(hidden_size, 1, bias=False)
        self.score_scale = hidden_size**0.5  # a step-size multiplier for w under Adam: without it the pool stays close to a mean
        nn.init.zeros_(self.score.weight)
        self.gate = nn.Linear(hidden_size, num_cultures, bias=True)
        nn.init.normal_(self.gate.weight, std=hidden_size**-0.5)
        nn.init.zeros_(self.gate.bias)

    def pool_weights(self, h: torch.Tensor) -> torch.Tensor:
        """[B, S]: exp(score) of RMS-normalised hidden states h, in (e^-2C, 1]."""
        c = self.SCORE_BOUND
        score = c * torch.tanh(F.linear(h, self.score.weight.float()).squeeze(-1) * self.score_scale / c)
        return torch.exp(score - c)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, cache=None) -> torch.Tensor:
        h = F.rms_norm(hidden.float(), hidden.shape[-1:])
        m = torch.ones(h.shape[:2], device=h.device) if mask is None else mask.to(h.device, torch.float32)
        w = self.pool_weights(h) * m
        total = torch.cumsum(h * w[..., None], dim=1)
        weight = torch.cumsum(w, dim=1)
        store = _router_store(cache)
        if cached_length(cache, self.layer_index) > 0:
            if self.layer_index not in store:
                raise RuntimeError(f"the KV cache holds past tokens for layer {self.layer_index} but no router state: "
                                   f"pass the cache produced by this MoA model")
            past_total, past_weight = store[self.layer_index]
            total, weight = total + past_total[:, None], weight + past_weight[:, None]
        if store is not None:
            store[self.layer_index] = (total[:, -1].detach(), weight[:, -1].detach())
        pooled = total / weight.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
        return self.gate(F.rms_norm(pooled, pooled.shape[-1:]).to(self.gate.weight.dtype))


def _router_store(cache) -> dict | None:
    """Per-layer running sums for the router, kept on the KV cache object they belong to (a
    transformers Cache, checked by `moa.compat.layer_cache`)."""
    if cache is None:
        return None
    store = getattr(cache, "_moa_router_state", None)
    if store is None:
        store = {}
        cache._moa_router_state = store
    return store
