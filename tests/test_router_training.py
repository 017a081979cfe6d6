"""Joint training of culture adapters and the token router on data where the culture is visible in the text."""
import pytest
import torch

import moa
from moa.tiny import cue_batch, tiny_model

K, SEQ = 4, 20


@pytest.mark.slow  # training-heavy
def test_joint_training_learns_routing():
    torch.manual_seed(0)
    model = moa.MoAForCausalLM.from_base(tiny_model(seed=1), moa.MoAConfig(cultures=[f"c{i}" for i in range(K)], r=4, alpha=8,
                                                                           router_loss_weight=1.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    model.train()
    for _ in range(250):
        ids, labels, cultures, _ = cue_batch(16, K, SEQ, generator=g)
        out = model(input_ids=ids, labels=labels, culture_ids=cultures)  # default: gold routing for the LM loss
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else (out.lm_loss.item(), out.router_loss.item())
    model.eval()
    ids, labels, cultures, after_cue = cue_batch(64, K, SEQ, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        out = model(input_ids=ids, routing="router")
    acc = torch.stack([(logits.argmax(-1) == cultures[:, None])[after_cue].float().mean() for logits in out.router_logits])
    print("token routing accuracy after the cue, per layer:", acc.tolist())
    assert acc.min() >= 0.95, acc  # every layer's gate, every token after the cue
    assert first[1] > 1.0
    with torch.no_grad():
        last = model(input_ids=ids, labels=labels, culture_ids=cultures)
    assert last.lm_loss < first[0] - 1.0 and last.router_loss < 0.2


@pytest.mark.slow  # training-heavy
def test_router_learns_that_a_prompt_names_no_culture():
    """Rows whose prompt names no culture train their gates towards the uniform distribution (NO_CULTURE): after
    training, the router's confidence is low on prompts without a cue and high, and right, on prompts with one."""
    from moa.routing import NO_CULTURE

    torch.manual_seed(0)
    model = moa.MoAForCausalLM.from_base(tiny_model(seed=1), moa.MoAConfig(cultures=[f"c{i}" for i in range(K)], r=4, alpha=8,
                                                                           router_loss_weight=1.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    g = torch.Generator().manual_seed(0)

    def batch(n, generator):
        ids, labels, cultures, _ = cue_batch(n, K, SEQ, generator=generator)
        cue_free = torch.arange(n) % 4 == 0  # a quarter of the rows: random text, no cue
        ids[cue_free] = torch.randint(3, 250, (int(cue_free.sum()), SEQ), generator=generator)
        return ids, labels, cultures, cue_free

    model.train()
    for _ in range(200):
        ids, labels, cultures, cue_free = batch(16, g)
        out = model(input_ids=ids, culture_ids=cultures)
        loss = model.router_loss(out.router_logits, torch.where(cue_free, NO_CULTURE, cultures))
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    ids, _, cultures, cue_free = batch(64, torch.Generator().manual_seed(123))
    picked, confidence = model.route_sequences(ids[:, :8])
    print("confidence without a cue:", confidence[cue_free].tolist(), "with one:", confidence[~cue_free].min().item())
    assert (confidence[cue_free] < 0.6).all()  # uniform is 0.25; random text can resemble a culture's strides
    assert (confidence[~cue_free] > 0.9).all() and torch.equal(picked[~cue_free], cultures[~cue_free])
