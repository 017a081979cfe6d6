"""The adapted linear layer: a frozen base projection plus every culture's LoRA, stacked.

`MoALinear` holds `lora_A[K, r, d_in]` and `lora_B[K, d_out, r]` for the K cultures and adds
`multi_lora(x, lora_A, lora_B, plan)` to the base output. The parameters are stored transposed
(`lora_A_T[K, d_in, r]`, `lora_B_T[K, r, d_out]`), so the matmuls `x A^T` and `h B^T` read
contiguous operands; `lora_A`/`lora_B` are views in the contract's shapes and write through, the plan coming from the routing call
in progress. Which wrapper a base layer gets is decided by small dispatch functions, as in PEFT
(`moa.model.wrap_linear` tries them in turn); the bitsandbytes variants live in `moa.bnb`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from moa.kernels import multi_lora
from moa.routing import current_call


class MoALinear(nn.Module):
    """A base linear layer (frozen) with K stacked LoRA adapters selected per token."""

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, num_adapters: int, r: int,
                 scaling: float, dropout: float, owner: object, generator: torch.Generator | None = None):
        super().__init__()
        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features, self.r, self.scaling = in_features, out_features, r, scaling
        self.owner = owner  # routing key of the model this layer belongs to (a plain object, not a module)
        self.backend = "auto"
        dtype = self.lora_dtype()
        self.lora_A_T = nn.Parameter(torch.empty(num_adapters, in_features, r, dtype=dtype))
        self.lora_B_T = nn.Parameter(torch.zeros(num_adapters, r, out_features, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora(generator)

    @property
    def lora_A(self) -> torch.Tensor:
        """[K, r, d_in] view of the stored A^T (writes go through)."""
        return self.lora_A_T.transpose(1, 2)

    @property
    def lora_B(self) -> torch.Tensor:
        """[K, d_out, r] view of the stored B^T (writes go through)."""
        return self.lora_B_T.transpose(1, 2)

    def lora_dtype(self) -> torch.dtype:
        weight = self.base_layer.weight
        return weight.dtype if weight.dtype.is_floating_point else torch.float32

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None):
        """PEFT's default init: A Kaiming-uniform (a = sqrt(5)), B zero, so every adapter starts as the base."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, d_in]
        a = torch.rand(self.lora_A.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
        self.lora_A.copy_(a.to(self.lora_A.device, self.lora_A.dtype))
        self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        call = current_call(self.owner)
        if call is None or call.active is None:
            return out
        plan, weights = call.active
        lead = out.shape[:-1]
        y = multi_lora(self.dropout(x).reshape(-1, self.in_features), self.lora_A, self.lora_B, plan, weights=weights,
                       scaling=self.scaling, base_out=out.reshape(-1, self.out_features), backend=self.backend)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        k = self.lora_A.shape[0]
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={k}, r={self.r}, scaling={self.scaling:g}"


def dispatch_default(target: nn.Module, **kwargs) -> MoALinear | None:
    if isinstance(target, nn.Linear):
        return MoALinear(target, target.in_features, target.out_features, **kwargs)
    return None
