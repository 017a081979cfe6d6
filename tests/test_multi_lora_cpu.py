"""The cpu backend's own parts: which calls its native kernel serves, `auto` reaching it, and the torch
backend serving every call when the kernel cannot be built. Its outputs against the definition, through
the kernel and through the torch backend, are in test_multi_lora.py.

The kernel is compiled here on first use (the machine's C++ compiler); a build failure fails these tests.
"""
import warnings

import pytest
import torch

from moa.kernels import multi_lora
from moa.kernels.multi_lora import native_cpu as cpu_backend
from moa.kernels.multi_lora.naive import multi_lora_naive


@pytest.fixture(scope="module")
def kernel():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed build warns: fail here instead
        module = cpu_backend.native_kernel()
    assert module is not None
    return module


def stored(K, r, d_in, d_out, seed=0):
    """A and B as MoALinear holds them: [K, r, d_in] / [K, d_out, r] views of contiguous A^T / B^T."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K, d_in, r, generator=g).transpose(1, 2), torch.randn(K, r, d_out, generator=g).transpose(1, 2) * 0.1


def test_auto_runs_the_native_kernel_on_cpu(kernel, monkeypatch):
    a, b = stored(10, 16, 64, 64)
    x, ids = torch.randn(32, 64), torch.arange(32) % 10
    calls = []
    monkeypatch.setattr(cpu_backend, "native_kernel", lambda: calls.append(1) or kernel)
    with torch.inference_mode():
        got = multi_lora(x, a, b, ids, scaling=2.0)
    assert calls == [1]
    torch.testing.assert_close(got, multi_lora_naive(x, a, b, ids, scaling=2.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens, served", [(cpu_backend.NATIVE_MAX_COUNT, True), (cpu_backend.NATIVE_MAX_COUNT + 1, False)])
def test_native_kernel_takes_at_most_native_max_count_tokens_per_adapter(kernel, monkeypatch, tokens, served):
    """Beyond NATIVE_MAX_COUNT tokens of one adapter (a learned router's prefill choices) the torch backend's GEMMs serve."""
    a, b = stored(2, 4, 16, 8)
    x, ids = torch.randn(2 * tokens, 16), torch.arange(2 * tokens) % 2
    calls = []
    monkeypatch.setattr(cpu_backend, "native_kernel", lambda: calls.append(1) or kernel)
    with torch.no_grad():
        got = multi_lora(x, a, b, ids, scaling=0.5, backend="cpu")
    assert bool(calls) == served
    torch.testing.assert_close(got, multi_lora_naive(x, a, b, ids, scaling=0.5), rtol=1e-5, atol=1e-5)


def test_native_kernel_reads_only_the_stored_orientation(monkeypatch):
    """A and B passed as contiguous [K, r, d_in] / [K, d_out, r] (not views of A^T / B^T): the torch backend serves."""
    a, b = (t.contiguous() for t in stored(3, 4, 16, 8))
    x, ids = torch.randn(6, 16), torch.tensor([0, 1, 2, 2, 1, 0])
    monkeypatch.setattr(cpu_backend, "native_kernel", lambda: pytest.fail("the native kernel was asked for"))
    with torch.no_grad():
        got = multi_lora(x, a, b, ids, scaling=0.5, backend="cpu")
    torch.testing.assert_close(got, multi_lora_naive(x, a, b, ids, scaling=0.5))


def test_without_a_compiler_the_torch_backend_serves(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpu_backend, "_native", None)
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: (_ for _ in ()).throw(RuntimeError("no c++ compiler")))
    a, b = stored(10, 16, 64, 64)
    x, ids = torch.randn(32, 64), torch.arange(32) % 10
    with pytest.warns(RuntimeWarning, match="could not be built.*no c\\+\\+ compiler"), torch.no_grad():
        got = multi_lora(x, a, b, ids, scaling=2.0, backend="cpu")
    torch.testing.assert_close(got, multi_lora_naive(x, a, b, ids, scaling=2.0))
    assert cpu_backend.native_kernel() is None  # the failure is remembered: no second build, no second warning
