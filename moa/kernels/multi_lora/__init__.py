"""`multi_lora`: the LoRA outputs of a batch whose tokens each take their own adapters, on one of several backends.

    y[t] = base_out[t] + sum_j w[t, j] * s[a] * (x[t] A[a]^T) B[a]^T,   a = adapter_ids[t, j], -1 = no adapter

Modules: `naive` (that definition, token by token: the reference of the tests), `plan` (the tokens
grouped by adapter, shared by every projection of a forward call), one module per backend
(`torch_backend`, `native_cpu` with its kernel in `csrc/`, `triton_backend`) and `compile` (the
ahead-of-time compile report of the Triton kernels). This module checks the inputs, builds or reuses
the plan and dispatches. Triton is installed only on Linux: without it `auto` takes the torch backend
for CUDA tensors.
"""
from __future__ import annotations

import importlib.util

from torch import Tensor

from .native_cpu import multi_lora_cpu
from .plan import AdapterPlan, plan_adapters
from .torch_backend import multi_lora_torch

__all__ = ["AdapterPlan", "BACKENDS", "multi_lora", "plan_adapters"]

BACKENDS = ("auto", "torch", "cpu", "triton")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def check_inputs(x, lora_a, lora_b, plan: AdapterPlan, weights, scaling, base_out) -> None:
    """Shapes every backend relies on; each error names the bad value and what was expected."""
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
    if isinstance(scaling, Tensor) and tuple(scaling.shape) != (k,):
        raise ValueError(f"scaling tensor must have shape [{k}], got {tuple(scaling.shape)}")
    if base_out is not None and tuple(base_out.shape) != (x.shape[0], lora_b.shape[1]):
        raise ValueError(f"base_out shape {tuple(base_out.shape)} must be [{x.shape[0]}, {lora_b.shape[1]}]")


def resolve_backend(backend: str, x: Tensor) -> str:
    """"auto" -> "triton" for CUDA tensors ("torch" where triton is not installed), "cpu" otherwise; the
    others as given."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        return ("triton" if HAS_TRITON else "torch") if x.is_cuda else "cpu"
    if backend == "triton" and not HAS_TRITON:
        raise ValueError("backend 'triton' needs the triton package (installed with moa on Linux): "
                         "use backend='torch' or 'auto'")
    return backend


def multi_lora(x, lora_a, lora_b, adapter_ids, weights=None, scaling=1.0, base_out=None, backend="auto"):
    """y[t] = base_out[t] + sum_j w[t, j] * s[a] * (x[t] A[a]^T) B[a]^T with a = adapter_ids[t, j].

    x: [T, d_in]; lora_a: [K, r, d_in]; lora_b: [K, d_out, r]; adapter_ids: int [T] or [T, k]
    (-1 = no adapter), or an `AdapterPlan` built once and shared by many projections;
    weights: float [T, k] or None (all 1); scaling: float or tensor [K]; base_out: [T, d_out] or None.
    Differentiable w.r.t. x, lora_a, lora_b, weights, a scaling tensor and base_out.

    backend: "torch" (pure torch), "cpu" (a native kernel for decode-shaped inference calls on CPU,
    compiled on first use, the torch backend for the rest), "triton" (fused kernels; CUDA tensors, or
    CPU tensors under TRITON_INTERPRET=1) or "auto" (triton for CUDA tensors, or torch where triton is not
    installed; cpu otherwise). On every
    backend, when autograd does not track the call (inference) the result is accumulated into
    `base_out` in place and `base_out` is returned; under autograd the result is a new tensor.
    """
    backend = resolve_backend(backend, x)
    plan = adapter_ids if isinstance(adapter_ids, AdapterPlan) else plan_adapters(adapter_ids, lora_a.shape[0])
    check_inputs(x, lora_a, lora_b, plan, weights, scaling, base_out)
    if backend == "triton":
        from .triton_backend import multi_lora_triton  # imports triton only when this backend is used

        return multi_lora_triton(x, lora_a, lora_b, plan, weights, scaling, base_out)
    if backend == "cpu":
        return multi_lora_cpu(x, lora_a, lora_b, plan, weights, scaling, base_out)
    return multi_lora_torch(x, lora_a, lora_b, plan, weights, scaling, base_out)
