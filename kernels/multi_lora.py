"""`multi_lora`: the public op. Validates its inputs, builds or reuses the plan, dispatches a backend."""
from __future__ import annotations

import torch

from .cpu_multi_lora import multi_lora_cpu
from .plan import AdapterPlan, plan_adapters
from .torch_multi_lora import multi_lora_torch

BACKENDS = ("auto", "torch", "cpu", "triton")
_HOST_BACKENDS = {"torch": multi_lora_torch, "cpu": multi_lora_cpu}  # the backends that run without Triton


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


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """"auto" -> "triton" for CUDA tensors, "cpu" otherwise; the others as given."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if x.is_cuda else "cpu"
    return backend


def multi_lora(x, lora_a, lora_b, adapter_ids, weights=None, scaling=1.0, base_out=None, backend="auto"):
    """y[t] = base_out[t] + sum_j w[t, j] * s[a] * (x[t] A[a]^T) B[a]^T with a = adapter_ids[t, j].

    x: [T, d_in]; lora_a: [K, r, d_in]; lora_b: [K, d_out, r]; adapter_ids: int [T] or [T, k]
    (-1 = no adapter), or an `AdapterPlan` built once and shared by many projections;
    weights: float [T, k] or None (all 1); scaling: float or tensor [K]; base_out: [T, d_out] or None.
    Differentiable w.r.t. x, lora_a, lora_b and weights.

    backend: "torch" (pure torch), "cpu" (a native kernel for decode-shaped inference calls on CPU,
    compiled on first use, the torch path for the rest), "triton" (fused kernels; CUDA tensors, or CPU
    tensors under TRITON_INTERPRET=1) or "auto" (triton for CUDA tensors, cpu otherwise). On every
    backend, when autograd does not track the call (inference) the result is accumulated into
    `base_out` in place and `base_out` is returned; under autograd the result is a new tensor.
    """
    backend = resolve_backend(backend, x)
    plan = adapter_ids if isinstance(adapter_ids, AdapterPlan) else plan_adapters(adapter_ids, lora_a.shape[0])
    _check(x, lora_a, lora_b, plan, weights, scaling, base_out)
    if backend == "triton":
        from .triton_multi_lora import multi_lora_triton  # imports triton only when this backend is used

        return multi_lora_triton(x, lora_a, lora_b, plan, weights, scaling, base_out)
    return _HOST_BACKENDS[backend](x, lora_a, lora_b, plan, weights, scaling, base_out)


def multi_lora_sliced(x, lora_a, lora_b, adapter_ids, weights=None, scaling=1.0, base_outs=None, backend="auto"):
    """`multi_lora` for several projections that share the input x (q/k/v, gate/up), one list entry each.

    lora_a: list of [K, r, d_in] (one shape for all); lora_b: list of [K, d_out_s, r]; base_outs: None
    or a list (entries may be None). The routing (ids, weights, scaling) is shared by every slice.
    Returns a list of [T, d_out_s] outputs. On the triton backend the shrink of all slices is one
    launch reading x once, and so is grad x in the backward.
    """
    if not isinstance(lora_a, (list, tuple)) or not isinstance(lora_b, (list, tuple)):
        raise TypeError(f"lora_a and lora_b must be lists of tensors, got {type(lora_a).__name__} and {type(lora_b).__name__}")
    if len(lora_a) != len(lora_b) or not lora_a:
        raise ValueError(f"lora_a and lora_b must be non-empty lists of one length, got {len(lora_a)} and {len(lora_b)}")
    bases = list(base_outs) if base_outs is not None else [None] * len(lora_a)
    if len(bases) != len(lora_a):
        raise ValueError(f"base_outs has {len(bases)} entries for {len(lora_a)} slices")
    backend = resolve_backend(backend, x)
    plan = adapter_ids if isinstance(adapter_ids, AdapterPlan) else plan_adapters(adapter_ids, lora_a[0].shape[0])
    for i, (a, b, base) in enumerate(zip(lora_a, lora_b, bases)):
        if a.shape != lora_a[0].shape:
            raise ValueError(f"lora_a[{i}] has shape {tuple(a.shape)} but lora_a[0] has {tuple(lora_a[0].shape)}: slices share K, r, d_in")
        _check(x, a, b, plan, weights, scaling, base)
    if backend == "triton":
        from .triton_multi_lora import multi_lora_triton_sliced

        return multi_lora_triton_sliced(x, list(lora_a), list(lora_b), plan, weights, scaling, bases)
    return [_HOST_BACKENDS[backend](x, a, b, plan, weights, scaling, base) for a, b, base in zip(lora_a, lora_b, bases)]
