"""The CPU backend: the native decode kernel against the token-by-token definition, and which calls it serves.

The kernel is compiled here on first use (the machine's C++ compiler); a build failure fails these tests.
"""
import warnings

import pytest
import torch

from moa.kernels import cpu_multi_lora as cml
from moa.kernels import multi_lora, plan_adapters
from moa.kernels.torch_multi_lora import multi_lora_naive


@pytest.fixture(scope="module")
def kernel():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed build warns: fail here instead
        module = cml.native_kernel()
    assert module is not None
    return module


def stored(K, r, d_in, d_out, seed=0):
    """A and B as MoALinear holds them: [K, r, d_in] / [K, d_out, r] views of contiguous A^T / B^T."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(K, d_in, r, generator=g).transpose(1, 2), torch.randn(K, r, d_out, generator=g).transpose(1, 2) * 0.1)


def decode_ids(T, K, none_share, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, K, (T,), generator=g)
    ids[torch.rand(T, generator=g) < none_share] = -1
    return ids


@pytest.mark.parametrize("T,K,r,d_in,d_out,none_share", [
    (32, 10, 16, 64, 96, 0.0),  # a decode step: every row has a culture
    (17, 6, 8, 40, 130, 0.3),  # rows without an adapter; d_out not a multiple of the kernel's 64-wide blocks
    (9, 4, 12, 33, 7, 0.2),  # r not a multiple of 8
    (5, 3, 4, 16, 64, 0.0),  # fewer tokens than a block of 4
    (64, 3, 16, 24, 70, 0.1),  # ~20 tokens per adapter: the torch path would not pad these, the kernel still serves them
])
def test_native_matches_definition(kernel, T, K, r, d_in, d_out, none_share):
    a, b = stored(K, r, d_in, d_out)
    x = torch.randn(T, d_in)
    ids = decode_ids(T, K, none_share)
    plan = plan_adapters(ids, K)
    base = torch.randn(T, d_out)
    want = multi_lora_naive(x.double(), a.double(), b.double(), ids, scaling=1.5, base_out=base.double()).float()
    with torch.no_grad():
        assert cml.decode_shaped(plan, r, d_in, d_out) and cml.native_inputs(x, a.transpose(1, 2), b.transpose(1, 2), base)
        out = base.clone()
        got = multi_lora(x, a, b, plan, scaling=1.5, base_out=out, backend="cpu")
    assert got is out  # accumulated in place
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_auto_runs_the_native_kernel_on_cpu(kernel, monkeypatch):
    a, b = stored(10, 16, 64, 64)
    x, ids = torch.randn(32, 64), decode_ids(32, 10, 0.0)
    calls = []
    monkeypatch.setattr(cml, "native_kernel", lambda: calls.append(1) or kernel)
    with torch.inference_mode():
        got = multi_lora(x, a, b, ids, scaling=2.0)
    assert calls == [1]
    torch.testing.assert_close(got, multi_lora_naive(x, a, b, ids, scaling=2.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["autograd", "float64", "weights", "tensor_scaling", "top2", "long_rows", "many_per_adapter",
                                  "transposed_storage"])
def test_other_calls_take_the_torch_path(case, monkeypatch):
    """Only decode-shaped float32 inference calls reach the kernel; every other call still gives the op's result."""
    K, T = 4, 12
    a, b = stored(K, 4, 16, 8)
    x, ids, weights, scaling = torch.randn(T, 16), decode_ids(T, K, 0.0), None, 0.5
    plan_kw = {}
    if case == "float64":
        a, b, x = a.double(), b.double(), x.double()
    if case == "weights":
        weights = torch.rand(T, 1)
    if case == "tensor_scaling":
        scaling = torch.rand(K) + 0.5
    if case == "top2":
        ids, weights = torch.stack([ids, (ids + 1) % K], 1), torch.rand(T, 2)
    if case == "long_rows":  # prefill under oracle routing: rows of one adapter, the rows layout's case
        ids, plan_kw = ids[:2].repeat_interleave(16), {"row_len": 16}
        x = torch.randn(32, 16)
    if case == "many_per_adapter":  # a learned router's prefill choices: long runs, no row structure
        ids, x = torch.arange(2 * cml.NATIVE_MAX_COUNT + 2) % 2, torch.randn(2 * cml.NATIVE_MAX_COUNT + 2, 16)
    if case == "transposed_storage":
        a, b = a.contiguous(), b.contiguous()
    if case == "autograd":
        a.requires_grad_(True)
    plan = plan_adapters(ids, K, **plan_kw)
    monkeypatch.setattr(cml, "native_kernel", lambda: pytest.fail("the native kernel was asked for"))
    with torch.set_grad_enabled(case == "autograd"):
        got = multi_lora(x, a, b, plan, weights=weights, scaling=scaling, backend="cpu")
    want = multi_lora_naive(x, a, b, ids, weights=weights, scaling=scaling)
    torch.testing.assert_close(got, want)
    if case == "autograd":
        got.sum().backward()
        assert a.grad is not None and a.grad.abs().sum() > 0


def test_without_a_compiler_the_torch_path_serves(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cml, "_native", None)
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: (_ for _ in ()).throw(RuntimeError("no c++ compiler")))
    a, b = stored(10, 16, 64, 64)
    x, ids = torch.randn(32, 64), decode_ids(32, 10, 0.1)
    with pytest.warns(RuntimeWarning, match="could not be built.*no c\\+\\+ compiler"), torch.no_grad():
        got = multi_lora(x, a, b, ids, scaling=2.0, backend="cpu")
    torch.testing.assert_close(got, multi_lora_naive(x, a, b, ids, scaling=2.0))
    assert cml.native_kernel() is None  # the failure is remembered: no second build, no second warning
