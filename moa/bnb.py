"""bitsandbytes base layers (QLoRA): 4-bit and 8-bit variants of `MoALinear`.

Kept apart so that nothing else imports bitsandbytes; the dispatchers return None when it is not
installed or the layer is not one of its types.
"""
from __future__ import annotations

import torch

from moa.layers import MoALinear


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:  # bitsandbytes is optional at run time
        return None
    return bnb


class MoALinear4bit(MoALinear):
    """LoRA adapters over a `bnb.nn.Linear4bit` (nf4/fp4) base; adapters in the compute dtype.

    bitsandbytes >= 0.48 repacks a 4-bit weight in place for its AVX512-BF16 CPU kernel on the first
    inference forward. Under ZeRO-3 the weight is a partitioned parameter, gathered for each forward:
    the repack replaces the gathered storage, the partition keeps the old layout, and the next
    gather or `state_dict` fails. The base layer keeps its packed layout instead.
    """

    def __init__(self, base_layer, *args, **kwargs):
        if hasattr(base_layer, "support_avx512bf16_for_cpu"):
            base_layer.support_avx512bf16_for_cpu = False
        super().__init__(base_layer, *args, **kwargs)

    def lora_dtype(self) -> torch.dtype:
        return self.base_layer.compute_dtype or torch.float32


class MoALinear8bit(MoALinear):
    """LoRA adapters over a `bnb.nn.Linear8bitLt` (LLM.int8) base; adapters in float32."""

    def lora_dtype(self) -> torch.dtype:
        return torch.float32


def dispatch_bnb_4bit(target, **kwargs):
    bnb = _bnb()
    if bnb is not None and isinstance(target, bnb.nn.Linear4bit):
        return MoALinear4bit(target, target.in_features, target.out_features, **kwargs)
    return None


def dispatch_bnb_8bit(target, **kwargs):
    bnb = _bnb()
    if bnb is not None and isinstance(target, bnb.nn.Linear8bitLt):
        return MoALinear8bit(target, target.in_features, target.out_features, **kwargs)
    return None
