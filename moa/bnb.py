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
    """LoRA adapters over a `bnb.nn.Linear4bit` (nf4/fp4) base; adapters in the compute dtype."""

    def lora_dtype(self) -> torch.dtype:
        return self.base_layer.compute_dtype or torch.float32

    def base_weight(self) -> torch.Tensor:
        bnb = _bnb()
        w = self.base_layer.weight
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(self.lora_dtype())


class MoALinear8bit(MoALinear):
    """LoRA adapters over a `bnb.nn.Linear8bitLt` (LLM.int8) base; adapters in float32."""

    def lora_dtype(self) -> torch.dtype:
        return torch.float32

    def base_weight(self) -> torch.Tensor:
        bnb = _bnb()
        w = self.base_layer.weight
        scales = w.SCB if w.SCB is not None else self.base_layer.state.SCB  # moved to the state after a forward
        return bnb.functional.int8_vectorwise_dequant(w.data, scales).to(torch.float32)


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
