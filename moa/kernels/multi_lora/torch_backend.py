"""The torch backend of `multi_lora`: plain differentiable torch ops in one of three layouts.

Assignments (token, adapter) come grouped by adapter in an `AdapterPlan`; autograd gives grad x, A,
B, weights and base_out. The layouts:

* rows: when every row of the batch takes one adapter (oracle routing, training under gold
  routing), x is viewed as [B, S, d_in] and each row runs against its own adapter in two `bmm`s over
  the rows' gathered weights, the expand accumulated into the base output (prefill and training: no
  reorder of the tokens, two ops however many adapters);
* padded: the groups are padded to the largest one and run as two `bmm`s, a constant number of
  ops however many adapters the batch mixes (decode: few tokens per adapter); the groups are all
  K adapters when at least half are used (no copy of the weights), else the used ones. When every
  token has one adapter (a decode step under oracle routing) the outputs are read back in token
  order (`TorchPlan.padded_slot`) and scaled in the accumulation: padding is never read, so it needs
  no zeroing op;
* segmented: one pair of matmuls per used adapter over its contiguous slice (many tokens per
  adapter in no row structure, e.g. a learned router's choices). When the tokens come in few runs
  of one adapter (`TorchPlan.token_runs`) the slices are taken from x in token order and the result
  added without a gather or scatter.

`pick_layout` picks rows for long rows (the fastest there, forward and backward, from 16 tokens a
row), else padded or segmented by their extra work, counting a launched op as `OP_COST`
multiply-adds, a wasted padded row as its multiply-adds and a gathered weight element as
`WEIGHT_COPY`. The tables a layout reads (`TorchPlan`) are built on first use and kept in the plan's
"torch" cache slot, shared by every projection. The LoRA output is accumulated into `base_out` in
place when it is given and autograd is not recording (inference); under autograd a new tensor is
returned.
"""
from __future__ import annotations

from functools import cached_property

import torch

from .plan import AdapterPlan

OP_COST = 1 << 17  # multiply-adds one extra op costs on a CPU, roughly (a few microseconds)
WEIGHT_COPY = 4  # multiply-adds one gathered weight element costs: a copy out of memory the base weights keep cold
ROWS_MIN_LEN = 16  # shortest rows for the rows layout: below it the weights gathered per row cost more than padding
LAYOUTS = ("padded", "segmented", "rows")


class TorchPlan:
    """The layouts' tables for one plan, each built on first use (`tables(plan)` keeps one per plan)."""

    def __init__(self, plan: AdapterPlan):
        self.plan = plan
        self._padded_scale: dict[tuple[float, torch.dtype], torch.Tensor] = {}

    @cached_property
    def token_runs(self) -> list[tuple[int, int, int]] | None:
        """Maximal runs of consecutive tokens with the same single adapter, as (adapter, start, count)
        in token order (adapter -1: no adapter); None when tokens have more than one slot. A prefill
        batch in oracle routing has one run per row, a batch sorted by culture one per culture."""
        plan = self.plan
        if plan.top_k != 1 or plan.num_tokens == 0:
            return None
        flat = plan.ids[:, 0]
        starts = torch.cat([flat.new_zeros(1), torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1]).tolist()
        ends = starts[1:] + [plan.num_tokens]
        adapters = flat[starts].tolist()
        return [(a, s, e - s) for a, s, e in zip(adapters, starts, ends)]

    @cached_property
    def row_adapters(self) -> torch.Tensor | None:
        """[B] adapter of each row (-1: none) when every row of `row_len` tokens takes one adapter in a
        single slot, else None. Oracle routing and training under gold routing give such plans."""
        plan = self.plan
        if plan.row_len is None or plan.top_k != 1 or plan.num_tokens == 0:  # plan_adapters checked row_len divides T
            return None
        rows = plan.ids[:, 0].view(-1, plan.row_len)
        return rows[:, 0].clone() if bool((rows == rows[:, :1]).all()) else None

    @property
    def pads_all_adapters(self) -> bool:
        """Padded layout over all K adapters (no weight gather) when at least half of them are used."""
        return 2 * len(self.plan.adapters) >= self.plan.num_adapters

    @property
    def padded_groups(self) -> int:
        """Groups in the padded layout: K, or the used adapters only."""
        return self.plan.num_adapters if self.pads_all_adapters else len(self.plan.adapters)

    @cached_property
    def adapters_tensor(self) -> torch.Tensor:
        return torch.tensor(self.plan.adapters, dtype=torch.long, device=self.plan.ids.device)

    @cached_property
    def _group_counts_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.plan
        counts, offsets = plan.counts, plan.offsets
        if self.pads_all_adapters:
            full_counts, full_offsets = [0] * plan.num_adapters, [0] * plan.num_adapters
            for a, c, o in zip(plan.adapters, counts, offsets):
                full_counts[a], full_offsets[a] = c, o
            counts, offsets = full_counts, full_offsets
        dev = plan.ids.device
        return torch.tensor(counts, device=dev), torch.tensor(offsets, device=dev)

    @cached_property
    def padded_valid(self) -> torch.Tensor:
        """[G, L] bool, L = the largest group: which padded entries are real assignments."""
        counts, _ = self._group_counts_offsets
        return torch.arange(self.plan.max_count, device=self.plan.ids.device)[None, :] < counts[:, None]

    @cached_property
    def padded_index(self) -> torch.Tensor:
        """[G, L] positions into the plan's sorted arrays; padding points at position 0."""
        _, offsets = self._group_counts_offsets
        col = torch.arange(self.plan.max_count, device=self.plan.ids.device)
        pos = offsets[:, None] + col[None, :]
        return torch.where(self.padded_valid, pos, torch.zeros_like(pos))

    @cached_property
    def padded_token(self) -> torch.Tensor:
        """[G, L] token of each padded entry (padding repeats a real token; its weight is zeroed)."""
        return self.plan.sorted_token[self.padded_index]

    @cached_property
    def padded_slot(self) -> torch.Tensor | None:
        """[T] flat position of each token's entry in the [G, L] padded layout, when every token has
        exactly one assignment (top-1, no -1): the padded output is then read back in token order with
        a gather instead of scattered with an index_add. None otherwise."""
        plan = self.plan
        if plan.top_k != 1 or plan.num_assignments != plan.num_tokens:
            return None
        flat = self.padded_valid.reshape(-1)
        positions = torch.arange(flat.numel(), device=plan.ids.device)[flat]
        return torch.empty_like(plan.sorted_token).index_copy_(0, self.padded_token.reshape(-1)[flat], positions)

    def padded_scale(self, coef: float, dtype: torch.dtype) -> torch.Tensor:
        """[G, L, 1]: `coef` on real entries, 0 on padding (kept per coef and dtype)."""
        key = (coef, dtype)
        if key not in self._padded_scale:
            self._padded_scale[key] = self.padded_valid[..., None].to(dtype) * coef
        return self._padded_scale[key]


def tables(plan: AdapterPlan) -> TorchPlan:
    """The plan's torch tables, in its "torch" cache slot."""
    return plan.cached("torch", TorchPlan)


def rows_apply(plan: AdapterPlan) -> bool:
    """Every row takes one adapter, rows are at least `ROWS_MIN_LEN` tokens long and at most half of
    them take none (their work is computed, then zeroed)."""
    long_rows = plan.row_len is not None and plan.row_len >= ROWS_MIN_LEN
    return long_rows and 2 * plan.num_assignments >= plan.num_tokens and tables(plan).row_adapters is not None


def pick_layout(plan: AdapterPlan, rank: int, d_in: int, d_out: int) -> str:
    """"rows" when `rows_apply`; else "padded" when padding every group to the largest (plus gathering
    the used adapters' weights when the groups are not all K) costs less than one op pair per adapter,
    else "segmented"."""
    if rows_apply(plan):
        return "rows"
    t = tables(plan)
    gathered = 0 if t.pads_all_adapters else len(plan.adapters)
    wasted = (t.padded_groups * plan.max_count - plan.num_assignments + WEIGHT_COPY * gathered) * rank * (d_in + d_out)
    return "padded" if wasted <= 2 * len(plan.adapters) * OP_COST else "segmented"


def assignment_scale(plan: AdapterPlan, weights: torch.Tensor | None, scaling, dtype) -> torch.Tensor | float:
    """Per-assignment factor `w[t, j] * s[a]` in sorted order ([N] tensor), or a float when it is uniform."""
    coef = scaling.to(dtype)[plan.sorted_adapter] if isinstance(scaling, torch.Tensor) else float(scaling)
    if weights is not None:
        coef = weights.reshape(-1)[plan.sorted_slot].to(dtype) * coef
    return coef


def token_order(plan: AdapterPlan, coef: torch.Tensor) -> torch.Tensor:
    """[T] per-token factors from per-assignment ones in sorted order (top-1 plans; 0 where no adapter)."""
    return coef.new_zeros(plan.num_tokens).index_copy(0, plan.sorted_token, coef)


def _padded(x, a_t, b_t, plan: AdapterPlan, coef):
    """(token index, LoRA outputs, factor) with the groups padded to the largest: a [G*L] index and
    [G*L, d_out] outputs whose padding entries are zeroed, or, when every token has one assignment, no
    index and the outputs read back in token order ([T, d_out]); padding is then never read, and a
    uniform scale is left to the accumulation (factor) instead of an op on the shrink."""
    t = tables(plan)
    if not t.pads_all_adapters:
        a_t, b_t = a_t.index_select(0, t.adapters_tensor), b_t.index_select(0, t.adapters_tensor)
    index = t.padded_token.reshape(-1)
    h = torch.bmm(x.index_select(0, index).view(*t.padded_token.shape, -1), a_t)  # [G, L, r]
    slot, alpha = t.padded_slot, 1.0
    if isinstance(coef, torch.Tensor):
        h = h * torch.where(t.padded_valid, coef[t.padded_index], torch.zeros_like(coef[:1]))[..., None]
    elif slot is not None:
        alpha = coef
    elif torch.is_grad_enabled():
        h = h * t.padded_scale(coef, h.dtype)
    else:
        h.mul_(t.padded_scale(coef, h.dtype))
    y = torch.bmm(h, b_t).reshape(index.shape[0], -1)
    return (index, y, alpha) if slot is None else (None, y.index_select(0, slot), alpha)


def _runs(plan: AdapterPlan):
    """The token-order runs when there are few enough of them to beat a gather and scatter, else None."""
    runs = tables(plan).token_runs
    return runs if runs is not None and len(runs) <= 2 * max(len(plan.adapters), 1) else None


def _segmented(x, a_t, b_t, plan: AdapterPlan, coef):
    """(token index, LoRA outputs, factor 1): [N] index (None: every token, in token order), one matmul
    pair per segment."""
    runs = _runs(plan)
    if runs is not None:  # slices of x in token order: no gather, no scatter
        if isinstance(coef, torch.Tensor):
            coef = token_order(plan, coef)
        pieces = []
        for adapter, start, count in runs:
            if adapter < 0:
                pieces.append(x.new_zeros(count, b_t.shape[2], dtype=b_t.dtype))
                continue
            h = x[start : start + count] @ a_t[adapter]
            h = h * (coef[start : start + count, None] if isinstance(coef, torch.Tensor) else coef)
            pieces.append(h @ b_t[adapter])
        return None, torch.cat(pieces) if len(pieces) > 1 else pieces[0], 1.0
    xs = x.index_select(0, plan.sorted_token)
    pieces = []
    for adapter, start, count in zip(plan.adapters, plan.offsets, plan.counts):
        h = xs[start : start + count] @ a_t[adapter]
        h = h * (coef[start : start + count, None] if isinstance(coef, torch.Tensor) else coef)
        pieces.append(h @ b_t[adapter])
    return plan.sorted_token, torch.cat(pieces) if len(pieces) > 1 else pieces[0], 1.0


def _rows(x, a_t, b_t, plan: AdapterPlan, coef, out, in_place: bool):
    """Each row of `row_len` tokens against its own adapter: x as [B, S, d_in], weights gathered per row."""
    ids = tables(plan).row_adapters
    rows, seq = ids.numel(), plan.row_len
    safe = ids.clamp(min=0)  # rows without an adapter run adapter 0 and are zeroed by the scale
    h = torch.bmm(x.reshape(rows, seq, -1), a_t.index_select(0, safe))  # [B, S, r]
    if isinstance(coef, torch.Tensor):
        scale = token_order(plan, coef).view(rows, seq, 1)
    else:
        scale = ((ids >= 0).to(h.dtype) * coef).view(rows, 1, 1)
    h = h.mul_(scale) if in_place else h * scale
    b_rows = b_t.index_select(0, safe)  # [B, r, d_out]
    if in_place and out.dtype == h.dtype and out.is_contiguous():
        out.view(rows, seq, -1).baddbmm_(h, b_rows)
        return out
    y = torch.bmm(h, b_rows).view(plan.num_tokens, -1).to(out.dtype)
    return out.add_(y) if in_place else out + y


def multi_lora_torch(x, lora_a, lora_b, plan: AdapterPlan, weights=None, scaling=1.0, base_out=None):
    """`multi_lora` on plain torch ops, inputs already checked; see `moa.kernels.multi_lora`."""
    out = base_out if base_out is not None else x.new_zeros(x.shape[0], lora_b.shape[1], dtype=lora_b.dtype)
    if plan.num_assignments == 0:
        return out
    coef = assignment_scale(plan, weights, scaling, lora_a.dtype)
    x = x if x.dtype == lora_a.dtype else x.to(lora_a.dtype)
    # under autograd a new tensor: base_out may be a view autograd must not see modified
    tracked = torch.is_grad_enabled() and (any(t.requires_grad for t in (out, x, lora_a, lora_b))
                                           or isinstance(coef, torch.Tensor) and coef.requires_grad)
    layout = pick_layout(plan, lora_a.shape[1], lora_a.shape[2], lora_b.shape[1])
    a_t, b_t = lora_a.transpose(1, 2), lora_b.transpose(1, 2)  # [K, d_in, r], [K, r, d_out]: x @ a_t, h @ b_t
    if layout == "rows":
        return _rows(x, a_t, b_t, plan, coef, out, in_place=not tracked)
    index, y, alpha = (_padded if layout == "padded" else _segmented)(x, a_t, b_t, plan, coef)
    y = y if y.dtype == out.dtype else y.to(out.dtype)
    if tracked:
        return torch.add(out, y, alpha=alpha) if index is None else out.index_add(0, index, y, alpha=alpha)
    return out.add_(y, alpha=alpha) if index is None else out.index_add_(0, index, y, alpha=alpha)
