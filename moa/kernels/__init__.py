"""moa's fused ops: `multi_lora`, the LoRA outputs of a batch that mixes adapters."""
from .multi_lora import BACKENDS, AdapterPlan, multi_lora, plan_adapters

__all__ = ["AdapterPlan", "BACKENDS", "multi_lora", "plan_adapters"]
