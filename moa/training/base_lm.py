"""`train_base: true`: the base model itself trains (pre-training or full fine-tuning), with no adapter and no router.

`BaseLM` wraps the base model in the interface the trainer uses of `MoAForCausalLM` (forward with culture ids,
`router_loss`, `joint_loss`, `save_pretrained`), so the loop, the loss, the checkpoints and resuming are the
ones every run uses. Its saved form is a transformers model directory (config.json, model.safetensors and the
tokenizer's files), which a training config's `model.path` can name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moa.atomic import atomic_directory


@dataclass
class BaseLMOutput:
    logits: torch.Tensor
    router_logits: tuple = ()  # no router: no routing loss or statistics


class BaseLM(nn.Module):
    def __init__(self, base_model: nn.Module):
        super().__init__()
        self.base_model = base_model
        for p in base_model.parameters():
            p.requires_grad_(True)

    def forward(self, input_ids, attention_mask=None, culture_ids=None, labels=None) -> BaseLMOutput:
        """The base model's logits; every row runs the base (culture ids only label the statistics)."""
        return BaseLMOutput(self.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits)

    @staticmethod
    def router_loss(router_logits, culture_ids, attention_mask=None):
        return None

    def joint_loss(self, lm_loss, router_loss):
        return lm_loss

    def gradient_checkpointing_enable(self):
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def save_pretrained(self, path: str | Path, base_spec=None, tokenizer=None):
        """The trained base as a transformers model directory, with the tokenizer's files when given, atomically."""
        with atomic_directory(path, marker="config.json") as tmp:
            self.base_model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
