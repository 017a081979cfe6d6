"""The definition of `multi_lora`, token by token: slow and plainly correct, the reference every backend is tested against."""
from __future__ import annotations

import torch


def multi_lora_naive(x, lora_a, lora_b, adapter_ids, weights=None, scaling=1.0, base_out=None):
    """y[t] = base_out[t] + sum_j w[t, j] * s[a] * (x[t] A[a]^T) B[a]^T with a = adapter_ids[t, j] (-1: no adapter).

    Arguments as `multi_lora` takes them, `adapter_ids` a tensor [T] or [T, k]; differentiable in every
    float input. Returns a new tensor in lora_b's dtype, or in base_out's when it is given.
    """
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
