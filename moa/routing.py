"""Token-level culture routing: the per-layer gate and the per-call routing state.

A forward call of `MoAForCausalLM` opens a `RoutingCall` and makes it current in a
`contextvars.ContextVar` for the duration of the call. Every forward of the base model (one per
new token under `generate`) begins a `RoutingStep` on the call with what the gates read: the token
embeddings and the padding mask of the new tokens. Decoder layers ask the call for their gate's
logits (`RoutingCall.gate`), which reads the step and the gate's running sums over the tokens
before it (`RouterSums`, kept in the `RouterState` that goes with the KV cache), and publish the
resulting `AdapterPlan` on the call for the projections inside them. The state lives on the call
object, tagged with the owning model: two models, or two threads, never see each other's routing.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moa.compat import cached_length
from moa.kernels import AdapterPlan, plan_adapters

# router target of a row whose prompt names no culture: its gates learn the uniform distribution over the
# cultures there, so a prompt without a cue gets a low top probability (see MoAForCausalLM.router_loss)
NO_CULTURE = -2

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


@dataclass
class RouterSums:
    """One layer's gate over the tokens so far (see `TokenRouter`): what decoding the next token needs."""

    total: torch.Tensor  # [B, dim]: sum of the features weighted by exp(score)
    weight: torch.Tensor  # [B]: sum of the weights
    taps: torch.Tensor  # [B, window-1, window, dim]: the window projections of the last window-1 tokens

    def detach(self) -> "RouterSums":
        return RouterSums(self.total.detach(), self.weight.detach(), self.taps.detach())


@dataclass
class RouterState:
    """The gates' running sums over the tokens a KV cache holds, by decoder layer index. One per cache
    (`router_state`): it lives and dies with the cache, and a decode step continues it."""

    layers: dict[int, RouterSums] = field(default_factory=dict)


_STATES: "weakref.WeakKeyDictionary[object, RouterState]" = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def router_state(cache) -> RouterState | None:
    """The `RouterState` that goes with a transformers KV cache (created empty on first use; None without a cache)."""
    if cache is None:
        return None
    with _STATES_LOCK:
        state = _STATES.get(cache)
        if state is None:
            state = _STATES[cache] = RouterState()
    return state


@dataclass
class RoutingStep:
    """What the gates read in one forward of the base model."""

    router_input: torch.Tensor  # [B, S, d]: the token embeddings of the new tokens (the decoder stack's input)
    mask: torch.Tensor | None  # [B, S]: their padding mask (None: every token attends)


@dataclass(eq=False)
class RoutingCall:
    """Routing for one forward (or one `generate`) call of one model."""

    owner: object  # the model's routing key
    mode: str  # "oracle" | "router" | "topk"
    num_cultures: int
    culture_ids: torch.Tensor | None = None  # [B] long, -1 = base model
    culture_key: tuple | None = None  # culture_ids as a tuple of ints (derived when not given)
    top_k: int = 1
    collect_logits: bool = True
    router_logits: list = field(default_factory=list)  # per layer [B, S, K]
    active: tuple | None = None  # (plan, weights) of the decoder layer running now
    step: RoutingStep | None = None  # the base model's forward in progress
    oracle_plans: PlanCache = field(default_factory=PlanCache)  # the model passes the one its calls share

    def __post_init__(self):
        if self.culture_ids is not None and self.culture_key is None:
            self.culture_key = tuple(self.culture_ids.tolist())

    @property
    def gates_run(self) -> bool:
        """Whether the gates run: not in oracle mode when no gate logits are wanted (the plan is the given cultures)."""
        return self.mode != "oracle" or self.collect_logits

    def begin_step(self, router_input: torch.Tensor, attention_mask: torch.Tensor | None):
        """Begin one forward of the base model: the gates read `router_input` [B, S, d] (the new tokens'
        embeddings) under the last S columns of `attention_mask` [B, S_total] (past and new tokens)."""
        seq = router_input.shape[1]
        self.step = RoutingStep(router_input, None if attention_mask is None else attention_mask[:, -seq:])

    def gate(self, router: "TokenRouter", cache) -> torch.Tensor:
        """The logits [B, S, K] of one layer's gate for this step, continuing its running sums over the
        tokens `cache` (the layer's KV cache, None when caching is off) holds, and keeping the new sums there."""
        if self.step is None:
            raise RuntimeError("a decoder layer ran before its model's forward began a routing step")
        state = router_state(cache)
        past = None
        if cached_length(cache, router.layer_index) > 0:
            past = state.layers.get(router.layer_index)
            if past is None:
                raise RuntimeError(f"the KV cache holds past tokens for layer {router.layer_index} but no router state: "
                                   f"pass the cache produced by this MoA model")
        logits, sums = router(self.step.router_input, self.step.mask, past)
        if state is not None:
            state.layers[router.layer_index] = sums.detach()
        return logits

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

    It reads hidden states x (the decoder stack's input, see `MoADecoderLayer`), RMS-normalised and
    zeroed on padding: h_s. Each token is described by the window of its last `window` tokens,
        f_s = tanh(bias + sum_j W_j h_{s-j}),  j = 0..window-1  (h before the first token is zero),
    `dim` features, so a name or a city that the tokenizer splits into several pieces is read as one
    cue, not as pieces that other names share. The features are pooled causally over the tokens so
    far (padding excluded) with learned attention weights: token s gets weight exp(score_s),
    score_s = C·tanh(sqrt(dim)·u·f_s / C), so the pool settles on the tokens that name a culture
    instead of averaging them away. The linear gate reads the RMS-normalised pool. `score` starts at
    zero (a plain prefix mean). Scores are bounded by C, so the weighted sums need no running
    maximum. `forward` returns the sums and the window's last projections after its tokens
    (`RouterSums`) and continues them in the next call: decoding one token at a time gives the same
    logits as a full forward.
    """

    SCORE_BOUND = 10.0

    def __init__(self, hidden_size: int, num_cultures: int, layer_index: int, window: int = 3, dim: int = 32,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.layer_index, self.window, self.dim = layer_index, window, dim
        self.taps = nn.Linear(hidden_size, window * dim, bias=False)  # rows [j*dim, (j+1)*dim): W_j
        self.bias = nn.Parameter(torch.zeros(dim))
        self.score = nn.Linear(dim, 1, bias=False)
        self.score_scale = dim**0.5  # a step-size multiplier for u under Adam: without it the pool stays close to a mean
        self.gate = nn.Linear(dim, num_cultures, bias=True)
        with torch.no_grad():
            self.taps.weight.copy_(torch.randn(self.taps.weight.shape, generator=generator) * (window * hidden_size) ** -0.5)
            self.gate.weight.copy_(torch.randn(self.gate.weight.shape, generator=generator) * dim**-0.5)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.gate.bias)

    def features(self, h: torch.Tensor, past: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(f [B, S, dim], the taps of the last window-1 positions [B, window-1, window, dim]) from RMS-normalised
        hidden states h [B, S, d] and the taps of the positions before them (`past`, None at the start)."""
        batch, seq = h.shape[:2]
        taps = F.linear(h, self.taps.weight.float()).view(batch, seq, self.window, self.dim)
        if past is None:
            past = taps.new_zeros(batch, self.window - 1, self.window, self.dim)
        taps = torch.cat([past, taps], dim=1)
        lead = self.window - 1
        f = self.bias.float() + sum(taps[:, lead - j:lead - j + seq, j] for j in range(self.window))
        return torch.tanh(f), taps[:, taps.shape[1] - lead:]

    def pool_weights(self, f: torch.Tensor) -> torch.Tensor:
        """[B, S]: exp(score) of features f, in (e^-2C, 1]."""
        c = self.SCORE_BOUND
        score = c * torch.tanh(F.linear(f, self.score.weight.float()).squeeze(-1) * self.score_scale / c)
        return torch.exp(score - c)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None,
                past: RouterSums | None = None) -> tuple[torch.Tensor, RouterSums]:
        """(logits [B, S, K], the sums after these tokens) for hidden states [B, S, d] under `mask` [B, S],
        continuing `past` (the sums over the tokens before them; None at the start)."""
        m = torch.ones(hidden.shape[:2], device=hidden.device) if mask is None else mask.to(hidden.device, torch.float32)
        h = F.rms_norm(hidden.float(), hidden.shape[-1:]) * m[..., None]
        f, tail = self.features(h, None if past is None else past.taps)
        w = self.pool_weights(f) * m
        total = torch.cumsum(f * w[..., None], dim=1)
        weight = torch.cumsum(w, dim=1)
        if past is not None:
            total, weight = total + past.total[:, None], weight + past.weight[:, None]
        pooled = total / weight.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
        logits = self.gate(F.rms_norm(pooled, pooled.shape[-1:]).to(self.gate.weight.dtype))
        return logits, RouterSums(total[:, -1], weight[:, -1], tail)
