"""Phase 2: the tokenizer and the tiny base model, pre-trained on the bundled corpus with the next-token loss,
through moa.training like every other run (`train_base`: the base's own weights train, no adapter).

OUT/pretrain/   texts.jsonl (the text rows), tokenizer/ (fitted on the same texts), and the training run
                (train_config.json, metrics.jsonl, metrics.png, checkpoints/, final/)
OUT/base/       the pre-trained model and its tokenizer (final/, copied), the base every later run adapts
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from .config import DemoConfig
from .corpus import build_tokenizer, pretrain_texts
from .train import train


def pretrain_config(config: DemoConfig, work: Path, cultures: list[str], vocab_size: int, seed: int):
    """The moa.training config that pre-trains the tiny model of `config.model` on OUT/pretrain/texts.jsonl."""
    from moa.training.config import TrainConfig

    p = config.pretrain
    return TrainConfig.from_dict({
        "model": {"tiny": {**asdict(config.model), "vocab_size": vocab_size}, "tokenizer": str(work / "tokenizer"),
                  "seed": seed},
        "moa": {"cultures": cultures}, "train_base": True,
        "stages": [{"name": "pretrain", "train": [str(work / "texts.jsonl")], "steps": p.steps, "lr": p.lr,
                    "warmup_steps": p.warmup_steps}],
        "optim": {"weight_decay": p.weight_decay, "betas": [0.9, 0.95], "schedule": "cosine",
                  "min_lr_ratio": p.min_lr_ratio, "max_grad_norm": 1.0},
        "batch": {"micro_batch_size": p.batch_size, "global_batch_size": p.batch_size, "max_length": p.seq_len,
                  "sampling": "proportional"},  # texts drawn uniformly
        "output_dir": str(work), "save_interval": p.steps, "keep_checkpoints": 1, "seed": seed,
    }, source="demo config pretrain")


def pretrain(config: DemoConfig, out_dir: Path, cultures: list[str], seed: int, progress: bool) -> list[dict]:
    """Tokenizer + tiny model, pre-trained and saved to out_dir (safetensors). Returns the LM loss and learning
    rate per step."""
    from moa.atomic import atomic_directory, atomic_file

    work = out_dir.parent / "pretrain"
    if work.exists():  # an earlier demo's: this phase starts afresh
        shutil.rmtree(work)
    work.mkdir(parents=True)
    rows = pretrain_texts(config.pretrain, cultures, seed)
    tokenizer = build_tokenizer([r["text"] for r in rows], config.tokenizer.vocab_size)
    tokenizer.save_pretrained(work / "tokenizer")
    with atomic_file(work / "texts.jsonl") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    final = train(pretrain_config(config, work, cultures, len(tokenizer), seed), progress)
    with atomic_directory(out_dir, marker="config.json") as tmp:
        shutil.copytree(final, tmp, dirs_exist_ok=True)
    metrics = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    return [{"step": m["step"], "lm_loss": m["lm_loss"], "lr": m["lr"]} for m in metrics if m["kind"] == "train"]
