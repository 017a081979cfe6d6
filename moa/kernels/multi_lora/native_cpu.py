"""The cpu backend of `multi_lora`: a native kernel for decode-shaped inference calls, the torch backend otherwise.

A decode step mixes many adapters with a few tokens each. The torch backend runs it as padded `bmm`s
around a gather of x and a read-back of the outputs: on a CPU those temporaries and the ops around
them cost as much as reading the adapters. `csrc/lora_decode.cpp` streams each used adapter's A^T
and B^T once from the stored weights and accumulates every token's LoRA output into its output row,
no temporaries beyond [tokens, r]. It is compiled on first use with the machine's C++ compiler
(`torch.utils.cpp_extension`, about a minute, once) for the machine's own instruction set
(`-march=native`: a TORCH_EXTENSIONS_DIR shared by machines of different CPUs needs one per CPU);
without a compiler the torch backend serves every call, with a warning.

The kernel serves calls autograd does not record, in float32, with one adapter per token, no
per-token weights, a uniform scale and at most `NATIVE_MAX_COUNT` tokens per adapter outside the
rows layout; everything else (prefill's long rows, training, top-k mixes) runs on the torch backend.
Measured on 2 cores at K=10, r=16, hidden 1024, the 28 projections of a 4-layer decode step on
weights coming from memory (ms, native vs torch backend): 1.6 vs 2.4 at 1-2 tokens per adapter,
1.9 vs 3.1 at 3-4, 4.1 vs 4.8 at ~10, 10.5 vs 12.1 at 30.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from .plan import AdapterPlan
from .torch_backend import multi_lora_torch, rows_apply

SOURCE = Path(__file__).with_name("csrc") / "lora_decode.cpp"
# -mprefer-vector-width=512: the compiler otherwise keeps to 256-bit vectors on AVX-512 machines (12% slower here)
COMPILE_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512"]
# at::parallel_for runs its threads only where the extension is compiled with OpenMP, as ATen is:
# without the flag it silently runs on one thread (measured: 28 decode calls 5.8 ms -> 2.9 ms on 2 cores)
OPENMP_FLAGS = ["-fopenmp"] if torch.backends.openmp.is_available() else []
NATIVE_MAX_COUNT = 32  # most tokens of one adapter the kernel takes: beyond, the torch backend's GEMMs are faster
_native = None  # the compiled module, False once building failed
log = logging.getLogger(__name__)


def native_kernel():
    """The compiled decode kernel module, built on first call; None when it cannot be built here."""
    global _native
    if _native is None:
        from torch.utils.cpp_extension import load

        log.info("building the CPU multi-LoRA decode kernel from %s (once per machine)", SOURCE)
        try:
            _native = load(name="moa_lora_decode", sources=[str(SOURCE)], extra_cflags=COMPILE_FLAGS + OPENMP_FLAGS,
                           extra_ldflags=OPENMP_FLAGS, verbose=False)
        except Exception as exc:  # no compiler, no ninja, a failed build: the torch backend stays correct
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            warnings.warn(f"moa: the native CPU multi-LoRA kernel could not be built ({type(exc).__name__}: {reason}); "
                          "decode-shaped CPU calls run on the torch backend", RuntimeWarning, stacklevel=2)
            _native = False
    return _native or None


def decode_shaped(plan: AdapterPlan) -> bool:
    """One adapter per token, at most `NATIVE_MAX_COUNT` tokens per adapter, not the rows layout's case
    (kept in the plan's "cpu" cache slot: every projection of a forward call asks)."""
    return plan.cached("cpu", lambda p: (p.top_k == 1 and 0 < p.num_assignments and p.max_count <= NATIVE_MAX_COUNT
                                         and not rows_apply(p)))


def native_inputs(x, a_t, b_t, out) -> bool:
    """Float32 CPU tensors the kernel reads as they are (A^T, B^T contiguous), autograd not recording."""
    tensors = (x, a_t, b_t, out)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() for t in tensors)


def multi_lora_cpu(x, lora_a, lora_b, plan: AdapterPlan, weights=None, scaling=1.0, base_out=None):
    """`multi_lora` on CPU, inputs already checked: the native kernel where it applies, else `multi_lora_torch`."""
    out = base_out if base_out is not None else x.new_zeros(x.shape[0], lora_b.shape[1], dtype=lora_b.dtype)
    if weights is None and not isinstance(scaling, torch.Tensor) and decode_shaped(plan):
        a_t, b_t = lora_a.transpose(1, 2), lora_b.transpose(1, 2)  # the stored orientation the kernel reads
        kernel = native_kernel() if native_inputs(x, a_t, b_t, out) else None
        if kernel is not None:
            kernel.lora_decode(x, a_t, b_t, plan.sorted_token, plan.adapters, plan.offsets, plan.counts, float(scaling), out)
            return out
    return multi_lora_torch(x, lora_a, lora_b, plan, weights, scaling, out)
