"""A small real run of the single model: train culture adapters and the router jointly on a toy task
where each row announces its culture, then generate for a batch that mixes cultures in one pass.

    python examples/mixed_culture.py [--steps 150]
"""
import argparse
import time

import torch
from tqdm import trange

import moa
from moa.tiny import cue_batch, tiny_model

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=150)
parser.add_argument("--cultures", default="japan,india,nigeria,brazil")
args = parser.parse_args()

torch.manual_seed(0)
cultures = args.cultures.split(",")
model = moa.MoAForCausalLM.from_base(tiny_model(seed=0), moa.MoAConfig(cultures=cultures, r=4, alpha=8, router_loss_weight=1.0))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
g = torch.Generator().manual_seed(0)
model.train()
for step in (bar := trange(args.steps, desc="joint training")):
    ids, labels, culture_ids, _ = cue_batch(16, len(cultures), generator=g)
    out = model(input_ids=ids, labels=labels, culture_ids=culture_ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    bar.set_postfix(lm=f"{out.lm_loss.item():.3f}", router=f"{out.router_loss.item():.3f}")

model.eval()
ids, _, culture_ids, _ = cue_batch(8, len(cultures), seq=8, generator=torch.Generator().manual_seed(1))
start = time.perf_counter()
routed = model.generate(input_ids=ids, routing="router", max_new_tokens=8, do_sample=False, pad_token_id=0)
seconds = time.perf_counter() - start
oracle = model.generate(input_ids=ids, culture_ids=culture_ids, routing="oracle", max_new_tokens=8, do_sample=False, pad_token_id=0)
with torch.no_grad():
    gates = model(input_ids=routed, routing="router").router_logits[-1][:, -1].softmax(-1)

print(f"\nmixed-culture batch of {len(ids)} rows, one forward per step, {8 * len(ids) / seconds:.0f} new tokens/s")
print(f"{'row':>3}  {'culture':<10} {'router picks':<12} {'confidence':>10}  {'new tokens (router)':<32} same as oracle")
for i in range(len(ids)):
    pick = int(gates[i].argmax())
    new = routed[i, ids.shape[1]:].tolist()
    print(f"{i:>3}  {cultures[culture_ids[i]]:<10} {cultures[pick]:<12} {gates[i, pick]:>10.3f}  {str(new):<32} "
          f"{torch.equal(routed[i], oracle[i])}")
agree = sum(torch.equal(routed[i], oracle[i]) for i in range(len(ids)))
print(f"router-routed generation equals oracle-routed generation on {agree}/{len(ids)} rows")
