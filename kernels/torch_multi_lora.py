"""Pure-torch multi-LoRA: the reference for the Triton kernels and the CPU path.

Assignments (token, adapter) are grouped by adapter by an `AdapterPlan`. Three layouts, all plain
differentiable torch ops (autograd gives grad x, A, B and weights):

* rows: when every row of the batch takes one adapter (`plan.row_adapters`: oracle routing, training
  under gold routing), x is viewed as [B, S, d_in] and each row runs against its own adapter in two
  `bmm`s over the rows' gathered weights, the expand accumulated into the base output (prefill and
  training: no reorder of the tokens, two ops however many adapters);
* padded: the groups are padded to the largest one and run as two `bmm`s, a constant number of
  ops however many adapters the batch mixes (decode: few tokens per adapter); the groups are all
  K adapters when at least half are used (no copy of the weights), else the used ones. When every
  token has one adapter (a decode step under oracle routing) the outputs are read back in token
  order (`plan.padded_slot`) and scaled in the accumulation: padding is never read, so it needs no
  zeroing op;
* segmented: one pair of matmuls per used adapter over its contiguous slice (many tokens per
  adapter in no row structure, e.g. a learned router's choices). When the tokens come in few runs
  of one adapter (`plan.token_runs`) the slices are taken from x in token order and the result
  added without a gather or scatter.

`pick_layout` picks rows for long rows (the fastest there, forward and backward, from 16 tokens a
row), else padded or segmented by their extra work, counting a launched op as `OP_COST`
multiply-adds, a wasted padded row as its multiply-adds and a gathered weight element as
`WEIGHT_COPY`. The LoRA output is accumulated into `base_out` in place when it is given and autograd
is not recording (inference); under autograd a new tensor is returned.
"""
from __future__ import annotations

import torch

from .plan import AdapterPlan

OP_COST = 1 << 17  # multiply-adds one extra op costs on a CPU, roughly (a few microseconds)
WEIGHT_COPY = 4  # multiply-adds one gathered weight element costs: a copy out of memory the base weights keep cold
ROWS_MIN_LEN = 16  # shortest rows for the rows layout: below it the weights gathered per row cost more than padding
LAYOUTS = ("padded", "segmented", "rows")


def pick_layout(plan: AdapterPlan, rank: int, d_in: int, d_out: int) -> str:
    """"rows" when every row takes one adapter, rows are at least `ROWS_MIN_LEN` tokens long and at
    most half of them take none (their work is computed, then zeroed); else "padded" when padding
    every group to the largest (plus gathering the used adapters' weights when the groups are not
    all K) costs less than one op pair per adapter, else "segmented"."""
    long_rows = plan.row_len is not None and plan.row_len >= ROWS_MIN_LEN
    if long_rows and 2 * plan.num_assignments >= plan.num_tokens and plan.row_adapters is not None:
        return "rows"
    gathered = 0 if plan.pads_all_adapters else len(plan.adapters)
    wasted = (plan.padded_groups * plan.max_count - plan.num_assignments + WEIGHT_COPY * gathered) * rank * (d_in + d_out)
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
    if not plan.pads_all_adapters:
        a_t, b_t = a_t.index_select(0, plan.adapters_tensor), b_t.index_select(0, plan.adapters_tensor)
    index = plan.padded_token.reshape(-1)
    h = torch.bmm(x.index_select(0, index).view(*plan.padded_token.shape, -1), a_t)  # [G, L, r]
    slot, alpha = plan.padded_slot, 1.0
    if isinstance(coef, torch.Tensor):
        h = h * torch.where(plan.padded_valid, coef[plan.padded_index], torch.zeros_like(coef[:1]))[..., None]
    elif slot is not None:
        alpha = coef
    elif torch.is_grad_enabled():
        h = h * plan.padded_scale(coef, h.dtype)
    else:
        h.mul_(plan.padded_scale(coef, h.dtype))
    y = torch.bmm(h, b_t).reshape(index.shape[0], -1)
    return (index, y, alpha) if slot is None else (None, y.index_select(0, slot), alpha)


def _runs(plan: AdapterPlan):
    """The token-order runs when there are few enough of them to beat a gather and scatter, else None."""
    runs = plan.token_runs
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
    ids = plan.row_adapters
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
    """`base_out + sum_j w[t,j] s[a] (x[t] A[a]^T) B[a]^T`, a = ids[t, j]; see `moa.kernels.multi_lora`."""
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


def multi_lora_naive(x, lora_a, lora_b, adapter_ids, weights=None, scaling=1.0, base_out=None):
    """Token-by-token definition of the op, for tests: slow, obviously correct."""
    ids = adapter_ids[:, None] if adapter_ids.dim() == 1 else adapter_ids
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(lora_b.shape[1], dtype=lora_b.dtype, device=x.device)
        for j in range(ids.shape[1]):
            a = int(ids[t, j])
            if a < 0:
                continue
            s = scaling[a] if isinstance(scaling, torch.Tensor) else scaling
            w = weights[t, j] if weights is not None else 1.0
            acc = acc + w * s * (lora_b[a] @ (lora_a[a] @ x[t].to(lora_a.dtype)))
        rows.append(acc)
    lora = torch.stack(rows) if rows else x.new_zeros(0, lora_b.shape[1], dtype=lora_b.dtype)
    return lora if base_out is None else base_out + lora.to(base_out.dtype)
