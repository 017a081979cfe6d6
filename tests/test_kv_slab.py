"""The serving engine's KV slab: rows that join, decode and leave in any order, through window moves and
buffer growth, compute what each computes alone."""
import random

import pytest
import torch
from helpers import fresh_base

from moa import compat
from moa.data.padding import pad_batch
from moa.serve.kv_slab import KVSlab


def alone(model, sequence):
    """Last-position logits of one sequence run alone, no cache."""
    return model(input_ids=torch.tensor([sequence])).logits[0, -1]


def prefill(model, prompts):
    """A left-padded prefill of `prompts`, as the engine runs it: its cache and last-position logits."""
    ids, mask = pad_batch(prompts, 0, left=True)
    cache = compat.new_kv_cache(model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True,
                **compat.cache_kwargs(cache))
    return cache, out.logits[:, -1]


@torch.no_grad()
def test_rows_joining_and_leaving_compute_what_they_compute_alone():
    model = fresh_base(vocab_size=131).eval()
    slab = KVSlab(model.config, max_rows=4, max_columns=40)
    rng = random.Random(0)
    rows: list[list[int]] = []  # each running row's tokens, in slab order
    columns, moves, checked = set(), 0, 0
    for step in range(80):
        if len(rows) < 4 and rng.random() < 0.4:  # one or two requests join, their prompts left-padded together
            prompts = [[rng.randrange(3, 131) for _ in range(rng.randint(1, 14))] for _ in range(min(rng.randint(1, 2), 4 - len(rows)))]
            cache, logits = prefill(model, prompts)
            for prompt, row_logits in zip(prompts, logits):
                torch.testing.assert_close(row_logits, alone(model, prompt), atol=1e-5, rtol=1e-5)
            joining = [i for i in range(len(prompts)) if rng.random() < 0.8] or [0]
            slab.join(compat.kv_tensors(cache), joining, [len(prompts[i]) for i in joining])
            rows += [list(prompts[i]) for i in joining]
        leaving = [i for i, row in enumerate(rows) if len(row) >= 38 or rng.random() < 0.05]
        if leaving:
            order = slab.remove(leaving)
            assert sorted(order) == [i for i in range(len(rows)) if i not in leaving]
            rows = [rows[i] for i in order]
        if not rows:
            continue
        for row in rows:
            row.append(rng.randrange(3, 131))
        end = slab.end
        mask, positions = slab.decode_inputs()
        moves += slab.end < end
        columns.add(slab.columns)
        assert positions[:, 0].tolist() == [len(row) - 1 for row in rows]
        out = model(input_ids=torch.tensor([[row[-1]] for row in rows]), attention_mask=mask, position_ids=positions,
                    use_cache=True, **compat.cache_kwargs(slab.cache))
        slab.advance()
        for row, row_logits in zip(rows, out.logits[:, -1]):
            torch.testing.assert_close(row_logits, alone(model, row), atol=1e-5, rtol=1e-5)
            checked += 1
        assert slab.window_length() == max(len(row) for row in rows) <= 40
    assert checked > 150 and moves >= 2 and len(columns) >= 2 and max(columns) == 40  # the window moved and grew
    assert slab.tokens_held() == 4 * 40


def test_slab_refuses_what_does_not_fit():
    model = fresh_base(vocab_size=131).eval()
    slab = KVSlab(model.config, max_rows=2, max_columns=8)
    with torch.no_grad():
        cache, _ = prefill(model, [[5] * 3, [6] * 4, [7] * 2])
    with pytest.raises(ValueError, match="3 join: more than the slab's 2 rows"):
        slab.join(compat.kv_tensors(cache), [0, 1, 2], [3, 4, 2])
    with torch.no_grad():
        cache, _ = prefill(model, [[5] * 9])
    with pytest.raises(ValueError, match="needs 10 KV-cache columns, more than the slab's 8"):
        slab.join(compat.kv_tensors(cache), [0], [9])
    with pytest.raises(ValueError, match="expected at least one row and one column|at least one row"):
        KVSlab(model.config, max_rows=0, max_columns=8)
