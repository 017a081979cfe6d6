"""Ahead-of-time compile report: every Triton kernel of `multi_lora` at its default config, for given GPUs, on any machine.

`triton.compile` with a `GPUTarget` needs no GPU; the triton wheel ships `ptxas` and `cuobjdump`.
For each kernel and target the report gives registers per thread and spill bytes (`ptxas -v` on the
PTX Triton produced), shared memory (Triton's metadata), and whether tensor-core MMA instructions
were emitted: `mma.sync` / `wgmma.mma_async` in the PTX, HMMA / HGMMA in the SASS.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import triton_backend as backend

TARGETS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}
_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass
class KernelSpec:
    """One kernel at one config: `args` maps every argument to a type ("*fp16", "i32") or a constexpr value.

    A type may carry Triton's runtime specialisation as a suffix, ":16" (divisible by 16) or ":1"
    (equal to 1, compiled as a constant), as the launcher sees for contiguous tensors.
    """

    name: str
    kernel: str
    path: str  # "sgmv" or "bgmv": which dispatch path runs it
    args: dict
    num_warps: int
    num_stages: int = 3
    notes: dict = field(default_factory=dict)


def _strip(cfg: dict) -> tuple[dict, int, int]:
    cfg = dict(cfg)
    return cfg, cfg.pop("num_warps"), cfg.pop("num_stages", 3)


def default_specs(dtype: torch.dtype = torch.float16, rank: int = 16, hidden: int = 4096,
                  block_m: int = 64) -> list[KernelSpec]:
    """The kernels as the launchers run them for a [T, hidden] batch, rank `rank`, many tokens per adapter."""
    w = "*" + _TYPE[dtype]
    prec = backend.dot_precision(dtype)
    tables = {n: "*i32:16" for n in ("tile_adapter_ptr", "tile_start_ptr", "tile_end_ptr", "token_ptr", "slot_ptr")}
    chunk_tables = {n: "*i32:16" for n in ("chunk_adapter_ptr", "chunk_start_ptr", "chunk_end_ptr", "token_ptr", "slot_ptr")}
    specs = []

    cfg, nw, ns = _strip(backend.config_sgmv_shrink(rank, hidden, dtype, block_m))
    specs.append(KernelSpec("sgmv_shrink", "sgmv_shrink_kernel", "sgmv", {
        "x_ptr": w + ":16", "w_ptr": w + ":16", "h_ptr": "*fp32:16", **tables,
        "d_in": "i32:16", "rank": "i32:16", "stride_xt": "i32:16", "stride_xd": 1,
        "stride_wk": "i32:16", "stride_wr": "i32:16", "stride_wd": 1, "stride_hn": "i32:16",
        **cfg, "DOT_PRECISION": prec}, nw, ns))

    cfg, nw, ns = _strip(backend.config_sgmv_expand(rank, hidden, dtype, block_m))
    specs.append(KernelSpec("sgmv_expand", "sgmv_expand_kernel", "sgmv", {
        "h_ptr": "*fp32:16", "w_ptr": w + ":16", "out_ptr": w + ":16", "coef_ptr": "*fp32:16", **tables,
        "d_out": "i32:16", "rank": "i32:16", "stride_hn": "i32:16", "stride_wk": "i32:16", "stride_wn": "i32:16",
        "stride_wr": 1, "stride_ot": "i32:16", "stride_od": 1, "HAS_COEF": True, **cfg, "DOT_PRECISION": prec}, nw, ns))

    cfg, nw, ns = _strip(backend.config_segment_outer(rank, hidden, dtype))
    specs.append(KernelSpec("segment_outer", "segment_outer_kernel", "sgmv+bgmv (backward)", {
        "p_ptr": "*fp32:16", "q_ptr": w + ":16", "g_ptr": "*fp32:16", "coef_ptr": "*fp32:16", **chunk_tables,
        "width": "i32:16", "rank": "i32:16", "stride_pn": "i32:16", "stride_qt": "i32:16", "stride_qd": 1,
        "stride_gk": "i32:16", "stride_gr": "i32:16", "stride_gd": 1,
        "HAS_COEF": True, "ATOMIC": True, **cfg, "DOT_PRECISION": prec}, nw, ns))

    cfg, nw, ns = _strip(backend.config_bgmv_shrink(rank, hidden, dtype))
    specs.append(KernelSpec("bgmv_shrink", "bgmv_shrink_kernel", "bgmv", {
        "x_ptr": w + ":16", "w_ptr": w + ":16", "h_ptr": "*fp32:16",
        "ids_ptr": "*i32:16", "d_in": "i32:16", "rank": "i32:16", "top_k": 1, "split_len": "i32:16",
        "stride_xt": "i32:16", "stride_xd": 1, "stride_wk": "i32:16", "stride_wr": "i32:16", "stride_wd": 1,
        "stride_hn": "i32:16", "ATOMIC": True, **cfg}, nw, ns))

    cfg, nw, ns = _strip(backend.config_bgmv_expand(rank, hidden, dtype))
    specs.append(KernelSpec("bgmv_expand", "bgmv_expand_kernel", "bgmv", {
        "h_ptr": "*fp32:16", "w_ptr": w + ":16", "base_ptr": w + ":16",
        "out_ptr": w + ":16", "coef_ptr": "*fp32:16", "ids_ptr": "*i32:16", "d_out": "i32:16", "rank": "i32:16",
        "top_k": "i32", "stride_hn": "i32:16", "stride_wk": "i32:16", "stride_wn": "i32:16",
        "stride_wr": 1, "stride_bt": "i32:16", "stride_bd": 1, "stride_ot": "i32:16", "stride_od": 1,
        "HAS_BASE": True, "HAS_COEF": True, **cfg}, nw, ns))
    for spec in specs:
        spec.notes = {"dtype": _TYPE[dtype], "rank": rank, "hidden": hidden}
    return specs


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off")


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found at {path}: the triton wheel's NVIDIA backend tools are needed")
    return str(path)


def _ptxas(capability: int) -> str:
    """The ptxas Triton itself uses for this capability (it ships two)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(capability).path


def _ptxas_usage(ptx: str, capability: int) -> dict:
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([_ptxas(capability), "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}: {res.stderr.strip()}")
    text = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return {"ptx_arch": arch, "registers": int(regs.group(1)) if regs else 0,
            "spill_stores": int(spill.group(1)) if spill else 0, "spill_loads": int(spill.group(2)) if spill else 0,
            "stack_bytes": int(stack.group(1)) if stack else 0}


def _sass_mma(cubin: bytes) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {res.stderr.strip()}")
    return bool(re.search(r"\bH[G]?MMA\b|\bHGMMA\.", res.stdout))


def compile_spec(spec: KernelSpec, target: str) -> dict:
    """Compile one kernel for `target` ("sm_80", "sm_90") and measure it."""
    import triton
    from triton.backends.compiler import GPUTarget

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}: expected one of {sorted(TARGETS)}")
    fn = getattr(backend, spec.kernel)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name not in spec.args:
            raise KeyError(f"kernel {spec.kernel} argument {name!r} has no entry in spec {spec.name!r}")
        value = spec.args[name]
        if isinstance(value, str) and not name.isupper():  # a runtime argument's type; upper case: constexpr
            kind, _, hint = value.partition(":")
            signature[name] = kind
            if hint == "16":
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "constexpr"
            constexprs[name] = value
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", TARGETS[target], 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    ptx = compiled.asm["ptx"]
    usage = _ptxas_usage(ptx, TARGETS[target])
    mma_ptx = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "")
    config = {k: v for k, v in spec.args.items() if k.isupper()}
    return {"kernel": spec.name, "path": spec.path, "target": target, **spec.notes, "config": config,
            "num_warps": spec.num_warps, "num_stages": spec.num_stages, **usage,
            "shared_bytes": int(compiled.metadata.shared), "mma_ptx": mma_ptx,
            "mma_sass": _sass_mma(compiled.asm["cubin"]) if "cubin" in compiled.asm else None}


def compile_report(targets=("sm_80", "sm_90"), dtypes=(torch.float16,), ranks=(16,), hidden: int = 4096,
                   progress=None) -> list[dict]:
    """Every kernel at its default config, for every target, dtype and rank.

    Compiling needs Triton's compiler, which a process running the interpreter (TRITON_INTERPRET=1,
    set before triton was imported) does not have: there the report runs in a child process.
    """
    if _interpreting():
        return _compile_report_subprocess(targets, dtypes, ranks, hidden)
    jobs = [(spec, t) for dtype in dtypes for rank in ranks for spec in default_specs(dtype, rank, hidden) for t in targets]
    return [compile_spec(spec, target) for spec, target in (progress(jobs) if progress else jobs)]


def _compile_report_subprocess(targets, dtypes, ranks, hidden) -> list[dict]:
    request = {"targets": list(targets), "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
               "ranks": list(ranks), "hidden": hidden}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "moa.kernels.multi_lora.compile", json.dumps(request)],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"compile report subprocess failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def format_report(rows: list[dict]) -> str:
    head = f"{'kernel':<20} {'target':<6} {'dtype':<5} {'r':>3} {'regs':>4} {'spill st/ld':>11} {'smem':>6} {'MMA (ptx/sass)':>16}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mma = f"{r['mma_ptx'] or 'no'}/{'yes' if r['mma_sass'] else 'no'}"
        lines.append(f"{r['kernel']:<20} {r['target']:<6} {r['dtype']:<5} {r['rank']:>3} {r['registers']:>4} "
                     f"{str(r['spill_stores']) + '/' + str(r['spill_loads']):>11} {r['shared_bytes']:>6} {mma:>16}")
    return "\n".join(lines)


if __name__ == "__main__":
    req = json.loads(sys.argv[1])
    report = compile_report(req["targets"], [getattr(torch, d) for d in req["dtypes"]], req["ranks"], req["hidden"])
    print(json.dumps(report))
