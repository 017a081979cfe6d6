"""What every benchmark shares: timing statistics, the run's stamp (device, versions, git SHA), tables, JSON."""
from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import torch


def _stats(times_ms: list[float]) -> dict:
    q = torch.tensor(times_ms).quantile(torch.tensor([0.2, 0.5, 0.8])).tolist()
    return {"ms_p20": q[0], "ms_median": q[1], "ms_p80": q[2], "repeat": len(times_ms), "ms_rounds": times_ms}


def paired_ratio(num: dict, den: dict) -> float:
    """Median over rounds of num's time / den's time, from two `time_interleaved` entries: each round's
    calls ran back to back, so a drift of the machine's speed cancels in the ratio."""
    return float(torch.tensor([a / b for a, b in zip(num["ms_rounds"], den["ms_rounds"])]).median())


def time_interleaved(fns: dict, warmup: int = 3, repeat: int = 20) -> dict:
    """Wall-clock statistics (ms) of each zero-argument callable in `fns`.

    The callables are timed in turn, one call each per round, so drifts of the machine's speed
    (other load, frequency changes) fall on all of them alike and their ratios stay meaningful.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: _stats(t) for name, t in times.items()}


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def stamp() -> dict:
    """Where and with what a benchmark ran."""
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    for name in ("peft", "triton", "deepspeed"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {"device": device, "cpu_threads": torch.get_num_threads(), "versions": versions, "git_sha": git_sha(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Print rows as an aligned table. columns: (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]] + [[format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text)
    return text


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    print(f"wrote {path}")


def add_model_arguments(parser, hidden_size: int = 1024, intermediate_size: int = 2816, heads: int = 16) -> None:
    """The benches' Llama-style model (by default hidden 1024, 4 layers, K=10 cultures, r=16)."""
    parser.add_argument("--hidden-size", type=int, default=hidden_size)
    parser.add_argument("--intermediate-size", type=int, default=intermediate_size)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--cultures", type=int, default=10, help="number of culture adapters K")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r of every adapter")


def llama_base(args, max_positions: int = 4096):
    """The base model `add_model_arguments` describes, its weights drawn from `args.seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, vocab_size=args.vocab, max_position_embeddings=max_positions)
    return LlamaForCausalLM(config).eval()
