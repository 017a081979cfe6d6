"""Batched generation where every row may use a different culture, one forward pass per step."""
from moa.infer.generate import generate_rows, read_prompts

__all__ = ["generate_rows", "read_prompts"]
