"""Joint training of culture adapters and the token router on data where the culture is visible in the text."""
import torch

import moa
from moa.tiny import tiny_model

K, SEQ, VOCAB = 4, 20, 384
CUE = 300  # culture c is announced by token CUE + c


def batch(n, generator):
    """Rows: a short random prefix, the culture's cue token, then a culture-specific token sequence."""
    cultures = torch.randint(0, K, (n,), generator=generator)
    ids = torch.randint(3, 250, (n, SEQ), generator=generator)
    cue_pos = torch.randint(0, 4, (n,), generator=generator)
    for i in range(n):
        p = int(cue_pos[i])
        ids[i, p] = CUE + cultures[i]
        for t in range(p + 1, SEQ):  # each culture continues with its own stride
            ids[i, t] = 3 + (ids[i, t - 1] - 3 + 7 * (int(cultures[i]) + 1)) % 247
    after_cue = torch.arange(SEQ)[None, :] > cue_pos[:, None]
    labels = torch.where(after_cue, ids, torch.full_like(ids, -100))
    return ids, labels, cultures, after_cue


def test_joint_training_learns_routing():
    torch.manual_seed(0)
    model = moa.MoAForCausalLM.from_base(tiny_model(seed=1), moa.MoAConfig(cultures=[f"c{i}" for i in range(K)], r=4, alpha=8,
                                                                           router_loss_weight=1.0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    model.train()
    for step in range(250):
        ids, labels, cultures, _ = batch(16, g)
        out = model(input_ids=ids, labels=labels, culture_ids=cultures)  # default: gold routing for the LM loss
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else (out.lm_loss.item(), out.router_loss.item())
    model.eval()
    ids, labels, cultures, after_cue = batch(64, torch.Generator().manual_seed(123))
    with torch.no_grad():
        out = model(input_ids=ids, routing="router")
    acc = torch.stack([(logits.argmax(-1) == cultures[:, None])[after_cue].float().mean() for logits in out.router_logits])
    print("token routing accuracy after the cue, per layer:", acc.tolist())
    assert acc.min() >= 0.95, acc  # every layer's gate, every token after the cue
    assert out.router_logits[0].shape == (64, SEQ, K)
    assert first[1] > 1.0 and out is not None
    with torch.no_grad():
        last = model(input_ids=ids, labels=labels, culture_ids=cultures)
    assert last.lm_loss < first[0] - 1.0 and last.router_loss < 0.2
