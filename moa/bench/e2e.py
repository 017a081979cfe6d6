"""End-to-end forward throughput on a Llama-style model built from a config.

Providers: `base` (the model alone), `moa` (MoA, a mixed-culture batch, oracle routing: no gate
runs), `moa_router` (the same MoA model, per-token routing: every layer's gate runs, so its time
over `moa`'s is the router's cost), `peft_single` (PEFT, one adapter for every row) and `peft_mixed`
(PEFT, `adapter_names=` over the same mixed batch). Phases: `decode` (one new token per row over a
KV cache), `prefill`, and `route` (MoA's `route_probs` over the prefill prompts, what a serving
front runs to pick each request's culture, against the base model's prefill of the same prompts).
The providers run in turn, one call each per round; "vs base" is the median over rounds of the base
model's time over the provider's (a drift of the machine's speed cancels within a round).
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch  # peft, transformers and the model load in the functions that use them: `--help` stays fast

from moa.bench.common import add_model_arguments, llama_base, paired_ratio, print_table, stamp, time_interleaved, write_json
from moa.errors import UsageError

PROVIDERS = ("base", "moa", "moa_router", "peft_single", "peft_mixed")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--decode-batch", type=int, default=32)
    parser.add_argument("--decode-context", type=int, default=64, help="tokens already in the KV cache")
    parser.add_argument("--prefill-batch", type=int, default=8)
    parser.add_argument("--prefill-length", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=20, help="timed rounds for decode (prefill: half as many, at least 5)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of " + ",".join(PROVIDERS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="bench-e2e.json", help="where to write the results")


def providers(text: str) -> set[str]:
    """The providers a --providers value names, each one of PROVIDERS."""
    wanted = {name.strip() for name in text.split(",") if name.strip()}
    unknown = wanted - set(PROVIDERS)
    if unknown or not wanted:
        raise UsageError(f"unknown providers {sorted(unknown) or text!r}: expected a non-empty subset of {PROVIDERS}")
    return wanted


def build_models(args) -> dict:
    from peft import LoraConfig, get_peft_model
    import moa

    dtype = getattr(torch, args.dtype)
    base = llama_base(args).to(args.device, dtype)
    names = [f"culture{i}" for i in range(args.cultures)]
    wanted = providers(args.providers)
    models = {}
    if "base" in wanted:
        models["base"] = base
    if wanted & {"moa", "moa_router"}:
        mixed = moa.MoAForCausalLM.from_base(copy.deepcopy(base), moa.MoAConfig(cultures=names, r=args.rank, alpha=2 * args.rank,
                                                                              target_modules=TARGETS)).eval()
        with torch.no_grad():
            for layer in mixed.lora_layers.values():
                layer.lora_B.normal_(std=0.01)
        models.update({name: mixed for name in ("moa", "moa_router") if name in wanted})
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, init_lora_weights=False)
    if "peft_single" in wanted:
        models["peft_single"] = get_peft_model(copy.deepcopy(base), lora).eval()
    if "peft_mixed" in wanted:
        peft_mixed = get_peft_model(copy.deepcopy(base), lora, adapter_name=names[0])
        for name in names[1:]:
            peft_mixed.add_adapter(name, lora)
        models["peft_mixed"] = peft_mixed.eval()
    return models


def forward_fn(name, model, input_ids, cultures, names, cache=None):
    """A zero-argument closure running one forward of `model` the way provider `name` does."""
    from moa.compat import cache_kwargs

    kwargs = {"input_ids": input_ids, "use_cache": cache is not None, **cache_kwargs(cache)}
    if name == "moa":
        return lambda: model(culture_ids=cultures, routing="oracle", **kwargs)
    if name == "moa_router":
        return lambda: model(routing="router", **kwargs)
    if name == "peft_mixed":
        adapter_names = [names[c] for c in cultures.tolist()]
        return lambda: model(adapter_names=adapter_names, **kwargs)
    return lambda: model(**kwargs)


def _vs_base(stats: dict, name: str) -> float | None:
    """Speed relative to the base model: the median over rounds of base time / this provider's time."""
    return paired_ratio(stats["base"], stats[name]) if "base" in stats else None


def run(args) -> int:
    from transformers import DynamicCache

    from moa.atomic import check_output_file
    from moa.base_model import resolve_device

    check_output_file(args.json, '"bench": "e2e"')
    providers(args.providers)
    args.device = resolve_device(args.device)
    print(f"[e2e] building {args.providers} on {args.device} ({args.dtype})", file=sys.stderr, flush=True)
    torch.manual_seed(args.seed)
    models = build_models(args)
    names = [f"culture{i}" for i in range(args.cultures)]
    results = []
    with torch.inference_mode():
        # decode: one token per row after a KV cache of `decode_context` tokens; the new token is cropped off after each step
        batch, context = args.decode_batch, args.decode_context
        cultures = torch.randint(0, args.cultures, (batch,), device=args.device)
        prompt = torch.randint(0, args.vocab, (batch, context), device=args.device)
        step = torch.randint(0, args.vocab, (batch, 1), device=args.device)
        print(f"[e2e] timing decode: {len(models)} providers x {args.repeat} rounds", file=sys.stderr, flush=True)
        decode = {}
        for name, model in models.items():
            cache = DynamicCache()
            forward_fn(name, model, prompt, cultures, names, cache)()
            one_step = forward_fn(name, model, step, cultures, names, cache)
            decode[name] = lambda one_step=one_step, cache=cache: (one_step(), cache.crop(-1))
        stats = time_interleaved(decode, repeat=args.repeat)
        for name in decode:
            results.append({"phase": "decode", "provider": name, "tokens": batch, **stats[name],
                            "tokens_per_s": batch / stats[name]["ms_median"] * 1e3, "vs_base": _vs_base(stats, name)})
        # prefill: a whole mixed batch of prompts, no cache
        batch, length = args.prefill_batch, args.prefill_length
        cultures = torch.randint(0, args.cultures, (batch,), device=args.device)
        prompt = torch.randint(0, args.vocab, (batch, length), device=args.device)
        prefill = {name: forward_fn(name, model, prompt, cultures, names) for name, model in models.items()}
        print(f"[e2e] timing prefill: {len(models)} providers x {max(5, args.repeat // 2)} rounds", file=sys.stderr, flush=True)
        stats = time_interleaved(prefill, warmup=2, repeat=max(5, args.repeat // 2))
        for name in prefill:
            results.append({"phase": "prefill", "provider": name, "tokens": batch * length, **stats[name],
                            "tokens_per_s": batch * length / stats[name]["ms_median"] * 1e3, "vs_base": _vs_base(stats, name)})
        # route: the router alone on the same prompts (embeddings and gates), paired with the base model's prefill
        mixed = models.get("moa", models.get("moa_router"))
        if mixed is not None:
            route = {"route_probs": lambda: mixed.route_probs(prompt)}
            if "base" in prefill:
                route = {"base": prefill["base"], **route}
            stats = time_interleaved(route, warmup=2, repeat=max(5, args.repeat // 2))
            results.append({"phase": "route", "provider": "route_probs", "tokens": batch * length, **stats["route_probs"],
                            "tokens_per_s": batch * length / stats["route_probs"]["ms_median"] * 1e3,
                            "vs_base": _vs_base(stats, "route_probs")})
    table = print_table(results, [("phase", "phase", "s"), ("provider", "provider", "s"), ("tokens", "tokens", "d"),
                                  ("ms_median", "ms (median)", ".2f"), ("ms_p20", "p20", ".2f"), ("ms_p80", "p80", ".2f"),
                                  ("tokens_per_s", "tokens/s", ".0f"), ("vs_base", "vs base (paired)", ".3f")])
    write_json(args.json, {"bench": "e2e", **stamp(), "args": vars(args), "results": results, "table": table})
    return 0
