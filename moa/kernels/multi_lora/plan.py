"""The plan of a mixed-adapter batch: every (token, slot) assignment grouped by adapter.

A plan is built once per forward call (once per decoder layer when a learned router decides) and
shared by every projection that sees the same tokens, so the sort and the host sync it needs are
paid once, not once per linear layer. What a backend derives from a plan (the torch path's layouts,
the Triton schedule, whether the CPU kernel applies) it keeps in the plan's cache, one slot per
backend: `plan.cached(backend, build)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(eq=False)
class AdapterPlan:
    """Tokens grouped by adapter (a stable sort of the flattened `[T, k]` adapter ids).

    `sorted_slot[n]` is the flat index `t * k + j` of the n-th valid assignment, `sorted_token[n]`
    its token `t` and `sorted_adapter[n]` its adapter; assignments of adapter `adapters[u]`
    occupy `offsets[u] : offsets[u] + counts[u]`. Ids equal to -1 are dropped (no adapter).
    """

    ids: torch.Tensor  # [T, k] int64, -1 = no adapter
    num_adapters: int
    sorted_slot: torch.Tensor  # [N] int64
    sorted_token: torch.Tensor  # [N] int64
    sorted_adapter: torch.Tensor  # [N] int64
    adapters: list[int]  # used adapters, ascending
    counts: list[int]  # assignments per used adapter
    offsets: list[int]  # start of each used adapter's segment
    row_len: int | None = None  # tokens per row when the T tokens are B rows of one length (x is [B, S, d] flattened)
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.ids.shape[1]

    @property
    def num_assignments(self) -> int:
        return self.sorted_slot.numel()

    @property
    def max_count(self) -> int:
        return max(self.counts, default=0)

    def cached(self, backend: str, build: Callable[["AdapterPlan"], Any]) -> Any:
        """The backend's data derived from this plan: `build(plan)` on the first call, the same object after."""
        if backend not in self._cache:
            self._cache[backend] = build(self)
        return self._cache[backend]


def plan_adapters(adapter_ids: torch.Tensor, num_adapters: int, row_len: int | None = None) -> AdapterPlan:
    """Group the tokens of a batch by adapter. `adapter_ids`: int `[T]` or `[T, k]`, values in [-1, K).
    `row_len`: tokens per row when the T tokens are rows of one length (lets a plan whose rows each take
    one adapter run them as a batch of rows)."""
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"adapter_ids must be a torch.Tensor, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype.is_floating_point or adapter_ids.dtype == torch.bool or adapter_ids.is_complex():
        raise TypeError(f"adapter_ids must be an integer tensor, got dtype {adapter_ids.dtype}")
    if adapter_ids.dim() not in (1, 2):
        raise ValueError(f"adapter_ids must have shape [T] or [T, k], got {tuple(adapter_ids.shape)}")
    if num_adapters < 1:
        raise ValueError(f"num_adapters must be >= 1, got {num_adapters}")
    if row_len is not None and (not isinstance(row_len, int) or row_len < 1 or adapter_ids.shape[0] % row_len):
        raise ValueError(f"row_len must be a positive int dividing the {adapter_ids.shape[0]} tokens, got {row_len!r}")
    ids = (adapter_ids[:, None] if adapter_ids.dim() == 1 else adapter_ids).long()
    flat = ids.reshape(-1)
    if flat.numel():
        lo, hi = (int(v) for v in torch.aminmax(flat))
        if lo < -1 or hi >= num_adapters:
            bad = lo if lo < -1 else hi
            raise ValueError(f"adapter id {bad} out of range: expected -1 (no adapter) or 0..{num_adapters - 1}")
    key = torch.where(flat < 0, torch.full_like(flat, num_adapters), flat)
    order = torch.argsort(key, stable=True)
    counts_all = torch.bincount(key, minlength=num_adapters + 1)[:num_adapters].tolist()
    adapters = [a for a, c in enumerate(counts_all) if c > 0]
    counts = [counts_all[a] for a in adapters]
    offsets, start = [], 0
    for c in counts:
        offsets.append(start)
        start += c
    sorted_slot = order[:start]
    return AdapterPlan(
        ids=ids,
        num_adapters=num_adapters,
        sorted_slot=sorted_slot,
        sorted_token=torch.div(sorted_slot, ids.shape[1], rounding_mode="floor"),
        sorted_adapter=flat[sorted_slot],
        adapters=adapters,
        counts=counts,
        offsets=offsets,
        row_len=row_len,
    )
