"""The CPU path of `multi_lora`: a native kernel for decode-shaped inference calls, the torch path otherwise.

A decode step mixes many adapters with a few tokens each. The torch path runs it as padded `bmm`s
around a gather of x and a read-back of the outputs: on a CPU those temporaries and the ops around
them cost as much as reading the adapters. `csrc/lora_decode.cpp` streams each used adapter's A^T
and B^T once from the stored weights and accumulates every token's LoRA output into its output row,
no temporaries beyond [tokens, r]. It is compiled on first use with the machine's C++ compiler
(`torch.utils.cpp_extension`, cached under TORCH_EXTENSIONS_DIR, about a minute once) for the
machine's own instruction set; without a compiler the torch path serves every call, with a warning.

The kernel serves calls autograd does not record, in float32, with one adapter per token, no
per-token weights, a uniform scale and at most `NATIVE_MAX_COUNT` tokens per adapter outside the
rows layout (measured: as fast or faster than the torch path up to ~32 tokens per adapter at
K=10, r=16, hidden 1024, 2-3x faster at a decode step's 3); everything else (prefill's long rows,
training, top-k mixes) runs on the torch path.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from .plan import AdapterPlan
from .torch_multi_lora import multi_lora_torch, pick_layout

SOURCE = Path(__file__).with_name("csrc") / "lora_decode.cpp"
NATIVE_MAX_COUNT = 32  # most tokens of one adapter the kernel takes: beyond, the torch path's GEMMs are faster
_native = None  # the compiled module, False once building failed
log = logging.getLogger(__name__)


def native_kernel():
    """The compiled decode kernel module, built on first call; None when it cannot be built here."""
    global _native
    if _native is None:
        from torch.utils.cpp_extension import load

        log.info("building the CPU multi-LoRA decode kernel from %s (once per machine)", SOURCE)
        try:
            _native = load(name="moa_lora_decode", sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native"], verbose=False)
        except Exception as exc:  # no compiler, no ninja, a failed build: the torch path stays correct
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            warnings.warn(f"moa: the native CPU multi-LoRA kernel could not be built ({type(exc).__name__}: {reason}); "
                          "decode-shaped CPU calls run on the torch path", RuntimeWarning, stacklevel=2)
            _native = False
    return _native or None


def native_applies(x, lora_a, lora_b, plan: AdapterPlan, weights, scaling, out) -> bool:
    """Whether the native kernel serves this call (see the module docstring)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, lora_a, lora_b, out)):
        return False
    tensors = (x, lora_a, lora_b, out)
    if weights is not None or isinstance(scaling, torch.Tensor) or plan.top_k != 1 or plan.num_assignments == 0:
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    stored = lora_a.transpose(1, 2).is_contiguous() and lora_b.transpose(1, 2).is_contiguous()
    few = plan.max_count <= NATIVE_MAX_COUNT and pick_layout(plan, lora_a.shape[1], lora_a.shape[2], lora_b.shape[1]) != "rows"
    return stored and x.is_contiguous() and out.is_contiguous() and few


def multi_lora_cpu(x, lora_a, lora_b, plan: AdapterPlan, weights=None, scaling=1.0, base_out=None):
    """`multi_lora` on CPU: the native kernel where it applies, else `multi_lora_torch`."""
    out = base_out if base_out is not None else x.new_zeros(x.shape[0], lora_b.shape[1], dtype=lora_b.dtype)
    if native_applies(x, lora_a, lora_b, plan, weights, scaling, out):
        kernel = native_kernel()
        if kernel is not None:
            kernel.lora_decode(x, lora_a.transpose(1, 2), lora_b.transpose(1, 2), plan.sorted_token, plan.adapters,
                               plan.offsets, plan.counts, float(scaling), out)
            return out
    return multi_lora_torch(x, lora_a, lora_b, plan, weights, scaling, out)
