"""`multi_lora`: the public op. Validates its inputs, builds or reuses the plan, dispatches a backend."""
from __future__ import annotations

import torch

from .plan import AdapterPlan, plan_adapters
from .torch_multi_lora import multi_lora_torch

BACKENDS = ("auto", "torch", "triton")


def _check(x, lora_a, lora_b, plan: AdapterPlan, weights, scaling, base_out):
    if x.dim() != 2:
        raise ValueError(f"x must be [T, d_in], got shape {tuple(x.shape)}")
    if lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError(f"lora_a must be [K, r, d_in] and lora_b [K, d_out, r], got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    k, r, d_in = lora_a.shape
    if lora_b.shape[0] != k or lora_b.shape[2] != r:
        raise ValueError(f"lora_b shape {tuple(lora_b.shape)} does not fit lora_a {tuple(lora_a.shape)}: expected [{k}, d_out, {r}]")
    if x.shape[1] != d_in:
        raise ValueError(f"x has d_in={x.shape[1]} but lora_a expects d_in={d_in}")
    if plan.num_tokens != x.shape[0]:
        raise ValueError(f"adapter_ids cover {plan.num_tokens} tokens but x has {x.shape[0]}")
    if plan.num_adapters != k:
        raise ValueError(f"plan was built for {plan.num_adapters} adapters but lora_a holds {k}")
    if weights is not None and tuple(weights.shape) != tuple(plan.ids.shape):
        raise ValueError(f"weights shape {tuple(weights.shape)} must match adapter_ids {tuple(plan.ids.shape)}")
    if isinstance(scaling, torch.Tensor) and tuple(scaling.shape) != (k,):
        raise ValueError(f"scaling tensor must have shape [{k}], got {tuple(scaling.shape)}")
    if base_out is not None and tuple(base_out.shape) != (x.shape[0], lora_b.shape[1]):
        raise ValueError(f"base_out shape {tuple(base_out.shape)} must be [{x.shape[0]}, {lora_b.shape[1]}]")


def multi_lora(x, lora_a, lora_b, adapter_ids, weights=None, scaling=1.0, base_out=None, backend="auto"):
    """y[t] = base_out[t] + sum_j w[t, j] * s[a] * (x[t] A[a]^T) B[a]^T with a = adapter_ids[t, j].

    x: [T, d_in]; lora_a: [K, r, d_in]; lora_b: [K, d_out, r]; adapter_ids: int [T] or [T, k]
    (-1 = no adapter), or an `AdapterPlan` built once and shared by many projections;
    weights: float [T, k] or None (all 1); scaling: float or tensor [K]; base_out: [T, d_out] or None.
    Differentiable w.r.t. x, lora_a, lora_b and weights.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    plan = adapter_ids if isinstance(adapter_ids, AdapterPlan) else plan_adapters(adapter_ids, lora_a.shape[0])
    _check(x, lora_a, lora_b, plan, weights, scaling, base_out)
    if backend == "triton":
        raise RuntimeError("backend='triton' is not available in this build: use backend='torch' or 'auto'")
    return multi_lora_torch(x, lora_a, lora_b, plan, weights, scaling, base_out)
