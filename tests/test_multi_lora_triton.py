"""The triton backend's own parts: launchers, the schedule and the path rule, its input errors, the op as
torch.compile sees it, and a model running on it. Its outputs and gradients against the definition are
in test_multi_lora.py.

Without CUDA the kernels run on CPU tensors under Triton's interpreter: tests/conftest.py sets
TRITON_INTERPRET before anything imports triton (this module sets it too, for runs that bypass the
conftest).
"""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moa.kernels import multi_lora, plan_adapters  # noqa: E402
from moa.kernels.multi_lora import triton_backend  # noqa: E402
from moa.kernels.multi_lora.naive import multi_lora_naive  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"

pytestmark = pytest.mark.skipif(not CUDA and not triton_backend.interpreter_active(),
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before their first import")


def close(actual, expected, what, tol=1e-4):
    """Max abs error within `tol` of the reference's scale (at least 1)."""
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double().cpu() - expected.double().cpu()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


def inputs(T, d_in, d_out, K, r, top_k, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=gen)
    a = torch.randn(K, r, d_in, generator=gen) * d_in ** -0.5
    b = torch.randn(K, d_out, r, generator=gen) * r ** -0.5
    ids = torch.randint(-1, K, (T, top_k), generator=gen)
    w = torch.rand(T, top_k, generator=gen)
    base = torch.randn(T, d_out, generator=gen)
    return [t.to(DEVICE) for t in (x, a, b, ids, w, base)]


def test_weight_gradient_chunks_meet_through_atomics(monkeypatch):
    """Adapters longer than one reduction chunk: partial grad A/B sums from several programs add up."""
    monkeypatch.setattr(triton_backend, "CHUNK_ROWS", 16)
    x, a, b, ids, _, base = inputs(70, 40, 24, 2, 4, 1, seed=7)
    plan = plan_adapters(ids, 2)
    assert triton_backend.schedule(plan).chunks_atomic and triton_backend.use_sgmv(plan)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
    y = multi_lora(*leaves, plan, base_out=base, backend="triton")
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    ref = [t.double().requires_grad_(True) for t in (x, a, b)]
    want = torch.autograd.grad(multi_lora_naive(*ref, ids, base_out=base.double()), ref, grad.double())
    for name, g, g_ref in zip("xAB", torch.autograd.grad(y, leaves, grad), want):
        close(g, g_ref, f"grad {name}")


@pytest.mark.parametrize("sgmv", [True, False], ids=["sgmv", "bgmv"])
def test_launchers_write_every_row_of_poisoned_buffers(sgmv):
    """Shrink fills every valid slot of a NaN buffer; expand writes every output row, base or zeros."""
    T, d_in, d_out, K, r, k = 23, 67, 130, 3, 4, 2
    x, a, b, ids, w, base = inputs(T, d_in, d_out, K, r, k, seed=11)
    ids[3] = -1  # a token with no adapter at all
    plan = plan_adapters(ids, K)
    sched = triton_backend.schedule(plan)
    h = torch.full((T * k, r), float("nan"), device=DEVICE)
    triton_backend.launch_shrink(x, a, h, sched, sgmv)
    flat = ids.reshape(-1)
    valid = flat >= 0
    tokens = torch.arange(T * k, device=DEVICE) // k
    close(h[valid], torch.einsum("nd,nrd->nr", x[tokens[valid]], a[flat[valid]]), "h")

    coef = triton_backend.assignment_coef(plan, w, 0.5)
    for given in (base, None):
        out = torch.full((T, d_out), float("nan"), device=DEVICE)
        triton_backend.launch_expand(h, b, out, given, coef, sched, sgmv)
        want = multi_lora_naive(x.double(), a.double(), b.double(), ids, w.double(), 0.5,
                                given.double() if given is not None else None)
        close(out, want, f"expand ({'base' if given is not None else 'no base'})")
        if given is None:
            assert (out[3] == 0).all()


def test_path_rule():
    uniform_decode = plan_adapters(torch.arange(64) % 32, 32)  # 2 tokens per adapter
    prefill = plan_adapters(torch.arange(1024) % 4, 4)  # 256 tokens per adapter
    assert not triton_backend.use_sgmv(uniform_decode)
    assert triton_backend.use_sgmv(prefill)
    assert triton_backend.sgmv_block_m(prefill) == 64
    assert triton_backend.sgmv_block_m(plan_adapters(torch.arange(40) % 2, 2)) == 32


def test_errors_name_the_bad_value(monkeypatch):
    x, a, b, ids = torch.randn(4, 8), torch.randn(2, 4, 8), torch.randn(2, 6, 4), torch.tensor([0, 1, -1, 0])
    with pytest.raises(TypeError, match="one dtype for lora_a and lora_b, got torch.float32 and torch.float16"):
        multi_lora(x.to(DEVICE), a.to(DEVICE), b.half().to(DEVICE), ids.to(DEVICE), backend="triton")
    with pytest.raises(TypeError, match="lora_a dtype torch.float64 is not supported by the triton backend"):
        multi_lora(x.double().to(DEVICE), a.double().to(DEVICE), b.double().to(DEVICE), ids.to(DEVICE), backend="triton")
    if not CUDA:
        monkeypatch.setattr(triton_backend, "interpreter_active", lambda: False)
        with pytest.raises(RuntimeError, match="needs CUDA tensors, got tensors on cpu.*TRITON_INTERPRET=1"):
            multi_lora(x, a, b, ids, backend="triton")


@pytest.mark.slow
def test_torch_compile_sees_one_op():
    """Dynamo captures the forward as a single `moa::multi_lora_fwd` node; gradients match eager."""
    x, a, b, ids, w, base = inputs(13, 24, 20, 3, 4, 2, seed=8)
    plan = plan_adapters(ids, 3)
    sched = triton_backend.schedule(plan)
    tables, meta = sched.tensors(), sched.meta()

    def fn(x, a, b, coef, base):
        y, _ = triton_backend.multi_lora_fwd(x, a, b, base, True, coef, tables, meta, True)
        return (y * y).sum()

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    coef = triton_backend.assignment_coef(plan, w, 0.5)
    compiled = [t.detach().clone().requires_grad_(True) for t in (x, a, b, coef, base)]
    loss = torch.compile(fn, backend=backend, fullgraph=True)(*compiled)
    grads = torch.autograd.grad(loss, compiled)
    eager = [t.detach().clone().requires_grad_(True) for t in (x, a, b, coef, base)]
    eager_loss = fn(*eager)
    eager_grads = torch.autograd.grad(eager_loss, eager)
    ops = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.moa.multi_lora_fwd.default) == 1, ops
    close(loss, eager_loss, "compiled loss")
    for name, g, g_ref in zip(("x", "A", "B", "coef", "base"), grads, eager_grads):
        close(g, g_ref, f"compiled grad {name}")


@pytest.mark.slow
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
    close(results["triton"][0], results["torch"][0], "logits")
    for i, (g, g_ref) in enumerate(zip(results["triton"][1] + results["triton"][2], results["torch"][1] + results["torch"][2])):
        close(g, g_ref, f"LoRA grad {i}")
