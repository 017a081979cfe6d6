"""Every backend of `multi_lora` against its definition (`moa.kernels.multi_lora.naive`): outputs and every gradient.

Each backend runs in each way it can serve a call: the torch backend in the layout it picks and forced
to the padded and the segmented layout; the cpu backend (its native kernel serves no-grad float32
decode-shaped calls, the torch backend the rest: both are checked, and which one served); the triton
backend on the path it picks and forced onto its SGMV and its BGMV path, under Triton's interpreter
without a GPU (tests/conftest.py sets TRITON_INTERPRET), in bf16 too on a GPU. The reference runs in float64 on the same values. A case's seed derives from its
name (crc32), so a failure reproduces. Also here: what the op checks on every backend, the plan, and a
float64 gradcheck of the torch backend.
"""
from __future__ import annotations

import functools
import importlib
import os
import zlib
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from moa.kernels import AdapterPlan, multi_lora, plan_adapters
from moa.kernels.multi_lora import native_cpu as cpu_backend
from moa.kernels.multi_lora import resolve_backend
from moa.kernels.multi_lora import torch_backend
from moa.kernels.multi_lora.naive import multi_lora_naive

CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if CUDA else "cpu"  # the torch and cpu backends run on CPU tensors


def triton_backend():
    """The Triton backend module; the Triton cases cannot run without CUDA or Triton's interpreter, which
    tests/conftest.py switches on unless TRITON_INTERPRET was already set otherwise: that fails here."""
    from moa.kernels.multi_lora import triton_backend as backend

    if not CUDA and not backend.interpreter_active():
        pytest.fail(f"the Triton kernels need CUDA or TRITON_INTERPRET=1 set before their first import; "
                    f"TRITON_INTERPRET is {os.environ.get('TRITON_INTERPRET')!r}")
    return backend


@dataclass(frozen=True)
class Case:
    name: str
    T: int
    d_in: int
    d_out: int
    K: int
    r: int
    top_k: int = 1
    ids: str = "random"  # "random" (some -1), "every" (one adapter per token, no -1), "none" (all -1), or "rows"
    weights: bool = False
    scaling: float | str = 1.0  # a float, or "tensor" for a per-adapter tensor [K]
    base: bool = True
    stored: bool = True  # A and B as MoALinear holds them: views of contiguous A^T [K, d_in, r] and B^T [K, r, d_out]
    native: bool = False  # the cpu backend's native kernel serves the case's no-grad float32 call
    row_len: int | None = None


CASES = [
    # one token; d_in split in two by the BGMV shrink (atomics); fewer than half the adapters used
    Case("T1", 1, 600, 13, 3, 8, ids="every", scaling=0.5, native=True),
    Case("T7_r1", 7, 20, 13, 4, 1, scaling="tensor", base=False, stored=False),
    Case("T7_top2", 7, 20, 13, 5, 12, top_k=2, weights=True, scaling="tensor", stored=False),
    # a decode step: every token one adapter; d_out over the native kernel's 64-wide blocks
    Case("T33_decode", 33, 35, 70, 6, 16, ids="every", scaling=2.0, native=True),
    Case("T33_K2", 33, 20, 13, 2, 12, scaling=0.5, native=True),
    Case("T33_top2", 33, 20, 13, 3, 4, top_k=2, weights=True, scaling=1.5),
    Case("all_none", 7, 20, 13, 3, 4, top_k=2, ids="none", weights=True, stored=False),
    # prefill under oracle routing: rows of one adapter (one without), the torch backend's rows layout
    Case("rows", 48, 20, 13, 3, 4, ids="rows", weights=True, scaling="tensor", row_len=16),
    Case("empty", 0, 20, 13, 3, 4, stored=False),
]
FAST = ("T7_top2", "T33_decode", "rows")  # run in fp32 without -m slow; every other combination is marked slow
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16}
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}  # max error relative to the reference's scale (>= 1)
VARIANTS = ("torch", "torch-padded", "torch-segmented", "cpu", "triton", "triton-sgmv", "triton-bgmv")


def seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def make_ids(case: Case, gen: torch.Generator) -> torch.Tensor:
    shape = (case.T, case.top_k)
    if case.ids == "none":
        return torch.full(shape, -1)
    if case.ids == "rows":
        rows = torch.arange(case.T // case.row_len) % (case.K + 1) - 1  # -1, 0, 1, ...: one row without an adapter
        return rows.roll(1).repeat_interleave(case.row_len)[:, None]
    ids = torch.randint(0 if case.ids == "every" else -1, case.K, shape, generator=gen)
    for j in range(1, case.top_k):  # top-k picks distinct adapters per token
        clash = (ids[:, :j] == ids[:, j:j + 1]).any(1) & (ids[:, j] >= 0)
        ids[clash, j] = -1
    return ids


@functools.lru_cache(maxsize=None)
def reference(case: Case):
    """(inputs, ids, upstream gradient, output, {input: gradient}) of the case, by the definition in float64.

    `inputs` are the op's keyword arguments, A and B as [K, r, d_in] / [K, d_out, r] views of the
    contiguous A^T / B^T that MoALinear stores; the values make outputs O(1).
    """
    gen = torch.Generator().manual_seed(seed(case.name))
    x = torch.randn(case.T, case.d_in, generator=gen, dtype=torch.float64)
    a_t = torch.randn(case.K, case.d_in, case.r, generator=gen, dtype=torch.float64) * case.d_in ** -0.5
    b_t = torch.randn(case.K, case.r, case.d_out, generator=gen, dtype=torch.float64) * case.r ** -0.5
    ids = make_ids(case, gen)
    ids = ids[:, 0] if case.top_k == 1 else ids
    w = torch.rand(case.T, case.top_k, generator=gen, dtype=torch.float64) if case.weights else None
    s = torch.rand(case.K, generator=gen, dtype=torch.float64) + 0.5 if case.scaling == "tensor" else case.scaling
    base = torch.randn(case.T, case.d_out, generator=gen, dtype=torch.float64) if case.base else None
    grad = torch.randn(case.T, case.d_out, generator=gen, dtype=torch.float64)
    inputs = dict(x=x, lora_a=a_t.transpose(1, 2), lora_b=b_t.transpose(1, 2), weights=w, scaling=s, base_out=base)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    y = multi_lora_naive(adapter_ids=ids, **{**inputs, **leaves})
    grads = torch.autograd.grad(y, list(leaves.values()), grad, allow_unused=True) if case.T else [None] * len(leaves)
    return inputs, ids, grad, y.detach(), dict(zip(leaves, grads))


def params():
    """Every case, dtype and variant, but the triton backend forced onto each of its paths in fp32 only (on
    its own pick in fp16; no fp64: it takes fp32, fp16 and bf16). On a GPU (marked `gpu`) the triton
    backend also runs both paths in fp16 and bf16, which the interpreter mishandles."""
    for case in CASES:
        for dname, dtype in DTYPES.items():
            for variant in VARIANTS:
                if variant.startswith("triton") and (dtype == torch.float64 or (variant == "triton") != (dtype == torch.float16)):
                    continue
                fast = dtype == torch.float32 and case.name in FAST
                yield pytest.param(case, dtype, variant, id=f"{case.name}-{dname}-{variant}",
                                   marks=() if fast else pytest.mark.slow)
        for dname, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            for variant in ("triton-sgmv", "triton-bgmv"):
                yield pytest.param(case, dtype, variant, id=f"{case.name}-{dname}-{variant}-cuda", marks=pytest.mark.gpu)


def close(actual, expected, dtype, what):
    """Max abs error within TOL[dtype] of the reference's scale (at least 1); a missing gradient counts as zeros."""
    if actual is None and expected is None:
        return
    actual = torch.zeros_like(expected) if actual is None else actual.cpu()
    expected = torch.zeros_like(actual, dtype=torch.float64) if expected is None else expected
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if not expected.numel():
        return
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype] * scale:.3g} ({dtype})"


@pytest.fixture
def serve(variant, monkeypatch):
    """Set up `variant`; returns (backend name, the native kernel modules the cpu backend asked for)."""
    native_calls = []
    backend = variant.split("-")[0]
    if variant in ("torch-padded", "torch-segmented"):
        monkeypatch.setattr(torch_backend, "pick_layout", lambda *args: variant.split("-")[1])
    if backend == "cpu":
        build = cpu_backend.native_kernel

        def native_kernel():
            native_calls.append(build())
            return native_calls[-1]

        monkeypatch.setattr(cpu_backend, "native_kernel", native_kernel)
    if backend == "triton":
        kernels = triton_backend()
        if variant != "triton":
            monkeypatch.setattr(kernels, "SGMV_MIN_ROWS", 0 if variant == "triton-sgmv" else 1 << 62)
    return backend, native_calls


@pytest.mark.parametrize("case, dtype, variant", params())
def test_matches_definition(case, dtype, variant, serve):
    backend, native_calls = serve
    inputs, ids, grad, want, want_grads = reference(case)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    plan = plan_adapters(ids.to(device), case.K, row_len=case.row_len)
    args = {k: v.to(device, dtype, copy=True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if not case.stored:
        args["lora_a"], args["lora_b"] = args["lora_a"].contiguous(), args["lora_b"].contiguous()
    native = int(backend == "cpu" and case.native and dtype == torch.float32)

    # inference: accumulated into base_out in place; the native kernel serves the decode-shaped float32 calls
    with torch.no_grad():
        out = args["base_out"].clone() if case.base else None
        y = multi_lora(**{**args, "base_out": out}, adapter_ids=plan, backend=backend)
    assert y.dtype == dtype and (y is out or not case.base)
    close(y, want, dtype, "no-grad output")
    assert len(native_calls) == native and None not in native_calls

    # autograd: every gradient
    leaves = [k for k, v in args.items() if isinstance(v, torch.Tensor)]
    for k in leaves:
        args[k].requires_grad_(True)
    y = multi_lora(**args, adapter_ids=plan, backend=backend)
    close(y, want, dtype, "output")
    assert len(native_calls) == native  # autograd never reaches the native kernel
    if case.T == 0:
        return
    got = torch.autograd.grad(y, [args[k] for k in leaves], grad.to(device, y.dtype), allow_unused=True)
    for name, g in zip(leaves, got):
        close(g, want_grads[name], dtype, f"grad {name}")


@pytest.mark.parametrize("layout", torch_backend.LAYOUTS)
def test_torch_gradcheck(layout, monkeypatch):
    """float64 gradcheck of the torch backend in each layout, every differentiable input at once."""
    monkeypatch.setattr(torch_backend, "pick_layout", lambda *args: layout)
    gen = torch.Generator().manual_seed(seed("gradcheck", layout))
    T, K, r, d_in, d_out = 12, 3, 2, 6, 5
    if layout == "rows":
        ids, top_k = torch.tensor([2, -1, 0, 1]).repeat_interleave(3), 1
        plan = plan_adapters(ids, K, row_len=3)
    else:
        ids, top_k = torch.randint(-1, K, (T, 2), generator=gen), 2
        plan = plan_adapters(ids, K)
    x, a, b, w, base = (torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
                        for shape in ((T, d_in), (K, r, d_in), (K, d_out, r), (T, top_k), (T, d_out)))
    s = (torch.rand(K, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *t: multi_lora(*t[:3], plan, t[3], t[4], t[5], backend="torch"), (x, a, b, w, s, base))


def test_plan_groups_tokens_by_adapter():
    plan = plan_adapters(torch.tensor([2, 0, -1, 2, 1, 0, 2]), 4)
    assert plan.adapters == [0, 1, 2] and plan.counts == [2, 1, 3] and plan.offsets == [0, 2, 3]
    assert plan.sorted_token.tolist() == [1, 5, 4, 0, 3, 6]  # stable within each adapter
    assert plan.sorted_adapter.tolist() == [0, 0, 1, 2, 2, 2]
    top2 = plan_adapters(torch.tensor([[1, 0], [-1, 1]]), 2)
    assert top2.sorted_slot.tolist() == [1, 0, 3] and top2.sorted_token.tolist() == [0, 0, 1] and top2.max_count == 2
    assert isinstance(top2, AdapterPlan)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_a_plan_is_shared_by_every_projection(backend):
    """One plan serves projections of different shapes; each backend derives its data from it once, in its own slot."""
    if backend == "triton":
        triton_backend()
    gen = torch.Generator().manual_seed(seed("shared", backend))
    ids = torch.randint(0, 3, (9,), generator=gen)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    plan = plan_adapters(ids.to(device), 3)
    x = torch.randn(9, 8, generator=gen)
    for d_out, r in ((8, 4), (20, 4), (8, 2)):
        a, b = torch.randn(3, r, 8, generator=gen), torch.randn(3, d_out, r, generator=gen)
        with torch.no_grad():
            y = multi_lora(x.to(device), a.to(device), b.to(device), plan, scaling=0.5, backend=backend)
        close(y, multi_lora_naive(x.double(), a.double(), b.double(), ids, scaling=0.5), torch.float32, f"d_out={d_out}, r={r}")
        if d_out == 8 and r == 4:
            first = dict(plan._cache)
    assert plan._cache == first  # the same objects: built by the first call only
    assert set(plan._cache) == {"triton": {"triton"}, "cpu": {"cpu", "torch"}, "torch": {"torch"}}[backend]


def test_plan_cache_builds_once_per_slot():
    plan = plan_adapters(torch.tensor([0, 1, -1]), 2)
    built = []
    first = plan.cached("x", lambda p: built.append(p) or object())
    assert plan.cached("x", lambda p: built.append(p) or object()) is first and built == [plan]


def test_auto_picks_triton_for_cuda_tensors_and_cpu_otherwise():
    assert resolve_backend("auto", torch.zeros(1)) == "cpu"
    assert resolve_backend("triton", torch.zeros(1)) == "triton"
    if CUDA:
        assert resolve_backend("auto", torch.zeros(1, device="cuda")) == "triton"


def test_without_triton_auto_takes_the_torch_backend_for_cuda_tensors(monkeypatch):
    op = importlib.import_module("moa.kernels.multi_lora")  # the package: moa.kernels.multi_lora is also the function
    cuda_tensor = SimpleNamespace(is_cuda=True)  # stands in for a CUDA tensor on any machine
    assert resolve_backend("auto", cuda_tensor) == ("triton" if op.HAS_TRITON else "torch")
    monkeypatch.setattr(op, "HAS_TRITON", False)  # as on macOS and Windows, where triton is not installed
    assert resolve_backend("auto", cuda_tensor) == "torch" and resolve_backend("auto", torch.zeros(1)) == "cpu"
    with pytest.raises(ValueError, match="backend 'triton' needs the triton package"):
        resolve_backend("triton", torch.zeros(1))


@pytest.mark.parametrize("bad,match", [
    (dict(adapter_ids=torch.tensor([0, 3, 1])), "adapter id 3 out of range: expected -1 \\(no adapter\\) or 0..2"),
    (dict(adapter_ids=torch.tensor([0, -2, 1])), "adapter id -2 out of range"),
    (dict(adapter_ids=torch.tensor([0.0, 1.0, 1.0])), "integer tensor, got dtype torch.float32"),
    (dict(adapter_ids=torch.zeros(3, 1, 1, dtype=torch.long)), r"shape \[T\] or \[T, k\], got \(3, 1, 1\)"),
    (dict(adapter_ids=torch.tensor([0, 1])), "cover 2 tokens but x has 3"),
    (dict(adapter_ids=plan_adapters(torch.tensor([0, 1, 1]), 2)), "plan was built for 2 adapters but lora_a holds 3"),
    (dict(x=torch.randn(3, 7)), "x has d_in=7 but lora_a expects d_in=6"),
    (dict(x=torch.randn(3, 6, 1)), r"x must be \[T, d_in\], got shape \(3, 6, 1\)"),
    (dict(lora_b=torch.randn(3, 5, 4)), r"lora_b shape \(3, 5, 4\) does not fit lora_a \(3, 2, 6\): expected \[3, d_out, 2\]"),
    (dict(weights=torch.ones(3, 2)), r"weights shape \(3, 2\) must match adapter_ids \(3, 1\)"),
    (dict(scaling=torch.ones(2)), r"scaling tensor must have shape \[3\], got \(2,\)"),
    (dict(base_out=torch.randn(3, 4)), r"base_out shape \(3, 4\) must be \[3, 5\]"),
    (dict(backend="cuda"), "unknown backend 'cuda': expected one of"),
])
def test_bad_input_names_the_value(bad, match):
    args = dict(x=torch.randn(3, 6), lora_a=torch.randn(3, 2, 6), lora_b=torch.randn(3, 5, 2), adapter_ids=torch.tensor([0, 2, 1]))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        multi_lora(**args)

