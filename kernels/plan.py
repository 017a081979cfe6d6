"""Routing metadata for a mixed-adapter batch: every (token, slot) assignment grouped by adapter.

A plan is built once per forward call (once per decoder layer when a learned router decides)
and reused by every projection that sees the same tokens, so the sort and the host sync it
needs are paid once, not once per linear layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

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

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.ids.shape[1]

    @property
    def num_assignments(self) -> int:
        return self.sorted_slot.numel()

    @cached_property
    def token_runs(self) -> list[tuple[int, int, int]] | None:
        """Maximal runs of consecutive tokens with the same single adapter, as (adapter, start, count)
        in token order (adapter -1: no adapter); None when tokens have more than one slot. A prefill
        batch in oracle routing has one run per row, a batch sorted by culture one per culture."""
        if self.top_k != 1 or self.num_tokens == 0:
            return None
        flat = self.ids[:, 0]
        starts = torch.cat([flat.new_zeros(1), torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1]).tolist()
        ends = starts[1:] + [self.num_tokens]
        adapters = flat[starts].tolist()
        return [(a, s, e - s) for a, s, e in zip(adapters, starts, ends)]

    @cached_property
    def row_adapters(self) -> torch.Tensor | None:
        """[B] adapter of each row (-1: none) when every row of `row_len` tokens takes one adapter in a
        single slot, else None. Oracle routing and training under gold routing give such plans."""
        if self.row_len is None or self.top_k != 1 or self.num_tokens == 0:  # plan_adapters checked row_len divides T
            return None
        rows = self.ids[:, 0].view(-1, self.row_len)
        return rows[:, 0].clone() if bool((rows == rows[:, :1]).all()) else None

    @property
    def max_count(self) -> int:
        return max(self.counts, default=0)

    @property
    def pads_all_adapters(self) -> bool:
        """Padded layout over all K adapters (no weight gather) when at least half of them are used."""
        return 2 * len(self.adapters) >= self.num_adapters

    @property
    def padded_groups(self) -> int:
        """Groups in the padded layout: K, or the used adapters only."""
        return self.num_adapters if self.pads_all_adapters else len(self.adapters)

    @cached_property
    def adapters_tensor(self) -> torch.Tensor:
        return torch.tensor(self.adapters, dtype=torch.long, device=self.ids.device)

    @cached_property
    def _group_counts_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        counts, offsets = self.counts, self.offsets
        if self.pads_all_adapters:
            full_counts, full_offsets = [0] * self.num_adapters, [0] * self.num_adapters
            for a, c, o in zip(self.adapters, counts, offsets):
                full_counts[a], full_offsets[a] = c, o
            counts, offsets = full_counts, full_offsets
        dev = self.ids.device
        return torch.tensor(counts, device=dev), torch.tensor(offsets, device=dev)

    @cached_property
    def padded_index(self) -> torch.Tensor:
        """[G, L] positions into the sorted arrays, L = max_count; padding points at position 0."""
        counts, offsets = self._group_counts_offsets
        col = torch.arange(self.max_count, device=self.ids.device)
        pos = offsets[:, None] + col[None, :]
        return torch.where(self.padded_valid, pos, torch.zeros_like(pos))

    @cached_property
    def padded_token(self) -> torch.Tensor:
        """[G, L] token of each padded entry (padding repeats a real token; its weight is zeroed)."""
        return self.sorted_token[self.padded_index]

    def padded_scale(self, coef: float, dtype: torch.dtype) -> torch.Tensor:
        """[G, L, 1]: `coef` on real entries, 0 on padding (cached per coef and dtype)."""
        cache = self.__dict__.setdefault("_padded_scale", {})
        key = (coef, dtype)
        if key not in cache:
            cache[key] = self.padded_valid[..., None].to(dtype) * coef
        return cache[key]

    @cached_property
    def padded_slot(self) -> torch.Tensor | None:
        """[T] flat position of each token's entry in the [G, L] padded layout, when every token has
        exactly one assignment (top-1, no -1): the padded output is then read back in token order with
        a gather instead of scattered with an index_add. None otherwise."""
        if self.top_k != 1 or self.num_assignments != self.num_tokens:
            return None
        flat = self.padded_valid.reshape(-1)
        positions = torch.arange(flat.numel(), device=self.ids.device)[flat]
        return torch.empty_like(self.sorted_token).index_copy_(0, self.padded_token.reshape(-1)[flat], positions)

    @cached_property
    def padded_valid(self) -> torch.Tensor:
        """[G, L] bool: which padded entries are real assignments."""
        counts, _ = self._group_counts_offsets
        return torch.arange(self.max_count, device=self.ids.device)[None, :] < counts[:, None]


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
