"""Multi-LoRA kernel benchmark: the fused Triton op against torch baselines, forward and backward.

Providers: `triton` (moa's fused kernels; GPU only), `torch` (moa's torch path), `gather_bmm`
(gather every token's A and B, two bmms), `loop` (one masked matmul pair per adapter, as PEFT's
mixed-adapter batches do) and `roofline` (one `torch.mm` pair with a single adapter for all tokens:
the bound a mixed batch can at best reach). Modes: fwd (inference, accumulating into the base
output), bwd (gradients of x, A, B given a forward), fwd+bwd. Each sweep varies one of tokens,
hidden size, rank, adapters K or the adapter distribution (uniform, zipf, single) around a default
point. The plan (tokens grouped by adapter) is built once outside the timed region, as the model
builds it once per forward and shares it across layers.

`--compile-only` instead compiles every Triton kernel at its default config for `--targets`
(no GPU needed) and reports registers, spills, shared memory and tensor-core MMA use.
On a CPU the CPU providers are timed at reduced sizes; Triton timings need a GPU.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from moa.bench.common import print_table, stamp, time_interleaved, write_json
from moa.errors import UsageError

PROVIDERS = ("triton", "cpu", "torch", "gather_bmm", "loop", "roofline")
MODES = ("fwd", "bwd", "fwd+bwd")
DISTS = ("uniform", "zipf", "single")
SWEEPS = ("tokens", "hidden", "rank", "adapters", "dist")
GPU_DEFAULTS = dict(tokens="1,16,64,256,1024,4096,8192", hidden="4096,8192",
                    point="tokens=1024,hidden=4096,rank=16,adapters=32,dist=uniform",
                    dtype="bfloat16", warmup=10, repeat=100, gather_max_gb=16.0)
CPU_DEFAULTS = dict(tokens="1,16,64,256,1024", hidden="1024,2048",
                    point="tokens=256,hidden=1024,rank=16,adapters=32,dist=uniform",
                    dtype="float32", warmup=3, repeat=10, gather_max_gb=2.0)
CPU_NOTE = ("no CUDA device: only the CPU providers (cpu, torch, gather_bmm, loop, roofline) are timed, at reduced sizes; "
            "Triton timings need a GPU (on a CPU the kernels run only under the interpreter, whose speed means nothing)")


def _by_device(key: str) -> str:
    return f"(default: {GPU_DEFAULTS[key]} on a GPU, {CPU_DEFAULTS[key]} on a CPU)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options whose defaults depend on the device default to None here; `run` fills them in."""
    parser.add_argument("--compile-only", action="store_true", help="AOT compile report instead of timings")
    parser.add_argument("--targets", default="sm_80,sm_90", help="GPU targets of the compile report")
    parser.add_argument("--compile-dtypes", default="float16,bfloat16,float32", help="dtypes of the compile report")
    parser.add_argument("--compile-ranks", default="16,64", help="ranks of the compile report")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of " + ",".join(PROVIDERS))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help="comma-separated subset of " + ",".join(SWEEPS))
    parser.add_argument("--tokens", help="token counts of the tokens sweep " + _by_device("tokens"))
    parser.add_argument("--hidden", help="hidden sizes (d_in = d_out) of the hidden sweep " + _by_device("hidden"))
    parser.add_argument("--ranks", default="8,16,64", help="ranks of the rank sweep")
    parser.add_argument("--adapters", default="1,8,32,128", help="adapter counts K of the adapters sweep")
    parser.add_argument("--dists", default=",".join(DISTS), help="adapter distributions of the dist sweep")
    parser.add_argument("--point", help="the values the other axes hold during a sweep " + _by_device("point"))
    parser.add_argument("--top-k", type=int, default=1, help="adapters per token (top-k routing, weights random)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help=_by_device("dtype"))
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--warmup", type=int,
                        help="warm-up per case: calls on a CPU, milliseconds on a GPU (do_bench) " + _by_device("warmup"))
    parser.add_argument("--repeat", type=int,
                        help="timing per case: calls on a CPU, milliseconds on a GPU (do_bench) " + _by_device("repeat"))
    parser.add_argument("--gather-max-gb", type=float,
                        help="skip gather_bmm where its gathered weights would exceed this " + _by_device("gather_max_gb"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="bench-kernels.json", help="where to write the results")
    parser.add_argument("--plots", default=None, help="folder for PNG plots (default: next to --json)")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _subset(text: str, allowed: tuple, what: str) -> list[str]:
    items = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise UsageError(f"unknown {what} {bad}: expected a subset of {allowed}")
    return items


def _point(text: str) -> dict:
    point = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in SWEEPS:
            raise UsageError(f"unknown --point key {key!r}: expected one of {SWEEPS}")
        point[key] = value if key == "dist" else int(value)
    missing = set(SWEEPS) - set(point)
    if missing:
        raise UsageError(f"--point lacks {sorted(missing)}")
    return point


# ---------------------------------------------------------------------------------------------
# Problem setup and providers.
# ---------------------------------------------------------------------------------------------

def make_ids(dist: str, tokens: int, adapters: int, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """Adapter ids [T] or [T, k]: uniform, Zipf (p(a) ~ 1/(a+1)^1.1, shuffled order) or one adapter."""
    if dist == "uniform":
        first = torch.randint(0, adapters, (tokens,), generator=gen)
    elif dist == "zipf":
        p = 1.0 / torch.arange(1, adapters + 1, dtype=torch.float64) ** 1.1
        first = torch.multinomial(p, tokens, replacement=True, generator=gen)
    elif dist == "single":
        first = torch.zeros(tokens, dtype=torch.long)
    else:
        raise UsageError(f"unknown distribution {dist!r}: expected one of {DISTS}")
    if top_k == 1:
        return first
    cols = [first]
    for j in range(1, top_k):
        step = torch.randint(1, max(adapters, 2), (tokens,), generator=gen)
        cols.append(torch.where(torch.tensor(adapters > j), (first + step) % adapters, torch.full_like(first, -1)))
    return torch.stack(cols, 1)


def gather_bmm(x, a, b, ids, weights, scaling, base_out):
    """Every token's A and B gathered ([T, r, d]), then two batched matvecs; -1 masked out."""
    ids2 = ids[:, None] if ids.dim() == 1 else ids
    out = base_out if base_out is not None else x.new_zeros(x.shape[0], b.shape[1])
    for j in range(ids2.shape[1]):
        col = ids2[:, j]
        safe = col.clamp(min=0)
        h = torch.bmm(a[safe], x[:, :, None])  # [T, r, 1]
        coef = (col >= 0).to(x.dtype) * scaling * (weights[:, j] if weights is not None else 1.0)
        y = torch.bmm(b[safe], h)[:, :, 0] * coef[:, None]
        out = out.add_(y) if base_out is not None and not torch.is_grad_enabled() else out + y
    return out


def loop(x, a, b, ids, weights, scaling, base_out):
    """One masked matmul pair per adapter present, as PEFT runs a mixed-adapter batch."""
    ids2 = ids[:, None] if ids.dim() == 1 else ids
    out = base_out if base_out is not None else x.new_zeros(x.shape[0], b.shape[1])
    if base_out is None or torch.is_grad_enabled():
        out = out.clone()
    for adapter in torch.unique(ids2).tolist():
        if adapter < 0:
            continue
        for j in range(ids2.shape[1]):
            rows = (ids2[:, j] == adapter).nonzero()[:, 0]
            if rows.numel() == 0:
                continue
            y = (x[rows] @ a[adapter].t()) @ b[adapter].t() * scaling
            if weights is not None:
                y = y * weights[rows, j, None]
            out = out.index_add(0, rows, y) if torch.is_grad_enabled() else out.index_add_(0, rows, y)
    return out


def roofline(x, a, b, ids, weights, scaling, base_out):
    """All tokens through adapter 0: two plain matmuls (the single-LoRA bound)."""
    h = x @ a[0].t()
    if base_out is not None and not torch.is_grad_enabled():
        return base_out.addmm_(h, b[0].t(), alpha=scaling)
    y = (h @ b[0].t()) * scaling
    return y if base_out is None else base_out + y


def _provider_fn(name, plan):
    from moa.kernels import multi_lora

    if name in ("triton", "cpu", "torch"):
        return lambda x, a, b, ids, w, s, base: multi_lora(x, a, b, plan, weights=w, scaling=s, base_out=base, backend=name)
    return {"gather_bmm": gather_bmm, "loop": loop, "roofline": roofline}[name]


def forward_bytes(tokens, hidden, rank, used, top_k, elem) -> int:
    """Bytes a fused forward must move at least: x, the used adapters' A and B, base in and out."""
    return elem * (tokens * hidden + used * rank * 2 * hidden + 2 * tokens * hidden) + 4 * tokens * top_k


def measure_bandwidth(device: str) -> float:
    """GB/s of a large device-to-device copy (read + write counted)."""
    n = (1 << 28) if device.startswith("cuda") else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _time({"copy": lambda: dst.copy_(src)}, device, warmup=3, repeat=10)["copy"]["ms_median"]
    return 2 * n / (ms * 1e-3) / 1e9


def _time(fns: dict, device: str, warmup: int, repeat: int) -> dict:
    if device.startswith("cuda"):
        import triton.testing

        out = {}
        for name, fn in fns.items():
            p20, p50, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=repeat, quantiles=[0.2, 0.5, 0.8])
            out[name] = {"ms_p20": p20, "ms_median": p50, "ms_p80": p80}
        return out
    return time_interleaved(fns, warmup=warmup, repeat=repeat)


def run_case(case: dict, providers: list[str], modes: list[str], args, gen: torch.Generator) -> list[dict]:
    from moa.kernels import plan_adapters

    dev, dtype = args.device, getattr(torch, args.dtype)
    T, d, r, K = case["tokens"], case["hidden"], case["rank"], case["adapters"]
    ids = make_ids(case["dist"], T, K, args.top_k, gen).to(dev)
    x = torch.randn(T, d, generator=gen).to(dev, dtype)
    # stored as MoALinear stores them (A^T [K, d, r], B^T [K, r, d]), passed as the op's [K, r, d] / [K, d, r] views
    a = (torch.randn(K, d, r, generator=gen) * d ** -0.5).to(dev, dtype).transpose(1, 2)
    b = (torch.randn(K, r, d, generator=gen) * r ** -0.5).to(dev, dtype).transpose(1, 2)
    w = torch.rand(ids.shape, generator=gen).to(dev, dtype) if args.top_k > 1 else None
    base = torch.randn(T, d, generator=gen).to(dev, dtype)
    plan = plan_adapters(ids, K)
    grad = torch.randn(T, d, generator=gen).to(dev, dtype)
    gather_gb = 2 * T * args.top_k * r * d * dtype.itemsize / 1e9
    rows = []
    for mode in modes:
        fns, skipped = {}, {}
        for name in providers:
            if name == "gather_bmm" and gather_gb > args.gather_max_gb:
                skipped[name] = f"gathered weights {gather_gb:.1f} GB > --gather-max-gb"
                continue
            fn = _provider_fn(name, plan)
            if mode == "fwd":
                def call(fn=fn):
                    with torch.no_grad():
                        fn(x, a, b, ids, w, 2.0, base)
            else:
                leaves = [t.detach().requires_grad_(True) for t in (x, a, b)]

                def forward(fn=fn, leaves=leaves):
                    return fn(*leaves, ids, w, 2.0, None)

                if mode == "bwd":
                    y = forward()

                    def call(y=y, leaves=leaves):
                        torch.autograd.grad(y, leaves, grad, retain_graph=True)
                else:
                    def call(forward=forward, leaves=leaves):
                        torch.autograd.grad(forward(), leaves, grad)
            fns[name] = call
        stats = _time(fns, dev, args.warmup, args.repeat) if fns else {}
        fwd_bytes = forward_bytes(T, d, r, len(plan.adapters), args.top_k, dtype.itemsize)
        for name in providers:
            row = {**case, "mode": mode, "provider": name, "dtype": args.dtype, "top_k": args.top_k}
            if name in stats:
                row.update(stats[name])
                if mode == "fwd":
                    row["gbps"] = fwd_bytes / (stats[name]["ms_median"] * 1e-3) / 1e9
                    row["bw_frac"] = row["gbps"] / args.bandwidth_gbps
                if "roofline" in stats:
                    row["x_roofline"] = stats[name]["ms_median"] / stats["roofline"]["ms_median"]
            else:
                row["skipped"] = skipped.get(name, "not run")
            rows.append(row)
    return rows


def cases(args) -> list[tuple[str, dict]]:
    point = _point(args.point)
    axes = {"tokens": _ints(args.tokens), "hidden": _ints(args.hidden), "rank": _ints(args.ranks),
            "adapters": _ints(args.adapters), "dist": _subset(args.dists, DISTS, "distributions")}
    out = []
    for sweep in _subset(args.sweeps, SWEEPS, "sweeps"):
        for value in axes[sweep]:
            out.append((sweep, {**point, sweep: value}))
    return out


def plot(rows: list[dict], folder: Path) -> list[Path]:
    from moa.plots import pyplot, save

    plt = pyplot()

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for sweep in dict.fromkeys(r["sweep"] for r in rows):
        modes = list(dict.fromkeys(r["mode"] for r in rows if r["sweep"] == sweep))
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            sel = [r for r in rows if r["sweep"] == sweep and r["mode"] == mode and "ms_median" in r]
            for provider in dict.fromkeys(r["provider"] for r in sel):
                pts = [r for r in sel if r["provider"] == provider]
                xs = [str(r[sweep]) for r in pts] if sweep == "dist" else [r[sweep] for r in pts]
                ax.errorbar(xs, [r["ms_median"] for r in pts],
                            yerr=[[r["ms_median"] - r["ms_p20"] for r in pts], [r["ms_p80"] - r["ms_median"] for r in pts]],
                            marker="o", capsize=2, label=provider)
            if sweep != "dist":
                ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(sweep)
            ax.set_ylabel("ms (median, p20-p80)")
            ax.set_title(f"{mode}")
            ax.legend(fontsize=8)
        fig.suptitle(f"multi-LoRA kernels: {sweep} sweep")
        written.append(save(fig, folder / f"kernels_{sweep}.png", dpi=110))
    return written


def run_compile_report(args) -> int:
    from tqdm import tqdm

    from moa.kernels.multi_lora.compile import compile_report, format_report

    dtypes = [getattr(torch, v) for v in args.compile_dtypes.split(",")]
    rows = compile_report(targets=[t.strip() for t in args.targets.split(",")], dtypes=dtypes,
                          ranks=_ints(args.compile_ranks), progress=lambda jobs: tqdm(jobs, desc="compile"))
    table = format_report(rows)
    print(table)
    bad = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    print(f"{len(rows)} compiles, {len(bad)} with spills")
    write_json(args.json, {"stamp": stamp(), "kind": "compile-report", "rows": rows, "table": table})
    return 1 if bad else 0


def run(args) -> int:
    from moa.atomic import check_output_file
    from moa.base_model import resolve_device

    check_output_file(args.json, '"stamp": {')
    args.device = resolve_device(args.device)
    for key, value in (GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.compile_only:
        return run_compile_report(args)
    from tqdm import tqdm

    providers = _subset(args.providers, PROVIDERS, "providers")
    modes = _subset(args.modes, MODES, "modes")
    notes = []
    if not args.device.startswith("cuda") and "triton" in providers:
        providers = [p for p in providers if p != "triton"]
        notes.append(CPU_NOTE)
        print(CPU_NOTE)
    if args.device.startswith("cuda"):  # the CPU backend's kernel serves CPU tensors only
        providers = [p for p in providers if p != "cpu"]
    args.bandwidth_gbps = measure_bandwidth(args.device)
    print(f"measured copy bandwidth: {args.bandwidth_gbps:.1f} GB/s")
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for sweep, case in tqdm(cases(args), desc="kernels"):
        for row in run_case(case, providers, modes, args, gen):
            rows.append({"sweep": sweep, **row})
    columns = [("sweep", "sweep", ""), ("mode", "mode", ""), ("tokens", "T", "d"), ("hidden", "hidden", "d"),
               ("rank", "r", "d"), ("adapters", "K", "d"), ("dist", "dist", ""), ("provider", "provider", ""),
               ("ms_median", "ms", ".3f"), ("ms_p20", "p20", ".3f"), ("ms_p80", "p80", ".3f"),
               ("x_roofline", "x roofline", ".2f"), ("gbps", "GB/s", ".1f"), ("bw_frac", "of bw", ".2f")]
    table = print_table(rows, columns)
    plots = plot(rows, Path(args.plots) if args.plots else Path(args.json).resolve().parent)
    for p in plots:
        print(f"wrote {p}")
    write_json(args.json, {"stamp": stamp(), "kind": "kernel-timings", "notes": notes,
                           "bandwidth_gbps": args.bandwidth_gbps, "providers": providers, "modes": modes,
                           "rows": rows, "table": table, "plots": [str(p) for p in plots]})
    return 0
