"""The torch multi-LoRA op against its token-by-token definition, gradients by gradcheck, bad input."""
import pytest
import torch

from moa.kernels import multi_lora, plan_adapters
from moa.kernels import torch_multi_lora as tml
from moa.kernels.torch_multi_lora import multi_lora_naive


def make_inputs(T, K, r, d_in, d_out, k=1, dtype=torch.float64, none_share=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g, dtype=dtype)
    a = torch.randn(K, r, d_in, generator=g, dtype=dtype)
    b = torch.randn(K, d_out, r, generator=g, dtype=dtype)
    ids = torch.randint(0, K, (T, k), generator=g)
    ids[torch.rand(T, k, generator=g) < none_share] = -1
    w = torch.rand(T, k, generator=g, dtype=dtype)
    base = torch.randn(T, d_out, generator=g, dtype=dtype)
    scaling = torch.rand(K, generator=g, dtype=dtype) + 0.5
    return x, a, b, ids, w, base, scaling


@pytest.fixture(params=tml.LAYOUTS)
def layout(request, monkeypatch):
    """Force one layout; "rows" applies only to plans whose rows each take one adapter (others keep the pick)."""
    pick = tml.pick_layout
    monkeypatch.setattr(tml, "pick_layout", lambda plan, *args: request.param if request.param != "rows" or plan.row_adapters is not None
                        else pick(plan, *args))
    return request.param


@pytest.mark.parametrize("T,K,r,d_in,d_out,k", [(1, 1, 1, 5, 3, 1), (13, 3, 4, 67, 130, 1), (29, 10, 16, 33, 17, 2), (40, 3, 2, 8, 8, 3)])
def test_matches_definition(layout, T, K, r, d_in, d_out, k):
    x, a, b, ids, w, base, scaling = make_inputs(T, K, r, d_in, d_out, k)
    want = multi_lora_naive(x, a, b, ids, weights=w, scaling=scaling, base_out=base)
    got = multi_lora(x, a, b, ids, weights=w, scaling=scaling, base_out=base, backend="torch")
    torch.testing.assert_close(got, want)
    assert got is base  # accumulated in place (no autograd recording)
    got = multi_lora(x, a, b, ids[:, 0], scaling=0.5)
    torch.testing.assert_close(got, multi_lora_naive(x, a, b, ids[:, 0], scaling=0.5))


def test_gradcheck(layout):
    x, a, b, ids, w, base, scaling = make_inputs(11, 3, 2, 6, 5, k=2)
    for t in (x, a, b, w, base):
        t.requires_grad_(True)
    plan = plan_adapters(ids, 3)
    assert torch.autograd.gradcheck(lambda *t: multi_lora(t[0], t[1], t[2], plan, weights=t[3], scaling=scaling, base_out=t[4] * 1),
                                    (x, a, b, w, base))


def test_every_token_one_adapter(layout):
    """Top-1 with no -1 (a decode step under oracle routing): the padded outputs are read back in token order."""
    x, a, b, ids, w, base, scaling = make_inputs(23, 4, 3, 9, 7, none_share=0.0, seed=3)
    plan = plan_adapters(ids, 4)
    assert plan.padded_slot is not None and plan_adapters(torch.tensor([0, -1, 1]), 2).padded_slot is None
    assert plan_adapters(ids.repeat(1, 2), 4).padded_slot is None  # two slots per token: scattered
    want = multi_lora_naive(x, a, b, ids, weights=w, scaling=scaling, base_out=base)
    torch.testing.assert_close(multi_lora(x, a, b, plan, weights=w, scaling=scaling, base_out=base.clone()), want)
    torch.testing.assert_close(multi_lora(x, a, b, plan, scaling=1.5), multi_lora_naive(x, a, b, ids, scaling=1.5))
    for t in (x, a, b, w, base):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *t: multi_lora(t[0], t[1], t[2], plan, weights=t[3], scaling=scaling, base_out=t[4] * 1),
                                    (x, a, b, w, base))


def test_all_none_and_empty():
    x, a, b, ids, w, base, scaling = make_inputs(7, 3, 2, 6, 5)
    none = torch.full((7,), -1)
    torch.testing.assert_close(multi_lora(x, a, b, none, base_out=base), base)
    assert multi_lora(x, a, b, none).abs().sum() == 0
    out = multi_lora(x[:0], a, b, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 5)


def test_plan_groups_tokens_by_adapter():
    ids = torch.tensor([2, 0, -1, 2, 1, 0, 2])
    plan = plan_adapters(ids, 4)
    assert plan.adapters == [0, 1, 2] and plan.counts == [2, 1, 3] and plan.offsets == [0, 2, 3]
    assert plan.sorted_token.tolist() == [1, 5, 4, 0, 3, 6]  # stable within each adapter
    assert plan.sorted_adapter.tolist() == [0, 0, 1, 2, 2, 2]


@pytest.mark.parametrize("bad,match", [
    (lambda t: dict(adapter_ids=torch.tensor([0, 3, 1])), "adapter id 3 out of range"),
    (lambda t: dict(adapter_ids=torch.tensor([0, -2, 1])), "adapter id -2 out of range"),
    (lambda t: dict(adapter_ids=torch.tensor([0.0, 1.0, 1.0])), "integer tensor"),
    (lambda t: dict(adapter_ids=torch.tensor([0, 1])), "cover 2 tokens but x has 3"),
    (lambda t: dict(x=torch.randn(3, 7)), "d_in=7"),
    (lambda t: dict(lora_b=torch.randn(3, 5, 4)), "does not fit lora_a"),
    (lambda t: dict(weights=torch.ones(3, 2)), "weights shape"),
    (lambda t: dict(scaling=torch.ones(2)), r"scaling tensor must have shape \[3\]"),
    (lambda t: dict(base_out=torch.randn(3, 4)), "base_out shape"),
    (lambda t: dict(backend="cuda"), "unknown backend"),
])
def test_bad_input_names_the_value(bad, match):
    args = dict(x=torch.randn(3, 6), lora_a=torch.randn(3, 2, 6), lora_b=torch.randn(3, 5, 2), adapter_ids=torch.tensor([0, 2, 1]))
    args.update(bad(args))
    with pytest.raises((ValueError, TypeError), match=match):
        multi_lora(**args)


def test_few_of_many_adapters_used(layout):
    """Padded groups over the used adapters only (weights gathered) when fewer than half are used."""
    x, a, b, _, w, base, scaling = make_inputs(9, 10, 4, 12, 7, k=2)
    ids = torch.tensor([2, 7, -1, 2, 7, 7, 2, -1, 7])[:, None].repeat(1, 2)
    ids[:, 1] = torch.tensor([7, 2, 2, -1, 2, 7, -1, 7, 2])
    plan = plan_adapters(ids, 10)
    assert not plan.pads_all_adapters and plan.padded_groups == 2
    want = multi_lora_naive(x, a, b, ids, weights=w, scaling=scaling, base_out=base)
    torch.testing.assert_close(multi_lora(x, a, b, plan, weights=w, scaling=scaling, base_out=base.clone()), want)


@pytest.mark.parametrize("ids, runs", [
    ([0, 0, 0, 1, 1, 2, 2, 2, 2], [(0, 0, 3), (1, 3, 2), (2, 5, 4)]),  # rows sorted by culture, as in training
    ([1, 1, 1, 1, 1, 1, 1, 1, 1], [(1, 0, 9)]),
    ([2, 2, 2, 0, 0, 0, -1, -1, 2], [(2, 0, 3), (0, 3, 3), (-1, 6, 2), (2, 8, 1)]),  # oracle prefill: a run per row
])
@pytest.mark.parametrize("scaling", [0.7, torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64)])
def test_tokens_in_runs_skip_the_gather(layout, ids, runs, scaling):
    """Tokens in few runs of one adapter: the same values and gradients as the definition, no reorder."""
    x, a, b, _, _, base, _ = make_inputs(9, 3, 4, 11, 7)
    ids = torch.tensor(ids)
    plan = plan_adapters(ids, 3)
    assert plan.token_runs == runs and plan_adapters(ids[:, None].repeat(1, 2), 3).token_runs is None
    x, a, b = (t.clone().requires_grad_() for t in (x, a, b))
    got = multi_lora(x, a, b, plan, scaling=scaling, base_out=base)
    grads = torch.autograd.grad(got.square().sum(), (x, a, b))
    want = multi_lora_naive(x, a, b, ids, scaling=scaling, base_out=base)
    torch.testing.assert_close(got, want)
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), (x, a, b))):
        torch.testing.assert_close(g, w)
    with torch.no_grad():
        out = base.clone()
        assert multi_lora(x, a, b, plan, scaling=scaling, base_out=out) is out
        torch.testing.assert_close(out, want)


def _rows_case(rows, seq=5, dtype=torch.float64):
    x, a, b, _, w, base, _ = make_inputs(len(rows) * seq, 3, 4, 11, 7, dtype=dtype)
    ids = torch.tensor(rows).repeat_interleave(seq)
    return x, a, b, ids, w, base, plan_adapters(ids, 3, row_len=seq)


@pytest.mark.parametrize("rows", [[2, 0, -1, 2], [1, 1, 1], [-1, -1, 0, -1]])
@pytest.mark.parametrize("scaling", [0.7, torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64)])
@pytest.mark.parametrize("weighted", [False, True])
def test_rows_of_one_adapter(layout, rows, scaling, weighted):
    """Rows that each take one adapter (oracle routing, gold training): values and every gradient as the definition."""
    x, a, b, ids, w, base, plan = _rows_case(rows)
    assert plan.row_adapters.tolist() == rows
    w = w[:, :1] if weighted else None
    x, a, b, base = (t.clone().requires_grad_() for t in (x, a, b, base))
    leaves = (x, a, b, base) + ((w.requires_grad_(),) if weighted else ())
    got = multi_lora(x, a, b, plan, weights=w, scaling=scaling, base_out=base * 1)
    want = multi_lora_naive(x, a, b, ids, weights=w, scaling=scaling, base_out=base)
    torch.testing.assert_close(got, want)
    for g, g_want in zip(torch.autograd.grad(got.square().sum(), leaves), torch.autograd.grad(want.square().sum(), leaves)):
        torch.testing.assert_close(g, g_want)
    with torch.no_grad():
        out = base.clone()
        assert multi_lora(x, a, b, plan, weights=w, scaling=scaling, base_out=out) is out
        torch.testing.assert_close(out, want)


def test_rows_gradcheck(layout):
    x, a, b, ids, w, base, plan = _rows_case([2, -1, 0], seq=3)
    for t in (x, a, b, base):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *t: multi_lora(t[0], t[1], t[2], plan, scaling=0.5, base_out=t[3] * 1), (x, a, b, base))


def test_row_structure_is_detected_only_when_it_holds():
    ids = torch.tensor([1, 1, 0, 0, -1, -1])
    assert plan_adapters(ids, 2, row_len=2).row_adapters.tolist() == [1, 0, -1]
    assert plan_adapters(ids, 2, row_len=3).row_adapters is None  # a row mixes adapters
    assert plan_adapters(ids, 2).row_adapters is None  # no row length given
    assert plan_adapters(ids[:, None].repeat(1, 2), 2, row_len=2).row_adapters is None  # two slots per token
    with pytest.raises(ValueError, match="row_len must be a positive int dividing the 6 tokens, got 4"):
        plan_adapters(ids, 2, row_len=4)


def test_layout_pick_at_serving_shapes():
    """Prefill in oracle routing runs rows; a decode step (one token per row, many adapters) runs padded groups."""
    g = torch.Generator().manual_seed(0)
    prefill = torch.randint(0, 10, (8,), generator=g).repeat_interleave(128)
    for d_in, d_out in [(1024, 1024), (1024, 2816), (2816, 1024)]:  # attention and MLP projections
        assert tml.pick_layout(plan_adapters(prefill, 10, row_len=128), 16, d_in, d_out) == "rows"
    decode = torch.randint(0, 10, (32,), generator=g)
    assert tml.pick_layout(plan_adapters(decode, 10, row_len=1), 16, 1024, 1024) == "padded"
    assert tml.pick_layout(plan_adapters(prefill, 10), 16, 1024, 1024) == "segmented"  # no row structure known
    short = torch.randint(0, 10, (32,), generator=g).repeat_interleave(4)
    assert tml.pick_layout(plan_adapters(short, 10, row_len=4), 16, 1024, 1024) != "rows"  # weights gathered per short row
    idle = torch.tensor([3, -1, -1, -1]).repeat_interleave(128)
    assert tml.pick_layout(plan_adapters(idle, 10, row_len=128), 16, 1024, 1024) != "rows"  # most rows would be zeroed

