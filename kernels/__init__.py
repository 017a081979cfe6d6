"""Multi-LoRA ops for mixed-adapter batches (installed as `moa.kernels`)."""
from .multi_lora import BACKENDS, multi_lora, multi_lora_sliced
from .plan import AdapterPlan, plan_adapters

__all__ = ["AdapterPlan", "BACKENDS", "multi_lora", "multi_lora_sliced", "plan_adapters"]
