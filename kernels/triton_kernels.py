"""Triton kernels of the multi-LoRA op (forward and backward). Launchers live in `triton_multi_lora`.

Notation: T tokens, k routing slots per token, slot `t * k + j`, K adapters of rank r.
`h[slot, s, :]` is the fp32 LoRA activation of slice s (one slice per projection sharing the
input, e.g. q/k/v). A weight operand `W` is addressed as `W[a, i, d]` through three strides, so the
same kernel reads `A[a]` ([r, d_in]), `B[a]` ([d_out, r]) or either one transposed.

SGMV kernels (many tokens per adapter) walk a tile list: tile i covers rows `start[i]:end[i]` of a
token order grouped by adapter, all of adapter `adapter[i]`, so each tile is one small matmul on
tensor cores. BGMV kernels (decode: few tokens per adapter) give every slot or token its own
program and use vector FMAs; a slot with id -1 returns before loading anything.

All accumulation is fp32; activations are read in the weights' dtype (fp32, fp16 or bf16).
Under TRITON_INTERPRET=1 the variable must be set before `triton` is first imported (Triton's own
library functions such as `tl.sum` are defined at that import); tests/conftest.py does so.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pick(pid, w0, w1, w2):
    """The weight pointer of slice `pid` (at most three slices per launch)."""
    if pid == 0:
        w = w0
    elif pid == 1:
        w = w1
    else:
        w = w2
    return w


@triton.jit
def sgmv_shrink_kernel(
    x_ptr, w0_ptr, w1_ptr, w2_ptr, h_ptr,
    tile_adapter_ptr, tile_start_ptr, tile_end_ptr, token_ptr, slot_ptr,
    d_in, rank,
    stride_xt, stride_xd,
    stride_wk, stride_wr, stride_wd,
    stride_hn, stride_hs,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """h[slot, s, r0:r0+BLOCK_R] = x[token] @ W_s[a, r0:r0+BLOCK_R, :]^T for the rows of one tile.

    Grid: (tiles, slices, rank blocks).
    """
    tile = tl.program_id(0)
    sl = tl.program_id(1)
    r0 = tl.program_id(2) * BLOCK_R
    w_ptr = _pick(sl, w0_ptr, w1_ptr, w2_ptr)
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
    h_out = h_ptr + slots[:, None] * stride_hn + sl * stride_hs + offs_r[None, :]
    tl.store(h_out, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def sgmv_expand_kernel(
    h_ptr, w0_ptr, w1_ptr, w2_ptr, out_ptr, coef_ptr,
    tile_adapter_ptr, tile_start_ptr, tile_end_ptr, token_ptr, slot_ptr,
    d_out, rank,
    stride_hn, stride_hs,
    stride_wk, stride_wn, stride_wr,
    stride_ot, stride_od,
    NUM_SLICES: tl.constexpr, HAS_COEF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[token, n] += sum_s coef[slot] * h[slot, s, :] @ W_s[a, n, :]^T for the rows of one tile.

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
    for s in tl.static_range(NUM_SLICES):
        w_ptr = _pick(s, w0_ptr, w1_ptr, w2_ptr)
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + offs_r
            mask_r = rr < rank
            ht = tl.load(h_ptr + slots[:, None] * stride_hn + s * stride_hs + rr[None, :],
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
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
    x_ptr, w0_ptr, w1_ptr, w2_ptr, h_ptr, ids_ptr,
    d_in, rank, top_k, split_len,
    stride_xt, stride_xd,
    stride_wk, stride_wr, stride_wd,
    stride_hn, stride_hs,
    ATOMIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h[slot, s, :] (+)= x[slot // k, part] @ W_s[ids[slot], :, part]^T over one d_in part.

    `d_in` is split into parts of `split_len` (a multiple of BLOCK_K); with more than one part the
    partial sums meet in `h` through atomics. Grid: (T * k, slices, parts).
    """
    slot = tl.program_id(0)
    sl = tl.program_id(1)
    adapter = tl.load(ids_ptr + slot)
    if adapter >= 0:
        w_ptr = _pick(sl, w0_ptr, w1_ptr, w2_ptr)
        token = (slot // top_k).to(tl.int64)
        k_begin = tl.program_id(2) * split_len
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
        h_out = h_ptr + slot.to(tl.int64) * stride_hn + sl * stride_hs + offs_r
        if ATOMIC:
            tl.atomic_add(h_out, acc, mask=mask_r)
        else:
            tl.store(h_out, acc, mask=mask_r)


@triton.jit
def bgmv_expand_kernel(
    h_ptr, w0_ptr, w1_ptr, w2_ptr, base_ptr, out_ptr, coef_ptr, ids_ptr,
    d_out, rank, top_k,
    stride_hn, stride_hs,
    stride_wk, stride_wn, stride_wr,
    stride_bt, stride_bd, stride_ot, stride_od,
    NUM_SLICES: tl.constexpr, HAS_BASE: tl.constexpr, HAS_COEF: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[t, n] = base[t, n] + sum_j sum_s coef[t*k+j] * h[t*k+j, s, :] @ W_s[ids[t*k+j], n, :]^T.

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
            for s in tl.static_range(NUM_SLICES):
                w_ptr = _pick(s, w0_ptr, w1_ptr, w2_ptr)
                hv = tl.load(h_ptr + slot * stride_hn + s * stride_hs + offs_r, mask=mask_r, other=0.0)
                if HAS_COEF:
                    hv = hv * tl.load(coef_ptr + slot)
                wt = tl.load(w_ptr + adapter.to(tl.int64) * stride_wk + offs_n[:, None] * stride_wn
                             + offs_r[None, :] * stride_wr, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
                acc += tl.sum(wt.to(tl.float32) * hv[None, :], axis=1)
    tl.store(out_ptr + token * stride_ot + offs_n * stride_od, acc.to(out_ptr.dtype.element_ty), mask=mask_n)
