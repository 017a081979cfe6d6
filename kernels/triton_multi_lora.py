"""The Triton backend of `multi_lora`: schedules, launchers, and the op autograd and torch.compile see.

Path rule (`use_sgmv`): with N valid (token, slot) assignments spread over U used adapters, the
SGMV path (tokens grouped by adapter, one tensor-core matmul per tile) runs when the mean group
fills at least one MMA tile, N >= SGMV_MIN_ROWS * U; otherwise (decode, or many adapters with a
few tokens each) the BGMV path runs, one program per token.

Forward, per launch group of up to three projections ("slices") sharing the input x:
  shrink  h[slot, s] = x[t] A_s[a]^T                  one launch for all slices (x read once)
  expand  y_s[t] = base_s[t] + sum_j coef * h B_s[a]^T one launch per slice (per routing slot on SGMV)
with coef[t*k+j] = w[t, j] * s[a] (0 where the id is -1), computed by torch ops outside the op so
that autograd carries its gradient to the router weights and to a scaling tensor.
Backward, with u_s = gy_s B_s[a] (a shrink of gy):
  grad x = sum_s coef u_s A_s[a]       one launch for all slices
  grad A_s[a] = sum_n coef u_s^T x,  grad B_s[a] = sum_n coef gy_s^T h_s   per-adapter reductions
  grad coef = sum_s <u_s, h_s>
The op is a `torch.library.custom_op` with `register_autograd`, opaque to torch.compile (one node
forward, one backward). `torch.library.triton_op` would let Inductor look inside, but its tracing
needs compiled `JITFunction`s and fails on the interpreter this project's CPU tests run under.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
import torch
import triton

from . import triton_kernels as tk
from .plan import AdapterPlan

SGMV_MIN_ROWS = 16  # an MMA tile's minimum M: below this mean group size the SGMV tiles are mostly padding
CHUNK_ROWS = 512  # rows one program of the weight-gradient reduction sums before meeting others in fp32 atomics
MAX_SLICES = 3  # weight pointers one launch takes (q/k/v); more slices run as further launch groups
TARGET_PROGRAMS = 512  # BGMV shrink splits d_in until about this many programs run (decode: T*k is small)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreter_active() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they run on CPU tensors)."""
    return type(tk.sgmv_shrink_kernel).__name__ == "InterpretedFunction"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use full-precision dots unless torch allows TF32 matmuls; 16-bit inputs ignore it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _pow2(n: int, lo: int, hi: int | None = None) -> int:
    v = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return v if hi is None else min(v, hi)


# ---------------------------------------------------------------------------------------------
# Default configs: block sizes and warps per kernel, as functions of the problem. The launchers and
# the ahead-of-time compile report (`moa.kernels.triton_compile`) both read them.
# ---------------------------------------------------------------------------------------------

def sgmv_block_m(plan: AdapterPlan) -> int:
    """Rows per SGMV tile: the mean group size rounded up to a power of two, within [16, 64]."""
    mean = plan.num_assignments / max(len(plan.adapters), 1)
    return _pow2(int(mean + 0.999), 16, 64)


def _rank_block(rank: int, dtype: torch.dtype) -> int:
    """Rank columns per MMA operand: the whole rank up to 64 (32 for fp32, whose dots run on FMAs)."""
    return _pow2(rank, 16, 64 if dtype != torch.float32 else 32)


def config_sgmv_shrink(rank: int, d_in: int, dtype: torch.dtype, block_m: int) -> dict:
    return dict(BLOCK_M=block_m, BLOCK_R=_rank_block(rank, dtype), BLOCK_K=64 if dtype != torch.float32 else 32,
                num_warps=4, num_stages=3)


def config_sgmv_expand(rank: int, d_out: int, dtype: torch.dtype, block_m: int) -> dict:
    block_n = _pow2(d_out, 16, 128 if dtype != torch.float32 else 32)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_rank_block(rank, dtype),
                num_warps=8 if dtype != torch.float32 and block_m * block_n >= 8192 else 4, num_stages=2)


def config_segment_outer(rank: int, width: int, dtype: torch.dtype) -> dict:
    block_r = _rank_block(rank, dtype)
    block_d = _pow2(width, 16, 128 if dtype != torch.float32 else 64)
    return dict(BLOCK_M=32, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=8 if dtype != torch.float32 and block_r * block_d >= 8192 else 4,
                num_stages=2)


def config_bgmv_shrink(rank: int, d_in: int, dtype: torch.dtype) -> dict:
    block_r = _pow2(rank, 1)
    block_k = max(16, min(_pow2(d_in, 16), 4096 // block_r, 512))
    return dict(BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4)


def config_bgmv_expand(rank: int, d_out: int, dtype: torch.dtype) -> dict:
    block_r = _pow2(rank, 1)
    return dict(BLOCK_R=block_r, BLOCK_N=max(16, min(_pow2(d_out, 16), 8192 // block_r, 256)), num_warps=4)


# ---------------------------------------------------------------------------------------------
# Schedule: device-side tables derived from an AdapterPlan, cached on the plan object.
# ---------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Schedule:
    """Device tables for one plan and one tile size.

    `tiles` ([3, n] int32: adapter, start, end) cut the plan's adapter-sorted order
    (`token`, `slot`) into tiles of `block_m` rows for the shrink. The expand needs every launch to
    hold a token at most once, so for top-k it walks a second order grouped by (slot j, adapter)
    (`pass_token`, `pass_slot`), its tiles `pass_tiles[:, pass_bounds[j]:pass_bounds[j + 1]]` run as
    launch j. `chunks` cut the adapter-sorted order into runs of at most CHUNK_ROWS for the
    weight-gradient reductions; `chunks_atomic` says whether two chunks share an adapter.
    """

    block_m: int
    ids: torch.Tensor  # [T * k] int32
    token: torch.Tensor
    slot: torch.Tensor
    tiles: torch.Tensor
    pass_token: torch.Tensor
    pass_slot: torch.Tensor
    pass_tiles: torch.Tensor
    pass_bounds: list[int]
    chunks: torch.Tensor
    chunks_atomic: bool

    def tensors(self) -> list[torch.Tensor]:
        return [self.ids, self.token, self.slot, self.tiles, self.pass_token, self.pass_slot, self.pass_tiles, self.chunks]

    def meta(self) -> list[int]:
        return [self.block_m, int(self.chunks_atomic), *self.pass_bounds]

    @classmethod
    def from_packed(cls, tensors: list[torch.Tensor], meta: list[int]) -> "Schedule":
        ids, token, slot, tiles, pass_token, pass_slot, pass_tiles, chunks = tensors
        return cls(meta[0], ids, token, slot, tiles, pass_token, pass_slot, pass_tiles, list(meta[2:]), chunks, bool(meta[1]))


def _cut(adapters: list[int], offsets: list[int], counts: list[int], size: int) -> list[list[int]]:
    """[adapter, start, end] triples covering each group in runs of at most `size` rows."""
    out = [[], [], []]
    for adapter, start, count in zip(adapters, offsets, counts):
        for s in range(start, start + count, size):
            out[0].append(adapter)
            out[1].append(s)
            out[2].append(min(s + size, start + count))
    return out


def _table(rows: list[list[int]], device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32, device=device).reshape(3, -1)


_SCHEDULES: "weakref.WeakKeyDictionary[AdapterPlan, dict[int, Schedule]]" = weakref.WeakKeyDictionary()


def schedule_for(plan: AdapterPlan, block_m: int | None = None) -> Schedule:
    """The plan's device tables, built once per plan and tile size and reused by every projection."""
    block_m = sgmv_block_m(plan) if block_m is None else block_m
    cache = _SCHEDULES.setdefault(plan, {})
    if block_m not in cache:
        cache[block_m] = _build_schedule(plan, block_m)
    return cache[block_m]


def _build_schedule(plan: AdapterPlan, block_m: int) -> Schedule:
    dev = plan.ids.device
    k = plan.top_k
    token = plan.sorted_token.to(torch.int32)
    slot = plan.sorted_slot.to(torch.int32)
    tiles = _table(_cut(plan.adapters, plan.offsets, plan.counts, block_m), dev)
    chunks_rows = _cut(plan.adapters, plan.offsets, plan.counts, CHUNK_ROWS)
    chunks_atomic = len(set(chunks_rows[0])) < len(chunks_rows[0])
    chunks = _table(chunks_rows, dev)
    if k == 1:
        pass_token, pass_slot, pass_tiles, bounds = token, slot, tiles, [0, tiles.shape[1]]
    else:
        j = plan.sorted_slot % k
        order = torch.argsort(j, stable=True)  # stays grouped by adapter inside each slot j
        pass_token, pass_slot = token[order], slot[order]
        key = j[order] * plan.num_adapters + plan.sorted_adapter[order]
        counts_all = torch.bincount(key, minlength=k * plan.num_adapters).tolist()
        rows, bounds, start = [[], [], []], [0], 0
        for jj in range(k):
            seg = counts_all[jj * plan.num_adapters:(jj + 1) * plan.num_adapters]
            adapters = [a for a, c in enumerate(seg) if c]
            counts = [seg[a] for a in adapters]
            offsets = []
            for c in counts:
                offsets.append(start)
                start += c
            cut = _cut(adapters, offsets, counts, block_m)
            for r in range(3):
                rows[r].extend(cut[r])
            bounds.append(len(rows[0]))
        pass_tiles = _table(rows, dev)
    ids = plan.ids.reshape(-1).to(torch.int32)
    return Schedule(block_m, ids, token, slot, tiles, pass_token, pass_slot, pass_tiles, bounds, chunks, chunks_atomic)


def use_sgmv(plan: AdapterPlan) -> bool:
    """SGMV when the mean adapter group fills an MMA tile; BGMV (decode) otherwise."""
    return plan.num_assignments >= SGMV_MIN_ROWS * max(len(plan.adapters), 1)


# ---------------------------------------------------------------------------------------------
# Launchers. Each writes into the buffer it is given; `h`/`u` are [T * k, S, r] fp32, slot-indexed.
# ---------------------------------------------------------------------------------------------

def _groups(n: int):
    return [list(range(i, min(i + MAX_SLICES, n))) for i in range(0, n, MAX_SLICES)]


def _w3(ws: list[torch.Tensor]) -> list[torch.Tensor]:
    return [ws[min(i, len(ws) - 1)] for i in range(MAX_SLICES)]


def launch_shrink(x: torch.Tensor, weights: list[torch.Tensor], h: torch.Tensor, sched: Schedule, sgmv: bool,
                  transpose: bool = False) -> None:
    """h[slot, s, :r] = x[token] @ W_s[a]^T for every valid slot (other rows of h are left as they are).

    W_s is [K, r, d] (A), or [K, d, r] read transposed (B, for the backward) when `transpose`.
    Slices are taken three at a time; slice s writes h[:, s].
    """
    if sched.token.numel() == 0:
        return
    w0 = weights[0]
    k_dim, rank = w0.shape[0], (w0.shape[2] if transpose else w0.shape[1])
    d_in = x.shape[1]
    for group in _groups(len(weights)):
        ws = _w3([weights[s] for s in group])
        sw = (w0.stride(0), w0.stride(2), w0.stride(1)) if transpose else (w0.stride(0), w0.stride(1), w0.stride(2))
        hv = h[:, group[0]:]
        if sgmv:
            cfg = config_sgmv_shrink(rank, d_in, w0.dtype, sched.block_m)
            grid = (sched.tiles.shape[1], len(group), triton.cdiv(rank, cfg["BLOCK_R"]))
            tk.sgmv_shrink_kernel[grid](
                x, *ws, hv, sched.tiles[0], sched.tiles[1], sched.tiles[2], sched.token, sched.slot,
                d_in, rank, x.stride(0), x.stride(1), *sw, hv.stride(0), hv.stride(1),
                DOT_PRECISION=dot_precision(w0.dtype), **cfg)
        else:
            cfg = config_bgmv_shrink(rank, d_in, w0.dtype)
            slots = sched.ids.numel()
            block_k = cfg["BLOCK_K"]
            parts = max(1, min(triton.cdiv(d_in, block_k), TARGET_PROGRAMS // max(slots * len(group), 1)))
            split_len = triton.cdiv(triton.cdiv(d_in, parts), block_k) * block_k
            parts = triton.cdiv(d_in, split_len)
            if parts > 1:
                hv[:, :len(group)].zero_()
            grid = (slots, len(group), parts)
            top_k = slots // max(x.shape[0], 1)
            tk.bgmv_shrink_kernel[grid](
                x, *ws, hv, sched.ids, d_in, rank, top_k, split_len,
                x.stride(0), x.stride(1), *sw, hv.stride(0), hv.stride(1), ATOMIC=parts > 1, **cfg)


def launch_expand(h: torch.Tensor, weights: list[torch.Tensor], out: torch.Tensor, base: torch.Tensor | None,
                  coef: torch.Tensor | None, sched: Schedule, sgmv: bool, transpose: bool = False) -> None:
    """out[t] = base[t] + sum_j sum_s coef * h[t*k+j, s] @ W_s[a]^T, every row of `out` written.

    W_s is [K, d_out, r] (B), or [K, r, d_out] read transposed (A, for grad x) when `transpose`.
    `base` may be `out` itself (accumulate in place) or None (zeros).
    """
    num_tokens, d_out = out.shape
    if num_tokens == 0:
        return
    w0 = weights[0]
    rank = w0.shape[1] if transpose else w0.shape[2]
    sw = (w0.stride(0), w0.stride(2), w0.stride(1)) if transpose else (w0.stride(0), w0.stride(1), w0.stride(2))
    has_coef = coef is not None
    coef_arg = coef if has_coef else h
    for gi, group in enumerate(_groups(len(weights))):
        ws = _w3([weights[s] for s in group])
        hv = h[:, group[0]:]
        src = base if gi == 0 else out
        if sgmv:
            if gi == 0 and src is not out:
                out.copy_(src) if src is not None else out.zero_()
            cfg = config_sgmv_expand(rank, d_out, w0.dtype, sched.block_m)
            for j in range(len(sched.pass_bounds) - 1):
                lo, hi = sched.pass_bounds[j], sched.pass_bounds[j + 1]
                if hi == lo:
                    continue
                tiles = sched.pass_tiles[:, lo:hi]
                grid = (hi - lo, triton.cdiv(d_out, cfg["BLOCK_N"]))
                tk.sgmv_expand_kernel[grid](
                    hv, *ws, out, coef_arg, tiles[0], tiles[1], tiles[2], sched.pass_token, sched.pass_slot,
                    d_out, rank, hv.stride(0), hv.stride(1), *sw, out.stride(0), out.stride(1),
                    NUM_SLICES=len(group), HAS_COEF=has_coef, DOT_PRECISION=dot_precision(w0.dtype),
                    **cfg)
        else:
            cfg = config_bgmv_expand(rank, d_out, w0.dtype)
            top_k = sched.ids.numel() // num_tokens
            base_arg = src if src is not None else out
            grid = (num_tokens, triton.cdiv(d_out, cfg["BLOCK_N"]))
            tk.bgmv_expand_kernel[grid](
                hv, *ws, base_arg, out, coef_arg, sched.ids, d_out, rank, top_k,
                hv.stride(0), hv.stride(1), *sw, base_arg.stride(0), base_arg.stride(1), out.stride(0), out.stride(1),
                NUM_SLICES=len(group), HAS_BASE=src is not None, HAS_COEF=has_coef, **cfg)


def launch_segment_outer(p: torch.Tensor, q: torch.Tensor, g: torch.Tensor, coef: torch.Tensor | None,
                         sched: Schedule, transpose_out: bool = False) -> None:
    """g[a] += sum over adapter a's assignments of coef * p[slot]^T q[token] (g fp32, zeroed by the caller).

    p: [T * k, r] fp32 (a slice of h or u); q: [T, width]; g: [K, r, width], or [K, width, r] when
    `transpose_out` (grad B).
    """
    if sched.token.numel() == 0:
        return
    width = q.shape[1]
    rank = p.shape[1]
    cfg = config_segment_outer(rank, width, q.dtype)
    sg = (g.stride(0), g.stride(2), g.stride(1)) if transpose_out else (g.stride(0), g.stride(1), g.stride(2))
    grid = (sched.chunks.shape[1], triton.cdiv(width, cfg["BLOCK_D"]), triton.cdiv(rank, cfg["BLOCK_R"]))
    tk.segment_outer_kernel[grid](
        p, q, g, coef if coef is not None else p, sched.chunks[0], sched.chunks[1], sched.chunks[2],
        sched.token, sched.slot, width, rank, p.stride(0), q.stride(0), q.stride(1), *sg,
        HAS_COEF=coef is not None, ATOMIC=sched.chunks_atomic, DOT_PRECISION=dot_precision(q.dtype),
        **cfg)


# ---------------------------------------------------------------------------------------------
# Forward / backward implementations and their registration as one differentiable op.
# ---------------------------------------------------------------------------------------------

def _forward_into(x, lora_a, lora_b, bases, outs, coef, sched: Schedule, sgmv: bool) -> torch.Tensor:
    num_tokens, rank = x.shape[0], lora_a[0].shape[1]
    slots = sched.ids.numel()
    h = torch.empty(slots, len(lora_a), rank, dtype=torch.float32, device=x.device)
    xc = x.to(lora_a[0].dtype)
    launch_shrink(xc, lora_a, h, sched, sgmv)
    for s in range(len(lora_b)):
        launch_expand(h[:, s:s + 1], [lora_b[s]], outs[s], bases[s], coef, sched, sgmv)
    return h


@torch.library.custom_op("moa::multi_lora_fwd", mutates_args=())
def multi_lora_fwd(x: torch.Tensor, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
                   bases: list[torch.Tensor], has_base: list[bool], coef: torch.Tensor, tables: list[torch.Tensor],
                   meta: list[int], sgmv: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Functional forward: (y_s for every slice, h). y_s = base_s + LoRA delta, in a new buffer.

    A slice without a base has `has_base[s]` False and an empty placeholder in `bases` whose dtype is
    the output's.
    """
    sched = Schedule.from_packed(tables, meta)
    outs = [torch.empty(x.shape[0], b.shape[1], dtype=base.dtype, device=x.device) for b, base in zip(lora_b, bases)]
    present = [base if given else None for base, given in zip(bases, has_base)]
    h = _forward_into(x, lora_a, lora_b, present, outs, coef, sched, sgmv)
    return outs, h


@multi_lora_fwd.register_fake
def _(x, lora_a, lora_b, bases, has_base, coef, tables, meta, sgmv):
    outs = [x.new_empty(x.shape[0], b.shape[1], dtype=base.dtype) for b, base in zip(lora_b, bases)]
    return outs, x.new_empty(tables[0].shape[0], len(lora_a), lora_a[0].shape[1], dtype=torch.float32)


@torch.library.custom_op("moa::multi_lora_add_", mutates_args=("outs",))
def multi_lora_add_(outs: list[torch.Tensor], x: torch.Tensor, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
                    coef: torch.Tensor, tables: list[torch.Tensor], meta: list[int], sgmv: bool) -> None:
    """In-place forward for inference: outs[s] += LoRA delta of slice s (no autograd)."""
    _forward_into(x, lora_a, lora_b, outs, outs, coef, Schedule.from_packed(tables, meta), sgmv)


@multi_lora_add_.register_fake
def _(outs, x, lora_a, lora_b, coef, tables, meta, sgmv):
    return None


@torch.library.custom_op("moa::multi_lora_bwd", mutates_args=())
def multi_lora_bwd(grads: list[torch.Tensor], x: torch.Tensor, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
                   h: torch.Tensor, coef: torch.Tensor, tables: list[torch.Tensor], meta: list[int], sgmv: bool,
                   need_x: bool, need_coef: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(grad x, grad A_s, grad B_s, grad coef). Grad x and grad coef are empty when not needed."""
    sched = Schedule.from_packed(tables, meta)
    num_tokens, rank, slices = x.shape[0], lora_a[0].shape[1], len(lora_a)
    wdt = lora_a[0].dtype
    xc = x.to(wdt)
    gys = [g.to(wdt) for g in grads]
    u = torch.empty_like(h)
    for s in range(slices):
        launch_shrink(gys[s], [lora_b[s]], u[:, s:s + 1], sched, sgmv, transpose=True)
    grad_x = x.new_empty(0)
    if need_x:
        grad_x = torch.empty_like(x)
        launch_expand(u, lora_a, grad_x, None, coef, sched, sgmv, transpose=True)
    grad_a, grad_b = [], []
    for s in range(slices):
        ga = torch.zeros(lora_a[s].shape, dtype=torch.float32, device=x.device)
        launch_segment_outer(u[:, s], xc, ga, coef, sched)
        gb = torch.zeros(lora_b[s].shape, dtype=torch.float32, device=x.device)
        launch_segment_outer(h[:, s], gys[s], gb, coef, sched, transpose_out=True)
        grad_a.append(ga.to(lora_a[s].dtype))
        grad_b.append(gb.to(lora_b[s].dtype))
    grad_coef = coef.new_empty(0)
    if need_coef:
        valid = (sched.ids >= 0)[:, None, None]
        grad_coef = torch.where(valid, u * h, torch.zeros_like(h[:, :, :1])).sum(dim=(1, 2))
    return grad_x, grad_a, grad_b, grad_coef


@multi_lora_bwd.register_fake
def _(grads, x, lora_a, lora_b, h, coef, tables, meta, sgmv, need_x, need_coef):
    grad_x = torch.empty_like(x) if need_x else x.new_empty(0)
    return (grad_x, [torch.empty_like(a) for a in lora_a], [torch.empty_like(b) for b in lora_b],
            torch.empty_like(coef) if need_coef else coef.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, lora_a, lora_b, bases, has_base, coef, tables, meta, sgmv = inputs
    _, h = output
    ctx.save_for_backward(x, h, coef, *lora_a, *lora_b, *tables)
    ctx.slices, ctx.num_tables, ctx.meta, ctx.sgmv = len(lora_a), len(tables), meta, sgmv
    ctx.has_base = has_base
    ctx.out_dtypes = [b.dtype for b in bases]


def _backward(ctx, grad_outs, grad_h):
    x, h, coef, *rest = ctx.saved_tensors
    n = ctx.slices
    lora_a, lora_b, tables = rest[:n], rest[n:2 * n], rest[2 * n:]
    grads = [g if g is not None else torch.zeros(x.shape[0], b.shape[1], dtype=dt, device=x.device)
             for g, b, dt in zip(grad_outs, lora_b, ctx.out_dtypes)]
    need_x, need_coef = ctx.needs_input_grad[0], ctx.needs_input_grad[5]
    grad_x, grad_a, grad_b, grad_coef = multi_lora_bwd(grads, x, list(lora_a), list(lora_b), h, coef, list(tables),
                                                       ctx.meta, ctx.sgmv, need_x, need_coef)
    grad_bases = [g if given else None for g, given in zip(grads, ctx.has_base)]
    return (grad_x if need_x else None, grad_a, grad_b, grad_bases, None, grad_coef if need_coef else None,
            [None] * ctx.num_tables, None, None)


multi_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Entry point used by `multi_lora` / `multi_lora_sliced` for backend="triton".
# ---------------------------------------------------------------------------------------------

def assignment_coef(plan: AdapterPlan, weights: torch.Tensor | None, scaling) -> torch.Tensor:
    """coef[t*k+j] = w[t, j] * s[ids[t, j]] as fp32, 0 where the id is -1; differentiable in w and s."""
    ids = plan.ids.reshape(-1)
    valid = ids >= 0
    if isinstance(scaling, torch.Tensor):
        coef = scaling.float()[ids.clamp(min=0)]
    else:
        coef = torch.full(ids.shape, float(scaling), dtype=torch.float32, device=ids.device)
    if weights is not None:
        coef = coef * weights.reshape(-1).float()
    return torch.where(valid, coef, torch.zeros_like(coef))


def check_triton_inputs(x, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], plan: AdapterPlan) -> None:
    """What the Triton path needs beyond the shared checks: a device it can run on, one dtype for A and B."""
    if not x.is_cuda and not interpreter_active():
        raise RuntimeError(f"backend='triton' needs CUDA tensors, got tensors on {x.device}; to run the kernels on "
                           "CPU tensors set TRITON_INTERPRET=1 before moa.kernels' Triton backend is first used")
    for name, t in [("x", x), ("adapter_ids", plan.ids), *[(f"lora_a[{i}]", a) for i, a in enumerate(lora_a)],
                    *[(f"lora_b[{i}]", b) for i, b in enumerate(lora_b)]]:
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all inputs must share a device")
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        if a.dtype not in DTYPES:
            raise TypeError(f"lora_a[{i}] dtype {a.dtype} is not supported by the triton backend: use one of {DTYPES}")
        if a.dtype != lora_a[0].dtype or b.dtype != lora_a[0].dtype:
            raise TypeError(f"triton backend needs one dtype for every lora_a/lora_b, got lora_a[{i}] {a.dtype}, "
                            f"lora_b[{i}] {b.dtype}, lora_a[0] {lora_a[0].dtype}")
        if a.shape != lora_a[0].shape:
            raise ValueError(f"slices must share K, r and d_in: lora_a[{i}] is {tuple(a.shape)}, lora_a[0] {tuple(lora_a[0].shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")


def multi_lora_triton_sliced(x, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], plan: AdapterPlan,
                             weights=None, scaling=1.0, base_outs: list[torch.Tensor | None] | None = None,
                             path: str | None = None) -> list[torch.Tensor]:
    """The Triton op for S projections sharing x; inputs already validated by the caller.

    Returns one output per slice. When autograd does not track the call and base_outs are given, the
    deltas accumulate into base_outs in place and those tensors are returned (inference); otherwise
    every output is a new tensor. `path` forces "sgmv" or "bgmv" (tests, benchmarks); None applies
    `use_sgmv`.
    """
    check_triton_inputs(x, lora_a, lora_b, plan)
    if any(a.stride() != lora_a[0].stride() for a in lora_a):  # one launch reads every slice with A's strides
        lora_a = [a.contiguous() for a in lora_a]
    bases = list(base_outs) if base_outs is not None else [None] * len(lora_b)
    if path not in (None, "sgmv", "bgmv"):
        raise ValueError(f"unknown path {path!r}: expected None, 'sgmv' or 'bgmv'")
    sgmv = use_sgmv(plan) if path is None else path == "sgmv"
    if plan.num_assignments == 0:
        return [torch.zeros(x.shape[0], b.shape[1], dtype=b.dtype, device=x.device) if base is None else base.clone()
                for b, base in zip(lora_b, bases)]
    sched = schedule_for(plan)
    coef = assignment_coef(plan, weights, scaling)
    tracked = [x, *lora_a, *lora_b, coef, *[b for b in bases if b is not None]]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tracked)
    if not needs_grad and all(b is not None for b in bases):
        multi_lora_add_(bases, x, lora_a, lora_b, coef, sched.tensors(), sched.meta(), sgmv)
        return bases
    has_base = [b is not None for b in bases]
    placeholders = [b if b is not None else x.new_empty(0, dtype=lb.dtype) for b, lb in zip(bases, lora_b)]
    outs, _ = multi_lora_fwd(x, list(lora_a), list(lora_b), placeholders, has_base, coef, sched.tensors(),
                             sched.meta(), sgmv)
    return outs


def multi_lora_triton(x, lora_a, lora_b, plan: AdapterPlan, weights=None, scaling=1.0, base_out=None,
                      path: str | None = None) -> torch.Tensor:
    """One projection: `multi_lora_triton_sliced` with a single slice."""
    return multi_lora_triton_sliced(x, [lora_a], [lora_b], plan, weights, scaling, [base_out], path)[0]
