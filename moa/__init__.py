"""moa: one causal LM holding every culture's LoRA behind a learned token-level router."""
from moa.config import MoAConfig
from moa.model import MoACausalLMOutput, MoAForCausalLM

__version__ = "0.1.0"
__all__ = ["MoAConfig", "MoACausalLMOutput", "MoAForCausalLM", "__version__"]
