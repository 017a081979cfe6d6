"""Export a saved MoA run for tools that know nothing of moa: PEFT adapters + router, or one merged model.

Usage: moa export --model RUN_DIR --format peft --output-dir OUT writes OUT/<culture>/ for every
culture (a PEFT LoRA adapter: `peft.PeftModel.from_pretrained(base, OUT/<culture>)`),
OUT/router.safetensors (the per-layer gates, keys routers.<layer>.gate.weight / .bias) and
OUT/manifest.json (cultures in id order with their adapter directories, the base model spec, the
MoA config and how to apply the router). moa export --model RUN_DIR --format merged --culture NAME
--output-dir OUT writes one transformers model directory with that culture's LoRA folded into the
base weights (W + scaling * B @ A), loadable by `AutoModelForCausalLM.from_pretrained(OUT)`; the base
must not be quantized. moa export --model RUN_DIR --format vllm --output-dir OUT writes the peft export
plus OUT/vllm_serve.sh, the `vllm serve BASE --served-model-name base --dtype D --enable-lora --lora-modules
'{"name": <culture>, "path": OUT/<culture>}' ...` command that serves every culture under its name (printed
too), checked against vLLM 0.33.0's source. A base built from a config is written to OUT/base (with its
tokenizer), a base directory's byte tokenizer to OUT/tokenizer; an nf4 base is quantized by vLLM as it
loads it (--quantization bitsandbytes, through the vllm-bnb-plugin package); fp4 and int8 bases are refused,
as vLLM cannot quantize a base that way. Every export is built under a temporary name and renamed into place.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from moa import saved_run
from moa.atomic import atomic_directory, atomic_file, check_output_dir
from moa.errors import UsageError

FORMATS = ("peft", "merged", "vllm")
ROUTER_FILE = "router.safetensors"
MANIFEST_FILE = "manifest.json"
VLLM_SCRIPT = "vllm_serve.sh"
VLLM_BASE_DIR = "base"  # a base built from a config, written for vLLM
VLLM_TOKENIZER_DIR = "tokenizer"  # the byte tokenizer of a base directory, written for vLLM
VLLM_CHECKED = "vLLM 0.33.0 and vllm-bnb-plugin 0.0.3"  # whose source the command was checked against
VLLM_BNB_INSTALL = ("vllm-bnb-plugin (pip install vllm-bnb-plugin, beside vLLM): vLLM >= 0.28 quantizes with "
                    "bitsandbytes only through it")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts (vllm/config/lora.py)

ROUTER_HOW_TO_APPLY = {
    "gate": "Per decoder layer l (in order, routers.<l>), with W = routers.<l>.taps.weight (window*dim rows, row block j "
            "W_j = W[j*dim:(j+1)*dim]), window and dim from moa_config.json (router_window, router_dim): let x_t be the "
            "hidden state entering the first decoder layer at position t (the token embeddings; every layer's gate reads "
            "this same input) and m_t the attention mask (1 token, 0 padding). "
            "h_t = m_t * rms_norm(x_t) without weight, in float32 (eps = float32 machine epsilon), and h_t = 0 for t < 0; "
            "f_t = tanh(routers.<l>.bias + sum_{j<window} W_j @ h_{t-j}); "
            "score_s = 10 * tanh(sqrt(dim) * (routers.<l>.score.weight @ f_s) / 10), w_s = m_s * exp(score_s - 10); "
            "p_t = sum_{s<=t} w_s f_s / sum_{s<=t} w_s, the attention-weighted causal mean over the non-padding tokens "
            "so far (under a KV cache keep the two running sums and the last window-1 positions' W_j @ h); "
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
        raise UsageError(f"culture {culture!r} cannot name an adapter directory: expected a plain file name "
                         f"other than {ROUTER_FILE!r} and {MANIFEST_FILE!r}")
    return culture


def export_peft(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> dict:
    """Write every culture as a PEFT LoRA adapter, the router weights and a manifest; returns the manifest."""
    from moa.base_model import load_moa

    check_output_dir(out_dir, MANIFEST_FILE, inputs=[run_dir], overwrite=overwrite)
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
    with atomic_directory(out_dir, marker=MANIFEST_FILE, overwrite=overwrite) as tmp:
        for culture, name in zip(config.cultures, names):
            model.export_peft_adapter(culture, tmp / name)
        save_file(router, str(tmp / ROUTER_FILE), metadata={"format": "pt", "cultures": json.dumps(config.cultures, allow_nan=False)})
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return manifest


@torch.no_grad()
def export_merged(run_dir: str | Path, culture: str, out_dir: str | Path, overwrite: bool = False) -> None:
    """Write the base model with one culture's LoRA folded in (W + scaling * B @ A) as a transformers directory."""
    from torch import nn

    from moa.base_model import load_base_model

    check_output_dir(out_dir, "config.json", inputs=[run_dir], overwrite=overwrite)
    config, spec = saved_run.read(run_dir)
    slot = config.culture_id(culture, base=False)
    if spec.quantization is not None:
        raise UsageError(f"--format merged needs an unquantized base, but {run_dir} has quantization "
                         f"{spec.quantization!r}: folding a LoRA into quantized weights would requantize them; "
                         f"export --format peft instead, or merge into the full-precision base")
    base, tokenizer = load_base_model(spec)
    weights = saved_run.read_weights(run_dir, config)
    for key in sorted(k for k in weights if k.endswith(".lora_A")):
        module_name = key[:-len(".lora_A")]
        try:
            linear = base.get_submodule(module_name)
        except AttributeError:
            raise UsageError(f"{Path(run_dir) / saved_run.WEIGHTS_NAME}: adapter for {module_name!r}, which the base model "
                             f"{type(base).__name__} does not have") from None
        if not isinstance(linear, nn.Linear):
            raise UsageError(f"{module_name} is a {type(linear).__name__}, expected torch.nn.Linear to merge into")
        a, b = weights[key][slot].float(), weights[f"{module_name}.lora_B"][slot].float()
        delta = config.scaling * (b @ a)
        linear.weight.copy_((linear.weight.float() + delta.to(linear.weight.device)).to(linear.weight.dtype))
    with atomic_directory(out_dir, marker="config.json", overwrite=overwrite) as tmp:
        base.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def vllm_command(base: str, adapters: dict[str, Path], rank: int, options: tuple[str, ...] = ()) -> str:
    """The `vllm serve` command line serving `base` (as model `base`, with `options`) and each adapter under its culture's name.

    Each --lora-modules item is vLLM's JSON form {"name": ..., "path": ...}, shell-quoted: vLLM reads an item without
    a comma as name=path (vllm/entrypoints/common/cli_args.py, LoRAParserAction), which a ',' or '=' in a name or
    path would break.
    """
    import shlex

    max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
    if max_rank is None:
        raise UsageError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")
    modules = " ".join(shlex.quote(json.dumps({"name": name, "path": str(path)})) for name, path in adapters.items())
    return (f"vllm serve {shlex.quote(base)} --served-model-name base {' '.join(map(shlex.quote, options))}"
            f"{' ' if options else ''}--enable-lora --lora-modules {modules} --max-lora-rank {max_rank} --max-loras {len(adapters)}")


def _vllm_quantization(spec) -> tuple[str, ...]:
    """The vLLM options that quantize the base as moa did; a quantization vLLM cannot reproduce is refused."""
    if spec.quantization is None:
        return ()
    if spec.quantization == "nf4":  # vllm-bnb-plugin quantizes while loading: nf4, double quantization, as moa's nf4
        return ("--quantization", "bitsandbytes")
    reason = {"fp4": "vLLM quantizes a full-precision base while loading it to nf4 only, never fp4",
              "int8": "vLLM quantizes a full-precision base while loading it to 4-bit nf4 only; it reads 8-bit "
                      "bitsandbytes only from a pre-quantized checkpoint, which moa does not write"}[spec.quantization]
    raise UsageError(f"--format vllm cannot serve a base with quantization {spec.quantization!r}: {reason}, so the adapters "
                     f"would run on a different base than they were trained on; serve the run with `moa serve` (or load "
                     f"--format peft with transformers + PEFT), or train on an nf4 or unquantized base to serve it with vLLM")


def _local_or_hub(name: str) -> Path | str:
    """A local directory as an absolute path; a Hub id as it is."""
    return Path(name).resolve() if Path(name).is_dir() else name


def export_vllm(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> str:
    """The peft export plus OUT/vllm_serve.sh, the base's tokenizer where vLLM would not find it, and OUT/base for a
    base built from a config; returns the command."""
    from moa.base_model import load_base_model, load_tokenizer

    config, spec = saved_run.read(run_dir)
    clash = sorted(set(config.cultures) & {VLLM_SCRIPT, VLLM_TOKENIZER_DIR})
    if clash:
        raise UsageError(f"culture(s) {clash} cannot be exported for vLLM: {VLLM_SCRIPT!r} and {VLLM_TOKENIZER_DIR!r} "
                         f"name files of the export; rename the culture")
    options = ["--dtype", spec.dtype, *_vllm_quantization(spec)]
    if spec.trust_remote_code:
        options.append("--trust-remote-code")
    manifest = export_peft(run_dir, out_dir, overwrite)
    out_dir = Path(out_dir).resolve()
    if spec.path is None:  # a tiny base from a config, written at full precision (vLLM quantizes it as it loads it)
        base = out_dir / VLLM_BASE_DIR
        model, tokenizer = load_base_model(replace(spec, quantization=None))
        with atomic_directory(base, marker="config.json") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    else:  # a local directory, or a Hub id that vLLM resolves through the same cache, at the run's revision
        base = _local_or_hub(spec.path)
        if spec.revision is not None:
            options += ["--revision", spec.revision]
        if spec.tokenizer == "byte":  # no files of its own: written for vLLM to load
            tokenizer = out_dir / VLLM_TOKENIZER_DIR
            with atomic_directory(tokenizer, marker="tokenizer_config.json") as tmp:
                load_tokenizer(spec).save_pretrained(tmp)
        else:
            tokenizer = _local_or_hub(spec.tokenizer or spec.path)
        if tokenizer != base:
            options += ["--tokenizer", str(tokenizer)]
            if spec.revision is not None and isinstance(tokenizer, str):  # vLLM would read it at the model's revision
                options += ["--tokenizer-revision", "main"]
    command = vllm_command(str(base), {c["name"]: out_dir / c["adapter_dir"] for c in manifest["cultures"]},
                           config.r, tuple(options))
    with atomic_file(out_dir / VLLM_SCRIPT) as f:
        f.write(f"#!/bin/sh\n# serve every culture of {str(Path(run_dir).resolve())!r} as a vLLM LoRA module\n"
                f"# checked against the source of {VLLM_CHECKED}\n")
        if spec.quantization is not None:
            f.write(f"# a 4-bit base needs {VLLM_BNB_INSTALL}\n")
        f.write(f"exec {command} \"$@\"\n")
    (out_dir / VLLM_SCRIPT).chmod(0o755)
    return command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved MoA run directory (moa_config.json, moa_adapters.safetensors, base_model.json)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="'peft': every culture as a PEFT adapter + router + manifest; 'merged': one culture folded into the base; "
                             "'vllm': the peft export plus the `vllm serve` command serving every culture (vllm_serve.sh)")
    parser.add_argument("--culture", help="the culture to merge (--format merged only)")
    parser.add_argument("--output-dir", required=True, help="directory to write (atomically): new, empty or an earlier "
                                                            "export of the same format; never the run's own directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an --output-dir that holds anything else")


def run(args) -> int:
    if args.format == "merged":
        if args.culture is None:
            raise UsageError("--format merged needs --culture NAME (the culture whose adapter is folded into the base)")
        export_merged(args.model, args.culture, args.output_dir, args.overwrite)
        print(f"merged culture {args.culture!r} into the base -> {args.output_dir}")
    elif args.culture is not None:
        raise UsageError(f"--culture {args.culture!r} applies to --format merged only; --format {args.format} exports every culture")
    elif args.format == "vllm":
        command = export_vllm(args.model, args.output_dir, args.overwrite)
        notes = [line for line in (Path(args.output_dir) / VLLM_SCRIPT).read_text().splitlines() if line.startswith("# ")]
        print("\n".join([f"PEFT adapters and {VLLM_SCRIPT} -> {args.output_dir}", *notes, command]))
    else:
        manifest = export_peft(args.model, args.output_dir, args.overwrite)
        print(f"{len(manifest['cultures'])} PEFT adapters, {ROUTER_FILE} and {MANIFEST_FILE} -> {args.output_dir}")
    return 0
