"""The training loss of a micro-batch and its statistics, per culture.

The loss is `MoAForCausalLM.joint_loss` (lm_loss + router_loss_weight * router_loss) of lm_loss,
the mean next-token cross-entropy over supervised tokens (labels != -100), and router_loss,
`MoAForCausalLM.router_loss` against the rows' `router_targets` (every attended token's gate
against its row's culture, or against the uniform distribution where the prompt names no culture,
NO_CULTURE; averaged over layers). The statistics are sums, so processes and micro-batches add them up exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moa.data import IGNORE_INDEX
from moa.model import MoAForCausalLM

STAT_KEYS = ("loss_sum", "micro_batches", "lm_loss_sum", "router_loss_sum", "tokens", "routed_correct", "routed_tokens")


def loss_and_stats(model: MoAForCausalLM, out, batch: dict, num_cultures: int):
    """(loss tensor, stats) for one micro-batch; stats are detached sums (see STAT_KEYS and per-culture keys).

    The loss is `model.joint_loss` of the LM loss (computed here per token, for the per-culture
    statistics) and the router loss against the batch's router targets."""
    logits, labels, culture_ids = out.logits, batch["labels"], batch["culture_ids"]
    targets = batch.get("router_targets", culture_ids)
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), shift_labels.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none").view_as(shift_labels)
    supervised = shift_labels != IGNORE_INDEX
    tokens = supervised.sum()
    lm_loss = token_loss.sum() / tokens.clamp(min=1)
    router_loss = model.router_loss(out.router_logits, targets, batch.get("attention_mask"))
    loss = model.joint_loss(lm_loss, router_loss)

    stats = torch.zeros(len(STAT_KEYS) + 2 * num_cultures, dtype=torch.float64)
    stats[0], stats[1] = float(loss.detach()), 1.0
    stats[2], stats[3] = float(lm_loss.detach()), float(router_loss.detach()) if router_loss is not None else 0.0
    stats[4] = float(tokens)
    if out.router_logits:  # token routing accuracy: the layer-averaged gate's top-1 against the row's culture, every token
        probs = torch.stack([r.detach().float().softmax(-1) for r in out.router_logits]).mean(0)
        mask = batch["attention_mask"].bool() & (targets[:, None] >= 0)
        stats[5] = float(((probs.argmax(-1) == targets[:, None]) & mask).sum())
        stats[6] = float(mask.sum())
    row_loss = (token_loss.detach() * supervised).sum(1)
    row_tokens = supervised.sum(1)
    base = len(STAT_KEYS)
    for c in range(num_cultures):
        rows = culture_ids == c
        stats[base + 2 * c] = float(row_loss[rows].sum())
        stats[base + 2 * c + 1] = float(row_tokens[rows].sum())
    return loss, stats


def summarize(stats: torch.Tensor, cultures: list[str]) -> dict:
    """Metrics from summed stats: losses averaged over micro-batches, per-culture LM loss per token."""
    n = max(float(stats[1]), 1.0)
    out = {"loss": float(stats[0]) / n, "lm_loss": float(stats[2]) / n, "router_loss": float(stats[3]) / n,
           "tokens": int(stats[4]),
           "routing_accuracy": float(stats[5]) / float(stats[6]) if float(stats[6]) else None}
    base = len(STAT_KEYS)
    culture_sums = stats[base::2]
    out["token_lm_loss"] = float(culture_sums.sum()) / max(float(stats[4]), 1.0)  # per token, not per micro-batch
    out["lm_loss_per_culture"] = {c: float(stats[base + 2 * i]) / float(stats[base + 2 * i + 1])
                                  for i, c in enumerate(cultures) if float(stats[base + 2 * i + 1])}
    return out
