"""The training loop: a DeepSpeed engine over the MoA model's trainable parameters, stage after stage.

Every process (one under `moa train`, N under `torchrun`/`deepspeed`) runs the same loop; a
single process is a world of one, so there is one code path. Output directory:

    OUT/train_config.json     the resolved config
    OUT/metrics.jsonl         one line per logged step and per validation pass
    OUT/metrics.png           the curves, drawn at the end
    OUT/checkpoints/step_N/   weights, Adam state, schedule as safetensors + JSON (resume with --resume, on any
                              number of processes; see checkpoint.py)
    OUT/final/                adapters and routers (safetensors), moa_config.json, base_model.json
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.utils import set_z3_leaf_modules
from tqdm import tqdm

from moa.base_model import load_base_model, load_tokenizer, pin_revision
from moa.data import IGNORE_INDEX, padding_id
from moa.errors import UsageError
from moa.layers import MoALinear
from moa.model import MoAForCausalLM
from moa.routing import TokenRouter
from .base_lm import BaseLM
from .checkpoint import export_adapters, latest_usable_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import StageData, TextData, micro_batches
from .losses import loss_and_stats, summarize
from .metrics import MetricsLog, plot_metrics
from .trackers import Trackers, check_installed
from .schedule import StageSchedule

DS_DEFAULT = {"zero_optimization": {"stage": 0}}


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Without a launcher this process is rank 0 of a world of one."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def _fill(section: dict, key: str, value, source: str):
    if section.get(key, "auto") == "auto":
        section[key] = value
    elif section[key] != value:
        raise UsageError(f"{source}: {key} is {section[key]!r} but the training config gives {value!r}; "
                         f"set it to \"auto\" or make them agree")


def deepspeed_config(config: TrainConfig, world: int) -> dict:
    """The DeepSpeed config file (or ZeRO stage 0) with its 'auto' values filled from the training config."""
    source = config.deepspeed or "default DeepSpeed config"
    if config.deepspeed:
        path = Path(config.deepspeed)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config {path} not found")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}: not valid JSON: {err}") from None
    else:
        ds = json.loads(json.dumps(DS_DEFAULT))
    batch = config.batch
    _fill(ds, "train_micro_batch_size_per_gpu", batch.micro_batch_size, source)
    _fill(ds, "gradient_accumulation_steps", batch.accumulation(world), source)
    _fill(ds, "train_batch_size", batch.global_batch_size, source)
    _fill(ds, "gradient_clipping", config.optim.max_grad_norm, source)
    _fill(ds.setdefault("bf16", {}), "enabled", config.precision == "bf16", source + " bf16")
    _fill(ds.setdefault("fp16", {}), "enabled", config.precision == "fp16", source + " fp16")
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    params = optimizer.setdefault("params", {})
    first_lr = config.stages[0].lr
    for key, value in (("lr", first_lr), ("betas", list(config.optim.betas)), ("eps", config.optim.eps),
                       ("weight_decay", config.optim.weight_decay)):
        _fill(params, key, value, source + " optimizer.params")
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def build_model(config: TrainConfig, device: torch.device):
    base, tokenizer = load_base_model(config.model, device)
    if config.train_base:
        model = BaseLM(base)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model.train(), tokenizer
    model = MoAForCausalLM.from_base(base, config.model_config())
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    # ZeRO-3 gathers a leaf module's parameters all at once, so a batch that skips some adapters
    # (or a gate) never leaves the prefetcher waiting for a parameter that is not used. Its
    # backward re-gather is driven by the module's inputs, so they must require grad: the first
    # layer's input (the frozen embeddings) is made to.
    set_z3_leaf_modules(model, [MoALinear, TokenRouter])
    base.enable_input_require_grads()
    return model.train(), tokenizer


class Trainer:
    def __init__(self, config: TrainConfig, output_dir: str | Path | None = None, max_steps: int | None = None,
                 resume: bool = False, show_progress: bool = True):
        self.config = config
        self.output_dir = Path(output_dir or config.output_dir)
        self.end_step = config.total_steps if max_steps is None else min(max_steps, config.total_steps)
        if self.end_step <= 0:
            raise UsageError(f"max_steps must be positive, got {max_steps}")
        self.resume = resume
        self.rank, self.world, self.device = init_distributed()
        self.show_progress = show_progress and self.rank == 0
        self.ds_config = deepspeed_config(config, self.world)  # checked before any data or model work
        check_installed(config.report_to)
        config.model = pin_revision(config.model)  # a Hub id at its commit, as every saved run records it
        tokenizer = load_tokenizer(config.model)
        cultures, shared = config.moa.cultures, config.shared_lora
        self.stage_data, self.eval_data = [], []

        def read(files, stage):
            if config.train_base:
                return TextData(files, tokenizer, cultures, config.batch.max_length)
            return StageData(files, tokenizer, cultures, config.batch.max_length, stage.tasks, shared)

        for stage in config.stages:  # every data file is read and validated before the model is built
            self.stage_data.append(read(stage.train, stage))
            self.eval_data.append(read(stage.validation, stage) if stage.validation else None)
        self.pad_id = padding_id(tokenizer)
        frozen = config.frozen_cultures()  # checked against init_from before the model is built
        model, _ = build_model(config, self.device)
        if config.init_from is not None:  # a resumed run then loads its checkpoint over these weights
            model.load_cultures_from(config.init_from)
            model.freeze_cultures(frozen)
        self.model_cultures = config.model_config().cultures
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=trainable, config=self.ds_config,
            lr_scheduler=lambda optimizer: StageSchedule(optimizer, config))

    # ------------------------------------------------------------------ helpers
    def _batch(self, data: StageData, indices) -> dict:
        return {k: v.to(self.device) for k, v in data.collate(indices, self.pad_id).items()}

    def _reduce(self, stats: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        return stats

    def _forward(self, batch: dict, gates: bool = False):
        # in training the gates always run (autograd is on); without autograd passing the labels makes them run
        out = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          culture_ids=batch["culture_ids"], labels=batch["labels"] if gates else None)
        return loss_and_stats(self.engine.module, out, batch, len(self.model_cultures))

    def train_step(self, step: int) -> dict:
        config = self.config
        stage_index, stage, _ = config.stage_at(step)
        data = self.stage_data[stage_index]
        lr = self.scheduler.get_last_lr()[0]
        indices = data.global_batch(config.seed, stage_index, step, config.batch.global_batch_size, config.batch.sampling)
        slots = config.batch.global_batch_size // config.batch.micro_batch_size
        start = time.perf_counter()
        stats, seen = None, 0
        for i, micro in enumerate(micro_batches(indices, config.batch.micro_batch_size, self.rank, self.world)):
            # dropout: a function of (seed, step, micro-batch slot of the global batch), whatever the world size
            torch.manual_seed((config.seed * 1_000_003 + step) * slots + i * self.world + self.rank)
            batch = self._batch(data, micro)
            loss, micro_stats = self._forward(batch)
            self.engine.backward(loss)
            self.engine.step()
            stats = micro_stats if stats is None else stats + micro_stats
            seen += int(batch["attention_mask"].sum())
        seconds = time.perf_counter() - start
        stats = self._reduce(stats)
        tokens = self._reduce(torch.tensor([seen], dtype=torch.float64))
        return {"kind": "train", "step": step + 1, "stage": stage.name, "lr": lr, **summarize(stats, self.model_cultures),
                "tokens_per_s": float(tokens) / seconds, "step_s": seconds}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict | None:
        """Validation LM loss (per token) and routing accuracy of the stage step `step` (0-based) belongs to.

        `eval_rows` rows spread evenly over the file (files are grouped by culture, so every culture
        is seen) are dealt out to the processes; every process runs the same
        number of forwards (ZeRO-3 needs that), one with no rows running a fully masked row.
        """
        stage_index, stage, _ = self.config.stage_at(step)
        data = self.eval_data[stage_index]
        if data is None:
            return None
        micro = self.config.batch.micro_batch_size
        picked = np.unique(np.linspace(0, len(data) - 1, min(self.config.eval_rows, len(data))).round().astype(int))
        count = len(picked)
        mine = picked[self.rank::self.world]
        self.engine.eval()
        stats = None
        for b in range(math.ceil(math.ceil(count / self.world) / micro)):
            part = mine[b * micro:(b + 1) * micro]
            batch = self._batch(data, part if len(part) else [0])
            if not len(part):
                batch["labels"].fill_(IGNORE_INDEX)
            _, micro_stats = self._forward(batch, gates=True)
            stats = micro_stats if stats is None else stats + micro_stats
        self.engine.train()
        summary = summarize(self._reduce(stats), self.model_cultures)
        return {"kind": "eval", "step": step + 1, "stage": stage.name, "rows": count, "lm_loss": summary["token_lm_loss"],
                "routing_accuracy": summary["routing_accuracy"], "lm_loss_per_culture": summary["lm_loss_per_culture"]}

    # ------------------------------------------------------------------ run
    def run(self) -> Path:
        config, out = self.config, self.output_dir
        checkpoints = out / "checkpoints"
        start = 0
        if self.resume:
            found = latest_usable_checkpoint(self.engine, checkpoints)
            if found is not None:
                start = load_checkpoint(self.engine, self.scheduler, found[1])
                if self.rank == 0:
                    print(f"resumed from {found[0]} at step {start}")
            elif self.rank == 0:
                print(f"--resume: no complete checkpoint in {checkpoints}, starting from step 0")
        log = None
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            trackers = Trackers(config.report_to, out, config.to_dict(), self.resume) if config.report_to else None
            log = MetricsLog(out / "metrics.jsonl", trackers, resume_step=start if self.resume else None)
        bar = tqdm(total=self.end_step, initial=start, desc="train", disable=not self.show_progress, dynamic_ncols=True)
        for step in range(start, self.end_step):
            row = self.train_step(step)
            done = step + 1
            if log is not None and (done % config.log_interval == 0 or done == self.end_step):
                log.log(row)
            bar.update(1)
            bar.set_postfix(stage=row["stage"], loss=f"{row['loss']:.3f}", route=row["routing_accuracy"] or 0.0)
            last_of_stage = done == self.end_step or config.stage_at(done)[0] != config.stage_at(step)[0]
            if (config.eval_interval and done % config.eval_interval == 0) or last_of_stage:
                eval_row = self.evaluate(step)
                if eval_row is not None and log is not None:
                    log.log(eval_row)
            if done % config.save_interval == 0 or done == self.end_step:
                save_checkpoint(self.engine, self.scheduler, checkpoints, done, config.model, config.keep_checkpoints,
                                {"stage": row["stage"], "world_size": self.world})
        bar.close()
        export_adapters(self.engine, out / "final", config.model)
        if log is not None:
            log.close()
            plot_metrics(log.rows(), out / "metrics.png")
        return out / "final"
