"""The Triton multi-LoRA kernels against the torch reference: outputs and every gradient.

Without CUDA the kernels run on CPU tensors under Triton's interpreter: tests/conftest.py sets
TRITON_INTERPRET before anything imports triton (this module sets it too, for runs that bypass the
conftest). The interpreter mishandles bf16, so bf16 runs only on a GPU.
"""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moa.kernels import multi_lora, multi_lora_sliced, plan_adapters  # noqa: E402
from moa.kernels import triton_multi_lora as tml  # noqa: E402
from moa.kernels.multi_lora import resolve_backend  # noqa: E402
from moa.kernels.torch_multi_lora import multi_lora_torch  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 1e-4, torch.float16: 1.5e-2, torch.bfloat16: 6e-2}  # relative to the largest reference value
PATHS = ["sgmv", "bgmv"]

pytestmark = pytest.mark.skipif(not CUDA and not tml.interpreter_active(),
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before their first import")


def close(actual, expected, dtype, what):
    """Max abs error within TOL[dtype] of the reference's scale (at least 1)."""
    if expected is None:
        assert actual is None or not actual.abs().max() > 0, f"{what}: expected no gradient"
        return
    assert actual is not None, f"{what}: gradient missing"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual.float() - expected.float()).abs().max().item() if expected.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype] * scale:.3g} ({dtype})"


def make_ids(kind, num_tokens, num_adapters, top_k, gen):
    """Unsorted adapter ids: random with some -1, all one adapter, or all -1."""
    if kind == "random":
        ids = torch.randint(-1, num_adapters, (num_tokens, top_k), generator=gen)
    elif kind == "single":
        ids = torch.full((num_tokens, top_k), num_adapters - 1)
        ids[::5] = -1
    else:
        ids = torch.full((num_tokens, top_k), -1)
    if top_k > 1:  # top-k picks distinct adapters per token
        for j in range(1, top_k):
            same = ids[:, j] == ids[:, 0]
            ids[:, j] = torch.where(same & (ids[:, j] >= 0), (ids[:, j] + j) % num_adapters, ids[:, j])
    return ids[:, 0] if top_k == 1 else ids


def make_inputs(T, d_in, d_out, K, r, top_k, ids_kind, weights, scaling, base, dtype, gen):
    """Fresh random inputs; A and B scaled so that outputs are O(1)."""
    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(DEVICE, dtype)

    x = rnd(T, d_in)
    a = rnd(K, r, d_in, s=d_in ** -0.5)
    b = rnd(K, d_out, r, s=r ** -0.5)
    ids = make_ids(ids_kind, T, K, top_k, gen).to(DEVICE)
    w = torch.rand(T, top_k, generator=gen).to(DEVICE, dtype) if weights else None
    if scaling == "tensor":
        s = (torch.rand(K, generator=gen) + 0.5).to(DEVICE, dtype)
    else:
        s = float(scaling)
    base_out = rnd(T, d_out) if base else None
    return x, a, b, ids, w, s, base_out


# (id, T, d_in, d_out, K, r, top_k, ids, weights, scaling, base)
CASES = [
    ("odd_K3_r4", 37, 67, 130, 3, 4, 1, "random", False, 0.5, True),
    ("K10_r16_top2", 29, 67, 130, 10, 16, 2, "random", True, "tensor", True),
    ("K1_r1_nobase", 19, 67, 130, 1, 1, 1, "single", False, 2.0, False),
    ("all_minus_one", 11, 67, 130, 3, 4, 2, "none", True, 1.0, True),
    ("T1_top2", 1, 67, 130, 10, 16, 2, "random", True, "tensor", True),
    ("T0", 0, 67, 130, 3, 4, 1, "random", False, 1.0, True),
    ("split_d_in", 5, 300, 34, 3, 16, 1, "random", False, 0.5, True),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_torch_reference(case, dtype, path):
    _, T, d_in, d_out, K, r, top_k, ids_kind, weights, scaling, base = case
    gen = torch.Generator().manual_seed(hash((case[0], str(dtype), path)) % 2**31)
    x, a, b, ids, w, s, base_out = make_inputs(T, d_in, d_out, K, r, top_k, ids_kind, weights, scaling, base, dtype, gen)
    leaves = [t for t in (x, a, b, w, s if isinstance(s, torch.Tensor) else None, base_out) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    plan = plan_adapters(ids, K)

    y = tml.multi_lora_triton(x, a, b, plan, w, s, base_out, path=path)
    # the reference: the torch path on fp32 copies of the same inputs
    ref_leaves = [t.detach().float().requires_grad_(True) for t in leaves]
    ref = dict(zip([id(t) for t in leaves], ref_leaves))
    r_ = lambda t: ref[id(t)] if t is not None and id(t) in ref else t  # noqa: E731
    base_ref = r_(base_out).clone() if base_out is not None else None  # the torch path accumulates in place
    y_ref = multi_lora_torch(r_(x), r_(a), r_(b), plan, r_(w), r_(s) if isinstance(s, torch.Tensor) else s, base_ref)

    assert y.dtype == (base_out.dtype if base_out is not None else b.dtype)
    close(y, y_ref, dtype, "output")
    if T == 0:
        return
    grad = torch.randn(y.shape, generator=gen).to(DEVICE, y.dtype)
    got = torch.autograd.grad(y, leaves, grad, allow_unused=True)
    want = torch.autograd.grad(y_ref, ref_leaves, grad.float(), allow_unused=True)
    names = [n for n, t in zip(("x", "A", "B", "weights", "scaling", "base_out"),
                               (x, a, b, w, s if isinstance(s, torch.Tensor) else None, base_out)) if t is not None]
    for name, g, g_ref in zip(names, got, want):
        close(g, g_ref, dtype, f"grad {name}")


def test_weight_gradient_chunks_meet_through_atomics(monkeypatch):
    """Adapters longer than one reduction chunk: partial grad A/B sums from several programs add up."""
    monkeypatch.setattr(tml, "CHUNK_ROWS", 16)
    gen = torch.Generator().manual_seed(7)
    x, a, b, ids, w, s, base_out = make_inputs(70, 40, 24, 2, 4, 1, "random", False, 1.0, True, torch.float32, gen)
    plan = plan_adapters(ids, 2)
    assert tml.schedule_for(plan).chunks_atomic
    for t in (x, a, b):
        t.requires_grad_(True)
    y = tml.multi_lora_triton(x, a, b, plan, None, 1.0, base_out, path="sgmv")
    y_ref = multi_lora_torch(x, a, b, plan, None, 1.0, base_out.clone())
    grad = torch.randn(y.shape, generator=gen)
    for name, g, g_ref in zip("xAB", torch.autograd.grad(y, (x, a, b), grad), torch.autograd.grad(y_ref, (x, a, b), grad)):
        close(g, g_ref, torch.float32, f"grad {name}")


@pytest.mark.parametrize("path", PATHS)
def test_launchers_write_every_row_of_poisoned_buffers(path):
    """Shrink fills every valid slot of a NaN buffer; expand writes every output row, base or zeros."""
    gen = torch.Generator().manual_seed(11)
    T, d_in, d_out, K, r, k = 23, 67, 130, 3, 4, 2
    x, a, b, ids, w, s, base_out = make_inputs(T, d_in, d_out, K, r, k, "random", True, 1.0, True, torch.float32, gen)
    ids[3] = -1  # a token with no adapter at all
    plan = plan_adapters(ids, K)
    sched = tml.schedule_for(plan)
    h = torch.full((T * k, 1, r), float("nan"), device=DEVICE)
    tml.launch_shrink(x, [a], h, sched, path == "sgmv")
    flat = ids.reshape(-1)
    valid = flat >= 0
    tokens = torch.arange(T * k, device=DEVICE) // k
    h_ref = torch.einsum("nd,nrd->nr", x[tokens[valid]], a[flat[valid]])
    close(h[valid, 0], h_ref, torch.float32, "h")

    coef = tml.assignment_coef(plan, w, s)
    for base in (base_out, None):
        out = torch.full((T, d_out), float("nan"), device=DEVICE)
        tml.launch_expand(h, [b], out, base, coef, sched, path == "sgmv")
        y_ref = multi_lora_torch(x, a, b, plan, w, s, base.clone() if base is not None else None)
        close(out, y_ref, torch.float32, f"expand ({'base' if base is not None else 'no base'})")
        if base is None:
            assert (out[3] == 0).all()


def test_inference_accumulates_into_base_out_in_place():
    gen = torch.Generator().manual_seed(3)
    x, a, b, ids, w, s, base_out = make_inputs(17, 67, 130, 3, 4, 1, "random", False, 0.5, True, torch.float32, gen)
    expected = multi_lora_torch(x, a, b, plan_adapters(ids, 3), None, 0.5, base_out.clone())
    with torch.no_grad():
        y = multi_lora(x, a, b, ids, scaling=0.5, base_out=base_out, backend="triton")
    assert y.data_ptr() == base_out.data_ptr()
    close(base_out, expected, torch.float32, "base_out after in-place accumulation")


@pytest.mark.parametrize("path", PATHS)
def test_sliced_matches_one_call_per_projection(path):
    """Four projections (two launch groups), different d_out, top-2 weights: outputs and all gradients."""
    gen = torch.Generator().manual_seed(5)
    T, d_in, K, r, k = 21, 67, 3, 4, 2
    d_outs = [130, 34, 34, 67]
    x = torch.randn(T, d_in, generator=gen, requires_grad=True)
    As = [(torch.randn(K, r, d_in, generator=gen) * d_in ** -0.5).requires_grad_(True) for _ in d_outs]
    Bs = [(torch.randn(K, d, r, generator=gen) * r ** -0.5).requires_grad_(True) for d in d_outs]
    bases = [torch.randn(T, d, generator=gen) for d in d_outs]
    bases[2] = None
    ids = make_ids("random", T, K, k, gen)
    w = torch.rand(T, k, generator=gen, requires_grad=True)
    plan = plan_adapters(ids, K)
    ys = tml.multi_lora_triton_sliced(x, As, Bs, plan, w, 0.5, bases, path=path)
    refs = [multi_lora_torch(x, a_, b_, plan, w, 0.5, base.clone() if base is not None else None)
            for a_, b_, base in zip(As, Bs, bases)]
    grads = [torch.randn(y.shape, generator=gen) for y in ys]
    leaves = [x, w, *As, *Bs]
    got = torch.autograd.grad(ys, leaves, grads)
    want = torch.autograd.grad(refs, leaves, grads)
    for i, (y, y_ref) in enumerate(zip(ys, refs)):
        close(y, y_ref, torch.float32, f"output {i}")
    names = ["x", "weights", *[f"A{i}" for i in range(4)], *[f"B{i}" for i in range(4)]]
    for name, g, g_ref in zip(names, got, want):
        close(g, g_ref, torch.float32, f"grad {name}")


def test_public_sliced_api_dispatches_both_backends():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(9, 20, generator=gen)
    As = [torch.randn(2, 4, 20, generator=gen) for _ in range(2)]
    Bs = [torch.randn(2, 18, 4, generator=gen), torch.randn(2, 6, 4, generator=gen)]
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 0])
    torch_ys = multi_lora_sliced(x, As, Bs, ids, backend="torch")
    triton_ys = multi_lora_sliced(x, As, Bs, ids, backend="triton")
    for y, y_ref in zip(triton_ys, torch_ys):
        close(y, y_ref, torch.float32, "sliced output")
    with pytest.raises(ValueError, match="base_outs has 1 entries for 2 slices"):
        multi_lora_sliced(x, As, Bs, ids, base_outs=[None], backend="triton")


def test_path_rule():
    uniform_decode = plan_adapters(torch.arange(64) % 32, 32)  # 2 tokens per adapter
    prefill = plan_adapters(torch.arange(1024) % 4, 4)  # 256 tokens per adapter
    assert not tml.use_sgmv(uniform_decode)
    assert tml.use_sgmv(prefill)
    assert tml.sgmv_block_m(prefill) == 64
    assert tml.sgmv_block_m(plan_adapters(torch.arange(40) % 2, 2)) == 32


def test_auto_dispatch_and_errors(monkeypatch):
    x = torch.randn(4, 8)
    assert resolve_backend("auto", x) == "cpu"
    assert resolve_backend("triton", x) == "triton"
    a, b = torch.randn(2, 4, 8), torch.randn(2, 6, 4)
    ids = torch.tensor([0, 1, -1, 0])
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        multi_lora(x, a, b, ids, backend="cuda")
    with pytest.raises(TypeError, match=r"lora_b\[0\] torch.float16"):
        multi_lora(x, a, b.half(), ids, backend="triton")
    with pytest.raises(ValueError, match="unknown path 'gemm'"):
        tml.multi_lora_triton(x, a, b, plan_adapters(ids, 2), path="gemm")
    with pytest.raises(ValueError, match="adapter id 2 out of range"):
        multi_lora(x, a, b, torch.tensor([0, 2, -1, 0]), backend="triton")
    if not CUDA:
        monkeypatch.setattr(tml, "interpreter_active", lambda: False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            multi_lora(x, a, b, ids, backend="triton")


def test_torch_compile_sees_one_op():
    """Dynamo captures the forward as a single `moa::multi_lora_fwd` node; gradients match eager."""
    gen = torch.Generator().manual_seed(8)
    x, a, b, ids, w, s, base_out = make_inputs(13, 24, 20, 3, 4, 2, "random", True, 0.5, True, torch.float32, gen)
    plan = plan_adapters(ids, 3)
    sched = tml.schedule_for(plan)
    tables, meta = sched.tensors(), sched.meta()

    def fn(x, a, b, coef, base):
        (y,), _ = tml.multi_lora_fwd(x, [a], [b], [base], [True], coef, tables, meta, True)
        return (y * y).sum()

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    coef = tml.assignment_coef(plan, w, s)
    inputs = [t.detach().clone().requires_grad_(True) for t in (x, a, b, coef, base_out)]
    loss = torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    eager_inputs = [t.detach().clone().requires_grad_(True) for t in (x, a, b, coef, base_out)]
    eager_loss = fn(*eager_inputs)
    eager_grads = torch.autograd.grad(eager_loss, eager_inputs)
    ops = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.moa.multi_lora_fwd.default) == 1, ops
    close(loss, eager_loss, torch.float32, "compiled loss")
    for name, g, g_ref in zip(("x", "A", "B", "coef", "base"), grads, eager_grads):
        close(g, g_ref, torch.float32, f"compiled grad {name}")


def test_moa_model_runs_on_the_triton_op():
    """A tiny MoA model with every adapted projection on the triton backend: loss and LoRA grads as torch."""
    import moa
    from moa.layers import MoALinear
    from moa.tiny import tiny_model

    cfg = moa.MoAConfig(cultures=["a", "b", "c"], r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = moa.MoAForCausalLM.from_base(tiny_model(hidden_size=32, intermediate_size=48, num_hidden_layers=1), cfg)
    layers = [m for m in model.modules() if isinstance(m, MoALinear)]
    assert layers
    gen = torch.Generator().manual_seed(9)
    for m in layers:
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.1)
    ids = torch.randint(3, 250, (3, 11), generator=gen)
    cultures = torch.tensor([0, 2, 1])
    results = {}
    for backend in ("torch", "triton"):
        for m in layers:
            m.backend = backend
        model.zero_grad()
        out = model(input_ids=ids, labels=ids, culture_ids=cultures, routing="oracle")
        out.loss.backward()
        results[backend] = (out.logits.detach(), [m.lora_A_T.grad.clone() for m in layers],
                            [m.lora_B_T.grad.clone() for m in layers])
    close(results["triton"][0], results["torch"][0], torch.float32, "logits")
    for i, (g, g_ref) in enumerate(zip(results["triton"][1] + results["triton"][2], results["torch"][1] + results["torch"][2])):
        close(g, g_ref, torch.float32, f"LoRA grad {i}")
