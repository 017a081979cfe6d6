"""The torch backend's own parts: which layout it picks and the plan structure each layout relies on.
Its outputs and gradients against the definition, in every layout, are in test_multi_lora.py."""
import pytest
import torch

from moa.kernels import plan_adapters
from moa.kernels.multi_lora.torch_backend import pick_layout, tables


def test_layout_pick_at_serving_shapes():
    """Prefill in oracle routing runs rows; a decode step (one token per row, many adapters) runs padded groups."""
    g = torch.Generator().manual_seed(0)
    prefill = torch.randint(0, 10, (8,), generator=g).repeat_interleave(128)
    for d_in, d_out in [(1024, 1024), (1024, 2816), (2816, 1024)]:  # attention and MLP projections
        assert pick_layout(plan_adapters(prefill, 10, row_len=128), 16, d_in, d_out) == "rows"
    decode = torch.randint(0, 10, (32,), generator=g)
    assert pick_layout(plan_adapters(decode, 10, row_len=1), 16, 1024, 1024) == "padded"
    assert pick_layout(plan_adapters(prefill, 10), 16, 1024, 1024) == "segmented"  # no row structure known
    short = torch.randint(0, 10, (32,), generator=g).repeat_interleave(4)
    assert pick_layout(plan_adapters(short, 10, row_len=4), 16, 1024, 1024) != "rows"  # weights gathered per short row
    idle = torch.tensor([3, -1, -1, -1]).repeat_interleave(128)
    assert pick_layout(plan_adapters(idle, 10, row_len=128), 16, 1024, 1024) != "rows"  # most rows would be zeroed


def test_row_structure_is_detected_only_when_it_holds():
    ids = torch.tensor([1, 1, 0, 0, -1, -1])
    assert tables(plan_adapters(ids, 2, row_len=2)).row_adapters.tolist() == [1, 0, -1]
    assert tables(plan_adapters(ids, 2, row_len=3)).row_adapters is None  # a row mixes adapters
    assert tables(plan_adapters(ids, 2)).row_adapters is None  # no row length given
    assert tables(plan_adapters(ids[:, None].repeat(1, 2), 2, row_len=2)).row_adapters is None  # two slots per token
    with pytest.raises(ValueError, match="row_len must be a positive int dividing the 6 tokens, got 4"):
        plan_adapters(ids, 2, row_len=4)


@pytest.mark.parametrize("ids, runs", [
    ([0, 0, 0, 1, 1, 2, 2, 2, 2], [(0, 0, 3), (1, 3, 2), (2, 5, 4)]),  # rows sorted by culture, as in training
    ([1, 1, 1, 1, 1, 1, 1, 1, 1], [(1, 0, 9)]),
    ([2, 2, 2, 0, 0, 0, -1, -1, 2], [(2, 0, 3), (0, 3, 3), (-1, 6, 2), (2, 8, 1)]),  # oracle prefill: a run per row
])
def test_token_runs(ids, runs):
    """Tokens in few runs of one adapter: the segmented layout slices x in token order (no gather, no scatter)."""
    ids = torch.tensor(ids)
    assert tables(plan_adapters(ids, 3)).token_runs == runs
    assert tables(plan_adapters(ids[:, None].repeat(1, 2), 3)).token_runs is None  # two slots per token


def test_padded_groups_and_read_back():
    """Padded groups span all K adapters when at least half are used, else the used ones (weights gathered);
    with one adapter per token the outputs are read back in token order."""
    every = tables(plan_adapters(torch.tensor([2, 0, 1, 2, 0]), 4))
    assert every.pads_all_adapters and every.padded_groups == 4
    assert every.padded_slot is not None
    assert torch.equal(every.padded_token.reshape(-1)[every.padded_slot], torch.arange(5))
    few = tables(plan_adapters(torch.tensor([[2, 7], [7, -1], [-1, 2]]), 10))
    assert not few.pads_all_adapters and few.padded_groups == 2 and few.padded_slot is None  # two slots per token
    assert tables(plan_adapters(torch.tensor([0, -1, 1]), 2)).padded_slot is None  # a token without an adapter

