"""Shared test helpers: tiny models and PEFT adapters written to real files."""
from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model

import moa
from moa.config import BaseModelConfig
from moa.tiny import byte_tokenizer, tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_peft_adapters(base, out_dir, names, r=4, alpha=8, targets=TARGETS, seed=0, **lora_kwargs):
    """Save one random (non-zero) PEFT LoRA adapter per name under out_dir/name; returns the dirs."""
    dirs = []
    for i, name in enumerate(names):
        torch.manual_seed(seed + 100 * i)
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **lora_kwargs)
        peft_model = get_peft_model(copy.deepcopy(base), cfg)
        path = out_dir / name
        peft_model.save_pretrained(str(path))
        dirs.append(path)
    return dirs


def randomize_adapters(model, std=0.05, seed=0):
    """Give every culture slot non-zero, distinct LoRA weights (B starts at zero), and every
    router a non-zero pooling score (it starts at zero, a plain prefix mean)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.lora_layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)
        for router in model.routers:
            router.score.weight.copy_(torch.randn(router.score.weight.shape, generator=g))


def fresh_base(family="llama", seed=0, **kw):
    return tiny_model(family, seed=seed, **kw)


# byte ids 3..130 are ASCII: with this vocabulary every generated token decodes to one visible character
TEXT_TINY = {"family": "llama", "vocab_size": 131}


def save_text_run(path, cultures):
    """A saved run on the TEXT_TINY base, its adapters large enough to change what each culture generates."""
    model = moa.MoAForCausalLM.from_base(fresh_base(**TEXT_TINY), moa.MoAConfig(cultures=cultures, r=4, alpha=8))
    randomize_adapters(model, std=0.2, seed=1)
    model.save_pretrained(path, base_spec=BaseModelConfig(tiny=TEXT_TINY), tokenizer=byte_tokenizer())
    return path
