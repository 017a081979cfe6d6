"""Multi-LoRA ops for mixed-adapter batches (installed as `moa.kernels`)."""
from .multi_lora import BACKENDS, multi_lora
from .plan import AdapterPlan, plan_adapters

__all__ = ["AdapterPlan", "BACKENDS", "multi_lora", "plan_adapters"]
