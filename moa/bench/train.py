"""Training step time (forward + backward + optimizer step) on the same tokens, K culture adapters.

One batch of `--batch` rows x `--seq-len` tokens (random token ids, every token supervised), rows
assigned to the K cultures round-robin (MoA groups them by culture, as the trainer batches them), and one
frozen Llama-style base model built from a config.
Providers, each doing real AdamW steps on its own copy of the base:

* `moa_joint` (a): MoA with K culture LoRAs of rank r, the whole mixed batch in one pass, gold
  routing (every row through its culture's adapter), loss = lm + lambda * router loss, so the
  gates run and train; AdamW over the adapters and the routers.
* `shared_lora` (b): one conventional LoRA of rank r shared by every row (MoA with one culture,
  every row culture 0), LM loss only, AdamW over the adapter. Its single gate still runs in the
  forward (MoA runs the gates in training) but is frozen and out of the loss.
* `shared_lora_kr` (b2): the same with rank K * r, as many trainable parameters as (a).
* `separate_runs` (c): K PEFT LoRA models of rank r, one per culture, as K separate runs would
  train them (and mLoRA's baseline): each does one AdamW step on its own culture's B / K rows. One
  step of (c) is the K runs one after another, so it processes the same B rows as one step of (a).

The providers are timed interleaved, one step each per round; ratios are medians over rounds of the
per-round ratio. Checks: (a) within `--max-ratio` of (b) per step, and (a) faster than (c) for the same tokens. Torch runs on `--threads` CPU threads
(default 1). Timings are only reported, never asserted by tests.
"""
from __future__ import annotations

import argparse
import copy
import os

import torch  # peft, transformers and the model load in the functions that use them: `--help` stays fast

from moa.bench.common import (add_model_arguments, llama_base, paired_ratio, print_table, stamp, time_interleaved,
                              write_json)
from moa.errors import UsageError

PROVIDERS = ("moa_joint", "shared_lora", "shared_lora_kr", "separate_runs")
LABELS = {
    "moa_joint": "(a) MoA joint, K adapters, mixed batch",
    "shared_lora": "(b) one shared LoRA, rank r",
    "shared_lora_kr": "(b2) one shared LoRA, rank K*r",
    "separate_runs": "(c) K separate PEFT runs, B/K rows each",
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, hidden_size=512, intermediate_size=1408, heads=8)
    parser.add_argument("--batch", type=int, default=20, help="rows per step B (a multiple of --cultures)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per row S")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument("--router-loss-weight", type=float, default=0.1, help="lambda of (a)'s router loss")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per provider")
    parser.add_argument("--repeat", type=int, default=10, help="timed steps per provider (median reported)")
    parser.add_argument("--max-ratio", type=float, default=1.2, help="the (a) / (b) step-time ratio the check allows")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of " + ",".join(PROVIDERS))
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch during the run (0: torch's default); 1 keeps timings steady on a shared CPU")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="bench-train.json", help="where to write the results")


def _providers(text: str) -> list[str]:
    items = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in items if v not in PROVIDERS]
    if bad or not items:
        raise UsageError(f"unknown providers {bad or text!r}: expected a non-empty subset of {PROVIDERS}")
    return [p for p in PROVIDERS if p in items]


class Trainer:
    """One provider: its models, optimizers and a `step()` doing a real training step on the batch."""

    def __init__(self, name: str, step, params: list[list[torch.nn.Parameter]]):
        self.name, self._step, self.params = name, step, params  # params: the trainable parameters of each run
        self.losses: list[float] = []
        self.lm_losses: list[float] = []
        self.steps = 0
        self.initial = [[p.detach().clone() for p in run] for run in params]

    def step(self) -> None:
        loss, lm_loss = self._step()
        self.losses.append(loss)
        self.lm_losses.append(lm_loss)
        self.steps += 1

    def trainable_params(self) -> int:
        return sum(p.numel() for run in self.params for p in run)

    def param_change(self) -> float:
        """The smallest over runs of the largest absolute change of a run's trainable parameters."""
        return min(max(float((p.detach() - p0).abs().max()) for p, p0 in zip(run, start))
                   for run, start in zip(self.params, self.initial))


def _moa_trainer(name, base, names, rank, batch, culture_ids, args) -> Trainer:
    import moa

    config = moa.MoAConfig(cultures=names, r=rank, alpha=2 * rank, target_modules=TARGETS, train_routing="gold",
                           router_loss_weight=args.router_loss_weight)
    model = moa.MoAForCausalLM.from_base(copy.deepcopy(base), config).train()
    joint = len(names) > 1
    if not joint:
        for p in model.routers.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    order = torch.argsort(culture_ids, stable=True)  # rows grouped by culture, as the trainer batches them
    input_ids, labels, culture_ids = batch[0][order], batch[1][order], culture_ids[order]

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids=input_ids, labels=labels, culture_ids=culture_ids)
        loss = out.loss if joint else out.lm_loss
        loss.backward()
        optimizer.step()
        return float(loss.detach()), float(out.lm_loss.detach())

    return Trainer(name, step, [params])


def _separate_trainer(base, names, batch, row_cultures, args) -> Trainer:
    from peft import LoraConfig, get_peft_model

    input_ids, labels = batch
    runs = []
    for c in range(len(names)):
        lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0)
        model = get_peft_model(copy.deepcopy(base), lora).train()
        params = [p for p in model.parameters() if p.requires_grad]
        rows = (row_cultures == c).nonzero().squeeze(1)
        runs.append((model, params, torch.optim.AdamW(params, lr=args.lr), input_ids[rows], labels[rows]))

    def step():
        losses = []
        for model, _, optimizer, ids, lab in runs:
            optimizer.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=lab).loss
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        mean = sum(losses) / len(losses)  # every slice holds as many supervised tokens: the batch's per-token loss
        return mean, mean

    return Trainer("separate_runs", step, [run[1] for run in runs])


def build_trainers(args) -> dict[str, Trainer]:
    """The trainer of every provider in `args.providers`, all on one base model and one batch."""
    if args.cultures < 1:
        raise UsageError(f"--cultures must be >= 1, got {args.cultures}")
    if args.batch < args.cultures or args.batch % args.cultures:
        raise UsageError(f"--batch {args.batch} must be a positive multiple of --cultures {args.cultures} "
                         "(every culture gets the same number of rows)")
    if args.seq_len < 2:
        raise UsageError(f"--seq-len must be >= 2 (next-token labels), got {args.seq_len}")
    wanted = _providers(args.providers)
    base = llama_base(args, max_positions=max(2048, args.seq_len)).to(args.device, torch.float32)
    for p in base.parameters():
        p.requires_grad_(False)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=args.device)
    batch = (input_ids, input_ids.clone())
    row_cultures = torch.arange(args.batch, device=args.device) % args.cultures
    names = [f"culture{i}" for i in range(args.cultures)]
    trainers = {}
    for name in wanted:
        if name == "moa_joint":
            trainers[name] = _moa_trainer(name, base, names, args.rank, batch, row_cultures, args)
        elif name == "shared_lora":
            trainers[name] = _moa_trainer(name, base, ["shared"], args.rank, batch, torch.zeros_like(row_cultures), args)
        elif name == "shared_lora_kr":
            trainers[name] = _moa_trainer(name, base, ["shared"], args.cultures * args.rank, batch,
                                          torch.zeros_like(row_cultures), args)
        else:
            trainers[name] = _separate_trainer(base, names, batch, row_cultures, args)
    return trainers


def _checks(by_name: dict, max_ratio: float) -> list[dict]:
    checks = []
    a, b, c = by_name.get("moa_joint"), by_name.get("shared_lora"), by_name.get("separate_runs")
    if a and b:
        ratio = paired_ratio(a, b)
        checks.append({"check": f"(a) / (b) step time <= {max_ratio:g}", "value": ratio, "passed": ratio <= max_ratio})
    if a and c:
        ratio = paired_ratio(c, a)
        checks.append({"check": "(a) faster than (c) for the same tokens: (c) / (a) > 1", "value": ratio, "passed": ratio > 1.0})
    return checks


def run(args) -> int:
    from moa.atomic import check_output_file
    from moa.base_model import resolve_device

    check_output_file(args.json, '"bench": "train"')
    args.device = resolve_device(args.device)
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {args.threads}")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    trainers = build_trainers(args)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    stats = time_interleaved({name: t.step for name, t in trainers.items()}, warmup=args.warmup, repeat=args.repeat)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    tokens = args.batch * args.seq_len
    results = []
    for name, t in trainers.items():
        results.append({"provider": name, "label": LABELS[name], **stats[name], "tokens": tokens,
                        "tokens_per_s": tokens / stats[name]["ms_median"] * 1e3,
                        "trainable_params": t.trainable_params(), "runs": len(t.params),
                        "optimizer_steps_per_run": t.steps, "param_change": t.param_change(),
                        "first_loss": t.losses[0], "last_loss": t.losses[-1],
                        "first_lm_loss": t.lm_losses[0], "last_lm_loss": t.lm_losses[-1]})
    by_name = {r["provider"]: r for r in results}
    shared = by_name.get("shared_lora")
    for row in results:
        row["vs_shared"] = paired_ratio(row, shared) if shared else None
    table = print_table(results, [("label", "provider", "s"), ("trainable_params", "trainable", "d"),
                                  ("ms_median", "ms/step (median)", ".1f"), ("ms_p20", "p20", ".1f"),
                                  ("ms_p80", "p80", ".1f"), ("tokens_per_s", "tokens/s", ".0f"),
                                  ("vs_shared", "vs (b)", ".3f"), ("first_lm_loss", "lm loss (first)", ".4f"),
                                  ("last_lm_loss", "lm loss (last)", ".4f")])
    print(f"K={args.cultures} cultures, r={args.rank}, batch {args.batch} x {args.seq_len} tokens per step "
          f"({args.batch // args.cultures} rows per culture); (c) per step = the sum of its K runs' steps")
    checks = _checks(by_name, args.max_ratio)
    for check in checks:
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {check['check']}: {check['value']:.3f}")
    write_json(args.json, {"bench": "train", **stamp(), "load_average": {"before": load_before, "after": load_after},
                           "args": vars(args),
                           "results": results, "checks": checks, "table": table})
    return 0
