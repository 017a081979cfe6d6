"""The triton backend of `multi_lora`: kernels, launchers, and the op autograd and torch.compile see.

Notation: T tokens, k routing slots per token, slot `t * k + j`, K adapters of rank r. `h[slot, :]`
is the fp32 LoRA activation of a slot. A weight operand `W` is addressed as `W[a, i, d]` through
three strides, so the same kernel reads `A[a]` ([r, d_in]), `B[a]` ([d_out, r]) or either one
transposed. All accumulation is fp32; activations are read in the weights' dtype (fp32, fp16 or bf16).

Path rule (`use_sgmv`): with N valid (token, slot) assignments spread over U used adapters, the SGMV
path runs when the mean group fills at least one MMA tile, N >= SGMV_MIN_ROWS * U: it walks a tile
list, tile i covering rows `start[i]:end[i]` of a token order grouped by adapter, all of adapter
`adapter[i]`, so each tile is one small matmul on tensor cores. Otherwise (decode, or many adapters
with a few tokens each) the BGMV path gives every slot or token its own program and uses vector FMAs;
a slot with id -1 returns before loading anything.

Forward:
  shrink  h[slot] = x[t] A[a]^T
  expand  y[t] = base[t] + sum_j coef[slot] h[slot] B[a]^T     (one launch per routing slot j on SGMV)
with coef[t*k+j] = w[t, j] * s[a] (0 where the id is -1), computed by torch ops outside the op so
that autograd carries its gradient to the router weights and to a scaling tensor.
Backward, with u = gy B[a] (a shrink of gy):
  grad x = coef u A[a],  grad A[a] = sum_n coef u^T x,  grad B[a] = sum_n coef gy^T h,  grad coef = <u, h>
The op is a `torch.library.custom_op` with `register_autograd`, opaque to torch.compile (one node
forward, one backward). `torch.library.triton_op` would let Inductor look inside, but its tracing
needs compiled `JITFunction`s and fails on the interpreter this project's CPU tests run under.

The schedule (`Schedule`: the tile and chunk tables) is built once per plan and kept in the plan's
"triton" cache slot. Under TRITON_INTERPRET=1 the variable must be set before `triton` is first
imported (Triton's own library functions such as `tl.sum` are defined at that import);
tests/conftest.py does so.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .plan import AdapterPlan

SGMV_MIN_ROWS = 16  # an MMA tile's minimum M: below this mean group size the SGMV tiles are mostly padding
CHUNK_ROWS = 512  # rows one program of the weight-gradient reduction sums before meeting others in fp32 atomics
TARGET_PROGRAMS = 512  # BGMV shrink splits d_in until about this many programs run (decode: T*k is small)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------------------

@triton.jit
def sgmv_shrink_kernel(
    x_ptr, w_ptr, h_ptr,
    tile_adapter_ptr, tile_start_ptr, tile_end_ptr, token_ptr, slot_ptr,
    d_in, rank,
    stride_xt, stride_xd,
    stride_wk, stride_wr, stride_wd,
    stride_hn,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """h[slot, r0:r0+BLOCK_R] = x[token] @ W[a, r0:r0+BLOCK_R, :]^T for the rows of one tile.

    Grid: (tiles, rank blocks).
    """
    tile = tl.program_id(0)
    r0 = tl.program_id(1) * BLOCK_R
    adapter = tl.load(tile_adapter_ptr + tile).to(tl.int64)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)

    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    tokens = tl.load(token_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)

    x_rows = x_ptr + tokens[:, None] * stride_xt
    w_cols = w_ptr + adapter * stride_wk + offs_r[None, :] * stride_wr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < d_in
        xt = tl.load(x_rows + kk[None, :] * stride_xd, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_cols + kk[:, None] * stride_wd, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc += tl.dot(xt, wt, input_precision=DOT_PRECISION)

    slots = tl.load(slot_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    h_out = h_ptr + slots[:, None] * stride_hn + offs_r[None, :]
    tl.store(h_out, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def sgmv_expand_kernel(
    h_ptr, w_ptr, out_ptr, coef_ptr,
    tile_adapter_ptr, tile_start_ptr, tile_end_ptr, token_ptr, slot_ptr,
    d_out, rank,
    stride_hn,
    stride_wk, stride_wn, stride_wr,
    stride_ot, stride_od,
    HAS_COEF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[token, n] += coef[slot] * h[slot, :] @ W[a, n, :]^T for the rows of one tile.

    Read-modify-write of `out`: a launch must not hold a token twice (one launch per routing slot).
    Grid: (tiles, cdiv(d_out, BLOCK_N)).
    """
    tile = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    adapter = tl.load(tile_adapter_ptr + tile).to(tl.int64)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)

    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    tokens = tl.load(token_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    slots = tl.load(slot_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < d_out
    offs_r = tl.arange(0, BLOCK_R)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < rank
        ht = tl.load(h_ptr + slots[:, None] * stride_hn + rr[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        if HAS_COEF:
            ht = ht * tl.load(coef_ptr + slots, mask=mask_m, other=0.0)[:, None]
        wt = tl.load(w_ptr + adapter * stride_wk + offs_n[None, :] * stride_wn + rr[:, None] * stride_wr,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(ht.to(wt.dtype), wt, input_precision=DOT_PRECISION)

    out = out_ptr + tokens[:, None] * stride_ot + offs_n[None, :] * stride_od
    mask = mask_m[:, None] & mask_n[None, :]
    prev = tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, (prev + acc).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def segment_outer_kernel(
    p_ptr, q_ptr, g_ptr, coef_ptr,
    chunk_adapter_ptr, chunk_start_ptr, chunk_end_ptr, token_ptr, slot_ptr,
    width, rank,
    stride_pn, stride_qt, stride_qd,
    stride_gk, stride_gr, stride_gd,
    HAS_COEF: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """g[a, i, d] (+)= sum over the chunk's rows of coef[slot] * p[slot, i] * q[token, d].

    The per-adapter weight gradients: grad A[a] = sum gh^T x and grad B[a]^T = sum (coef h)^T gy over
    that adapter's tokens. A chunk is a bounded run of one adapter's rows; chunks of the same adapter
    meet in `g` (fp32) through atomics, at most ceil(count / chunk) adds per element.
    Grid: (chunks, cdiv(width, BLOCK_D), cdiv(rank, BLOCK_R)).
    """
    chunk = tl.program_id(0)
    d0 = tl.program_id(1) * BLOCK_D
    r0 = tl.program_id(2) * BLOCK_R
    adapter = tl.load(chunk_adapter_ptr + chunk).to(tl.int64)
    start = tl.load(chunk_start_ptr + chunk)
    end = tl.load(chunk_end_ptr + chunk)

    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < width
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        tokens = tl.load(token_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        slots = tl.load(slot_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        qt = tl.load(q_ptr + tokens[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        pt = tl.load(p_ptr + slots[None, :] * stride_pn + offs_r[:, None],
                     mask=mask_r[:, None] & mask_m[None, :], other=0.0)
        if HAS_COEF:
            pt = pt * tl.load(coef_ptr + slots, mask=mask_m, other=0.0)[None, :]
        acc += tl.dot(pt.to(qt.dtype), qt, input_precision=DOT_PRECISION)

    g = g_ptr + adapter * stride_gk + offs_r[:, None] * stride_gr + offs_d[None, :] * stride_gd
    mask = mask_r[:, None] & mask_d[None, :]
    if ATOMIC:
        tl.atomic_add(g, acc, mask=mask)
    else:
        tl.store(g, acc, mask=mask)


@triton.jit
def bgmv_shrink_kernel(
    x_ptr, w_ptr, h_ptr, ids_ptr,
    d_in, rank, top_k, split_len,
    stride_xt, stride_xd,
    stride_wk, stride_wr, stride_wd,
    stride_hn,
    ATOMIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h[slot, :] (+)= x[slot // k, part] @ W[ids[slot], :, part]^T over one d_in part.

    `d_in` is split into parts of `split_len` (a multiple of BLOCK_K); with more than one part the
    partial sums meet in `h` through atomics. Grid: (T * k, parts).
    """
    slot = tl.program_id(0)
    adapter = tl.load(ids_ptr + slot)
    if adapter >= 0:
        token = (slot // top_k).to(tl.int64)
        k_begin = tl.program_id(1) * split_len
        k_end = tl.minimum(k_begin + split_len, d_in)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        offs_k = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + adapter.to(tl.int64) * stride_wk + offs_r[:, None] * stride_wr
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < k_end
            xv = tl.load(x_ptr + token * stride_xt + kk * stride_xd, mask=mask_k, other=0.0)
            wt = tl.load(w_rows + kk[None, :] * stride_wd, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            acc += tl.sum(wt.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)
        h_out = h_ptr + slot.to(tl.int64) * stride_hn + offs_r
        if ATOMIC:
            tl.atomic_add(h_out, acc, mask=mask_r)
        else:
            tl.store(h_out, acc, mask=mask_r)


@triton.jit
def bgmv_expand_kernel(
    h_ptr, w_ptr, base_ptr, out_ptr, coef_ptr, ids_ptr,
    d_out, rank, top_k,
    stride_hn,
    stride_wk, stride_wn, stride_wr,
    stride_bt, stride_bd, stride_ot, stride_od,
    HAS_BASE: tl.constexpr, HAS_COEF: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[t, n] = base[t, n] + sum_j coef[t*k+j] * h[t*k+j, :] @ W[ids[t*k+j], n, :]^T.

    One program per (token, d_out block) sums the token's k slots itself, so top-k needs no atomics
    and every row of `out` is written (base or zeros where all ids are -1). `out` may be `base`.
    Grid: (T, cdiv(d_out, BLOCK_N)).
    """
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < d_out
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    if HAS_BASE:
        acc = tl.load(base_ptr + token * stride_bt + offs_n * stride_bd, mask=mask_n, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(0, top_k):
        slot = token * top_k + j
        adapter = tl.load(ids_ptr + slot)
        if adapter >= 0:
            hv = tl.load(h_ptr + slot * stride_hn + offs_r, mask=mask_r, other=0.0)
            if HAS_COEF:
                hv = hv * tl.load(coef_ptr + slot)
            wt = tl.load(w_ptr + adapter.to(tl.int64) * stride_wk + offs_n[:, None] * stride_wn
                         + offs_r[None, :] * stride_wr, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            acc += tl.sum(wt.to(tl.float32) * hv[None, :], axis=1)
    tl.store(out_ptr + token * stride_ot + offs_n * stride_od, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


def interpreter_active() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they run on CPU tensors)."""
    return type(sgmv_shrink_kernel).__name__ == "InterpretedFunction"


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
# the ahead-of-time compile report (`moa.kernels.multi_lora.compile`) both read them.
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
# Schedule: device-side tables derived from an AdapterPlan, kept in the plan's "triton" cache slot.
# ---------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Schedule:
    """Device tables for one plan.

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


def schedule(plan: AdapterPlan) -> Schedule:
    """The plan's device tables, built once per plan and reused by every projection."""
    return plan.cached("triton", _build_schedule)


def _build_schedule(plan: AdapterPlan) -> Schedule:
    dev = plan.ids.device
    k = plan.top_k
    block_m = sgmv_block_m(plan)
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
# Launchers. Each writes into the buffer it is given; `h`/`u` are [T * k, r] fp32, slot-indexed.
# ---------------------------------------------------------------------------------------------

def _strides(w: torch.Tensor, transpose: bool) -> tuple[int, int, int]:
    """W[a, i, d]'s strides, reading the last two dimensions swapped when `transpose`."""
    return (w.stride(0), w.stride(2), w.stride(1)) if transpose else (w.stride(0), w.stride(1), w.stride(2))


def launch_shrink(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, sched: Schedule, sgmv: bool,
                  transpose: bool = False) -> None:
    """h[slot, :r] = x[token] @ W[a]^T for every valid slot (other rows of h are left as they are).

    W is [K, r, d] (A), or [K, d, r] read transposed (B, for the backward) when `transpose`.
    """
    if sched.token.numel() == 0:
        return
    rank = w.shape[2] if transpose else w.shape[1]
    d_in = x.shape[1]
    sw = _strides(w, transpose)
    if sgmv:
        cfg = config_sgmv_shrink(rank, d_in, w.dtype, sched.block_m)
        grid = (sched.tiles.shape[1], triton.cdiv(rank, cfg["BLOCK_R"]))
        sgmv_shrink_kernel[grid](
            x, w, h, sched.tiles[0], sched.tiles[1], sched.tiles[2], sched.token, sched.slot,
            d_in, rank, x.stride(0), x.stride(1), *sw, h.stride(0),
            DOT_PRECISION=dot_precision(w.dtype), **cfg)
    else:
        cfg = config_bgmv_shrink(rank, d_in, w.dtype)
        slots = sched.ids.numel()
        block_k = cfg["BLOCK_K"]
        parts = max(1, min(triton.cdiv(d_in, block_k), TARGET_PROGRAMS // max(slots, 1)))
        split_len = triton.cdiv(triton.cdiv(d_in, parts), block_k) * block_k
        parts = triton.cdiv(d_in, split_len)
        if parts > 1:
            h.zero_()
        top_k = slots // max(x.shape[0], 1)
        bgmv_shrink_kernel[(slots, parts)](
            x, w, h, sched.ids, d_in, rank, top_k, split_len,
            x.stride(0), x.stride(1), *sw, h.stride(0), ATOMIC=parts > 1, **cfg)


def launch_expand(h: torch.Tensor, w: torch.Tensor, out: torch.Tensor, base: torch.Tensor | None,
                  coef: torch.Tensor | None, sched: Schedule, sgmv: bool, transpose: bool = False) -> None:
    """out[t] = base[t] + sum_j coef * h[t*k+j] @ W[a]^T, every row of `out` written.

    W is [K, d_out, r] (B), or [K, r, d_out] read transposed (A, for grad x) when `transpose`.
    `base` may be `out` itself (accumulate in place) or None (zeros).
    """
    num_tokens, d_out = out.shape
    if num_tokens == 0:
        return
    rank = w.shape[1] if transpose else w.shape[2]
    sw = _strides(w, transpose)
    has_coef = coef is not None
    coef_arg = coef if has_coef else h
    if sgmv:
        if base is not out:
            out.copy_(base) if base is not None else out.zero_()
        cfg = config_sgmv_expand(rank, d_out, w.dtype, sched.block_m)
        for j in range(len(sched.pass_bounds) - 1):
            lo, hi = sched.pass_bounds[j], sched.pass_bounds[j + 1]
            if hi == lo:
                continue
            tiles = sched.pass_tiles[:, lo:hi]
            grid = (hi - lo, triton.cdiv(d_out, cfg["BLOCK_N"]))
            sgmv_expand_kernel[grid](
                h, w, out, coef_arg, tiles[0], tiles[1], tiles[2], sched.pass_token, sched.pass_slot,
                d_out, rank, h.stride(0), *sw, out.stride(0), out.stride(1),
                HAS_COEF=has_coef, DOT_PRECISION=dot_precision(w.dtype), **cfg)
    else:
        cfg = config_bgmv_expand(rank, d_out, w.dtype)
        top_k = sched.ids.numel() // num_tokens
        base_arg = base if base is not None else out
        grid = (num_tokens, triton.cdiv(d_out, cfg["BLOCK_N"]))
        bgmv_expand_kernel[grid](
            h, w, base_arg, out, coef_arg, sched.ids, d_out, rank, top_k,
            h.stride(0), *sw, base_arg.stride(0), base_arg.stride(1), out.stride(0), out.stride(1),
            HAS_BASE=base is not None, HAS_COEF=has_coef, **cfg)


def launch_segment_outer(p: torch.Tensor, q: torch.Tensor, g: torch.Tensor, coef: torch.Tensor | None,
                         sched: Schedule, transpose_out: bool = False) -> None:
    """g[a] += sum over adapter a's assignments of coef * p[slot]^T q[token] (g fp32, zeroed by the caller).

    p: [T * k, r] fp32 (h or u); q: [T, width]; g: [K, r, width], or [K, width, r] when `transpose_out` (grad B).
    """
    if sched.token.numel() == 0:
        return
    width = q.shape[1]
    rank = p.shape[1]
    cfg = config_segment_outer(rank, width, q.dtype)
    grid = (sched.chunks.shape[1], triton.cdiv(width, cfg["BLOCK_D"]), triton.cdiv(rank, cfg["BLOCK_R"]))
    segment_outer_kernel[grid](
        p, q, g, coef if coef is not None else p, sched.chunks[0], sched.chunks[1], sched.chunks[2],
        sched.token, sched.slot, width, rank, p.stride(0), q.stride(0), q.stride(1), *_strides(g, transpose_out),
        HAS_COEF=coef is not None, ATOMIC=sched.chunks_atomic, DOT_PRECISION=dot_precision(q.dtype),
        **cfg)


# ---------------------------------------------------------------------------------------------
# Forward / backward and their registration as one differentiable op.
# ---------------------------------------------------------------------------------------------

def _forward_into(x, lora_a, lora_b, base, out, coef, sched: Schedule, sgmv: bool) -> torch.Tensor:
    """out = base + LoRA delta (base may be out, or None); returns h."""
    h = torch.empty(sched.ids.numel(), lora_a.shape[1], dtype=torch.float32, device=x.device)
    launch_shrink(x.to(lora_a.dtype), lora_a, h, sched, sgmv)
    launch_expand(h, lora_b, out, base, coef, sched, sgmv)
    return h


@torch.library.custom_op("moa::multi_lora_fwd", mutates_args=())
def multi_lora_fwd(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, base: torch.Tensor, has_base: bool,
                   coef: torch.Tensor, tables: list[torch.Tensor], meta: list[int], sgmv: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional forward: (y, h), y = base + LoRA delta in a new buffer. Without a base, `has_base` is
    False and `base` an empty placeholder whose dtype is the output's."""
    out = torch.empty(x.shape[0], lora_b.shape[1], dtype=base.dtype, device=x.device)
    h = _forward_into(x, lora_a, lora_b, base if has_base else None, out, coef, Schedule.from_packed(tables, meta), sgmv)
    return out, h


@multi_lora_fwd.register_fake
def _(x, lora_a, lora_b, base, has_base, coef, tables, meta, sgmv):
    out = x.new_empty(x.shape[0], lora_b.shape[1], dtype=base.dtype)
    return out, x.new_empty(tables[0].shape[0], lora_a.shape[1], dtype=torch.float32)


@torch.library.custom_op("moa::multi_lora_add_", mutates_args=("out",))
def multi_lora_add_(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    coef: torch.Tensor, tables: list[torch.Tensor], meta: list[int], sgmv: bool) -> None:
    """In-place forward for inference: out += LoRA delta (no autograd)."""
    _forward_into(x, lora_a, lora_b, out, out, coef, Schedule.from_packed(tables, meta), sgmv)


@multi_lora_add_.register_fake
def _(out, x, lora_a, lora_b, coef, tables, meta, sgmv):
    return None


@torch.library.custom_op("moa::multi_lora_bwd", mutates_args=())
def multi_lora_bwd(grad: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, h: torch.Tensor,
                   coef: torch.Tensor, tables: list[torch.Tensor], meta: list[int], sgmv: bool, need_x: bool,
                   need_coef: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad x, grad A, grad B, grad coef). Grad x and grad coef are empty when not needed."""
    sched = Schedule.from_packed(tables, meta)
    wdt = lora_a.dtype
    xc = x.to(wdt)
    gy = grad.to(wdt)
    u = torch.empty_like(h)
    launch_shrink(gy, lora_b, u, sched, sgmv, transpose=True)
    grad_x = x.new_empty(0)
    if need_x:
        grad_x = torch.empty_like(x)
        launch_expand(u, lora_a, grad_x, None, coef, sched, sgmv, transpose=True)
    grad_a = torch.zeros(lora_a.shape, dtype=torch.float32, device=x.device)
    launch_segment_outer(u, xc, grad_a, coef, sched)
    grad_b = torch.zeros(lora_b.shape, dtype=torch.float32, device=x.device)
    launch_segment_outer(h, gy, grad_b, coef, sched, transpose_out=True)
    grad_coef = coef.new_empty(0)
    if need_coef:
        valid = (sched.ids >= 0)[:, None]
        grad_coef = torch.where(valid, u * h, torch.zeros_like(h[:, :1])).sum(dim=1)
    return grad_x, grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), grad_coef


@multi_lora_bwd.register_fake
def _(grad, x, lora_a, lora_b, h, coef, tables, meta, sgmv, need_x, need_coef):
    grad_x = torch.empty_like(x) if need_x else x.new_empty(0)
    return grad_x, torch.empty_like(lora_a), torch.empty_like(lora_b), torch.empty_like(coef) if need_coef else coef.new_empty(0)


def _setup_context(ctx, inputs, output):
    x, lora_a, lora_b, base, has_base, coef, tables, meta, sgmv = inputs
    _, h = output
    ctx.save_for_backward(x, lora_a, lora_b, h, coef, *tables)
    ctx.has_base, ctx.meta, ctx.sgmv = has_base, meta, sgmv


def _backward(ctx, grad_y, grad_h):
    x, lora_a, lora_b, h, coef, *tables = ctx.saved_tensors
    need_x, need_coef = ctx.needs_input_grad[0], ctx.needs_input_grad[5]
    grad_x, grad_a, grad_b, grad_coef = multi_lora_bwd(grad_y, x, lora_a, lora_b, h, coef, list(tables), ctx.meta,
                                                       ctx.sgmv, need_x, need_coef)
    return (grad_x if need_x else None, grad_a, grad_b, grad_y if ctx.has_base else None, None,
            grad_coef if need_coef else None, [None] * len(tables), None, None)


multi_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The entry point `multi_lora` dispatches to for backend="triton".
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


def check_inputs(x, lora_a, lora_b, plan: AdapterPlan) -> None:
    """What the triton backend needs beyond the shared checks: a device it can run on, one supported dtype for A and B."""
    if not x.is_cuda and not interpreter_active():
        raise RuntimeError(f"backend='triton' needs CUDA tensors, got tensors on {x.device}; to run the kernels on "
                           "CPU tensors set TRITON_INTERPRET=1 before moa.kernels' triton backend is first used")
    for name, t in (("adapter_ids", plan.ids), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all inputs must share a device")
    if lora_a.dtype not in DTYPES:
        raise TypeError(f"lora_a dtype {lora_a.dtype} is not supported by the triton backend: use one of {DTYPES}")
    if lora_b.dtype != lora_a.dtype:
        raise TypeError(f"the triton backend needs one dtype for lora_a and lora_b, got {lora_a.dtype} and {lora_b.dtype}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")


def multi_lora_triton(x, lora_a, lora_b, plan: AdapterPlan, weights=None, scaling=1.0, base_out=None) -> torch.Tensor:
    """`multi_lora` on the Triton kernels, after `multi_lora`'s checks and this backend's own (`check_inputs`).

    When autograd does not track the call and base_out is given, the delta accumulates into base_out
    in place and base_out is returned (inference); otherwise the output is a new tensor.
    """
    check_inputs(x, lora_a, lora_b, plan)
    coef = assignment_coef(plan, weights, scaling)
    tracked = [x, lora_a, lora_b, coef] + ([base_out] if base_out is not None else [])
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tracked)
    if base_out is not None and not needs_grad:
        if plan.num_assignments:
            sched = schedule(plan)
            multi_lora_add_(base_out, x, lora_a, lora_b, coef, sched.tensors(), sched.meta(), use_sgmv(plan))
        return base_out
    if plan.num_assignments == 0:
        return torch.zeros(x.shape[0], lora_b.shape[1], dtype=lora_b.dtype, device=x.device) if base_out is None else base_out.clone()
    sched = schedule(plan)
    base = base_out if base_out is not None else x.new_empty(0, dtype=lora_b.dtype)
    out, _ = multi_lora_fwd(x, lora_a, lora_b, base, base_out is not None, coef, sched.tensors(), sched.meta(), use_sgmv(plan))
    return out
