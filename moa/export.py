"""Export a saved MoA run for tools that know nothing of moa: PEFT adapters + router, or one merged model.

Usage: moa export --model RUN_DIR --format peft --output-dir OUT writes OUT/<culture>/ for every
culture (a PEFT LoRA adapter: `peft.PeftModel.from_pretrained(base, OUT/<culture>)`),
OUT/router.safetensors (the per-layer gates, keys routers.<layer>.gate.weight / .bias) and
OUT/manifest.json (cultures in id order with their adapter directories, the base model spec, the
MoA config and how to apply the router). moa export --model RUN_DIR --format merged --culture NAME
--output-dir OUT writes one transformers model directory with that culture's LoRA folded into the
base weights (W + scaling * B @ A), loadable by `AutoModelForCausalLM.from_pretrained(OUT)`; the base
must not be quantized. Every export is built under a temporary name and renamed into place.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from moa import saved_run
from moa.atomic import atomic_directory

FORMATS = ("peft", "merged")
ROUTER_FILE = "router.safetensors"
MANIFEST_FILE = "manifest.json"

ROUTER_HOW_TO_APPLY = {
    "gate": "Per decoder layer l (in order, routers.<l>): let x_t be the hidden state entering the first decoder layer "
            "at position t (the token embeddings; every layer's gate reads this same input) and m_t the attention mask "
            "(1 token, 0 padding). "
            "h_t = rms_norm(x_t) without weight, in float32 (eps = float32 machine epsilon); "
            "score_s = 10 * tanh(sqrt(hidden_size) * (routers.<l>.score.weight @ h_s) / 10), w_s = m_s * exp(score_s - 10); "
            "p_t = sum_{s<=t} w_s h_s / sum_{s<=t} w_s, the attention-weighted causal mean over the non-padding tokens "
            "so far (under a KV cache keep the two running sums); "
            "logits_t = routers.<l>.gate.weight @ rms_norm(p_t) + routers.<l>.gate.bias, one logit per culture (id order).",
    "token_routing": "router: every adapted projection of layer l applies, for token t, the adapter of culture "
                     "argmax(logits_t); topk: softmax(logits_t), keep the k largest, renormalise them to sum to 1 and add "
                     "those adapters' LoRA outputs weighted by them.",
    "sequence_choice": "One adapter per prompt (to pick one of the exported PEFT adapters): average softmax(logits_t) over "
                       "the layers at the last non-padding prompt token; the culture is the argmax and its averaged "
                       "probability the confidence.",
}


def _adapter_dir_name(culture: str) -> str:
    if Path(culture).name != culture or culture in (".", "..", ROUTER_FILE, MANIFEST_FILE) or culture.startswith("."):
        raise ValueError(f"culture {culture!r} cannot name an adapter directory: expected a plain file name "
                         f"other than {ROUTER_FILE!r} and {MANIFEST_FILE!r}")
    return culture


def export_peft(run_dir: str | Path, out_dir: str | Path) -> dict:
    """Write every culture as a PEFT LoRA adapter, the router weights and a manifest; returns the manifest."""
    from moa.base_model import load_moa

    config, spec = saved_run.read(run_dir)
    names = [_adapter_dir_name(c) for c in config.cultures]
    model, _ = load_moa(run_dir)
    router = {k: v.detach().cpu().contiguous() for k, v in model.adapter_state_dict().items() if k.startswith("routers.")}
    manifest = {
        "format": "peft",
        "cultures": [{"id": i, "name": c, "adapter_dir": name} for i, (c, name) in enumerate(zip(config.cultures, names))],
        "router": {"file": ROUTER_FILE, "num_layers": len(model.routers), "keys": sorted(router),
                   "how_to_apply": ROUTER_HOW_TO_APPLY},
        "base_model": spec.to_dict(),
        "moa_config": config.to_dict(),
    }
    with atomic_directory(out_dir, marker=MANIFEST_FILE) as tmp:
        for culture, name in zip(config.cultures, names):
            model.export_peft_adapter(culture, tmp / name)
        save_file(router, str(tmp / ROUTER_FILE), metadata={"format": "pt", "cultures": json.dumps(config.cultures)})
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@torch.no_grad()
def export_merged(run_dir: str | Path, culture: str, out_dir: str | Path) -> None:
    """Write the base model with one culture's LoRA folded in (W + scaling * B @ A) as a transformers directory."""
    from torch import nn

    from moa.base_model import load_base_model

    config, spec = saved_run.read(run_dir)
    slot = config.culture_id(culture, base=False)
    if spec.quantization is not None:
        raise ValueError(f"--format merged needs an unquantized base, but {run_dir} has quantization "
                         f"{spec.quantization!r}: folding a LoRA into quantized weights would requantize them; "
                         f"export --format peft instead, or merge into the full-precision base")
    base, tokenizer = load_base_model(spec)
    weights = saved_run.read_weights(run_dir, config)
    for key in sorted(k for k in weights if k.endswith(".lora_A")):
        module_name = key[:-len(".lora_A")]
        try:
            linear = base.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"{Path(run_dir) / saved_run.WEIGHTS_NAME}: adapter for {module_name!r}, which the base model "
                             f"{type(base).__name__} does not have") from None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{module_name} is a {type(linear).__name__}, expected torch.nn.Linear to merge into")
        a, b = weights[key][slot].float(), weights[f"{module_name}.lora_B"][slot].float()
        delta = config.scaling * (b @ a)
        linear.weight.copy_((linear.weight.float() + delta.to(linear.weight.device)).to(linear.weight.dtype))
    with atomic_directory(out_dir, marker="config.json") as tmp:
        base.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved MoA run directory (moa_config.json, moa_adapters.safetensors, base_model.json)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="'peft': every culture as a PEFT adapter + router + manifest; 'merged': one culture folded into the base")
    parser.add_argument("--culture", help="the culture to merge (--format merged only)")
    parser.add_argument("--output-dir", required=True, help="directory to write (replaced atomically)")


def run(args) -> int:
    try:
        if args.format == "merged":
            if args.culture is None:
                raise ValueError("--format merged needs --culture NAME (the culture whose adapter is folded into the base)")
            export_merged(args.model, args.culture, args.output_dir)
            print(f"merged culture {args.culture!r} into the base -> {args.output_dir}")
        else:
            if args.culture is not None:
                raise ValueError(f"--culture {args.culture!r} applies to --format merged only; --format peft exports every culture")
            manifest = export_peft(args.model, args.output_dir)
            print(f"{len(manifest['cultures'])} PEFT adapters, {ROUTER_FILE} and {MANIFEST_FILE} -> {args.output_dir}")
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"moa export: error: {e}", file=sys.stderr)
        return 2
    return 0
