"""Benchmarks. Each prints a table and writes JSON; timings are never asserted by tests."""

COMMANDS = {  # bench: (module, one-line help)
    "e2e": ("moa.bench.e2e", "end-to-end tokens/s: base model, MoA mixed batch, PEFT single and mixed adapters"),
    "kernels": ("moa.bench.kernels", "multi-LoRA kernel timings (triton/cpu/torch/gather_bmm/loop/roofline) or, "
                                     "with --compile-only, the AOT compile report"),
    "serve": ("moa.bench.serve", "serving under load: continuous batching (MoA, base) vs static batches vs one culture at a time"),
    "train": ("moa.bench.train", "training step time: MoA joint K-culture training vs one shared LoRA vs K separate runs"),
}
