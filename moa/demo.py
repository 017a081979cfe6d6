"""Run the whole pipeline on the embedded default (configs/demo/default.yaml), offline, on a CPU.

Phases, each with its progress bar:
  1. synth     culture-labelled task data from the offline backend          OUT/data/
  2. pretrain  a byte-level BPE tokenizer and a tiny Llama pre-trained on the
               bundled corpus only, so it is a language model that knows
               about the cultures (no synthesized row is read)             OUT/base/
  3. moa       culture adapters + router, stage 1 (broad) then stage 2 (tasks) OUT/moa/
  4. shared    the shared-LoRA baseline: same data, same steps               OUT/shared/
  5. eval      every method on the test split (unseen questions)           OUT/results.{json,md}, *.png
  6. generate  one mixed-culture batch, routed by the router                 OUT/generations.jsonl
Then it prints the results table, the accuracy on the held-out conflicting-norm questions, the
routing accuracy and where the plots are. `--quick` is a small version of the same run (the
tests use it). Everything is seeded by `--seed`. `KEY=VALUE` arguments set config keys
(`pretrain.steps=100`); the config in use is written to OUT/demo_config.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moa.config_loader import apply_overrides, from_mapping, load_yaml
from moa.errors import UsageError
from moa.resources import CONFIGS

DEFAULT_CONFIG = CONFIGS / "demo" / "default.yaml"
STAGE_DATA = ("stage1", "stage2")
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2: the pad and eos ids of moa.tiny.tiny_config


# ---------------------------------------------------------------------------------------------- config
@dataclass
class TokenizerSection:
    vocab_size: int = field(metadata={"help": "Vocabulary of the byte-level BPE tokenizer fitted on the pre-training texts."})


@dataclass
class ModelSection:
    family: str = field(metadata={"help": "moa.tiny model family: llama, qwen2 or mistral (vocab_size comes from the tokenizer)."})
    hidden_size: int = field(metadata={"help": "Hidden size of the tiny model."})
    intermediate_size: int = field(metadata={"help": "MLP size of the tiny model."})
    num_hidden_layers: int = field(metadata={"help": "Decoder layers."})
    num_attention_heads: int = field(metadata={"help": "Attention heads."})
    num_key_value_heads: int = field(metadata={"help": "Key/value heads (grouped-query attention)."})


@dataclass
class PretrainSection:
    steps: int = field(metadata={"help": "Optimizer steps of pre-training."})
    batch_size: int = field(metadata={"help": "Language-modelling texts per step."})
    seq_len: int = field(metadata={"help": "Tokens per text at most."})
    lr: float = field(metadata={"help": "Peak learning rate (linear warmup, then cosine decay)."})
    warmup_steps: int = field(metadata={"help": "Linear warmup steps."})
    min_lr_ratio: float = field(metadata={"help": "Final learning rate as a fraction of the peak."})
    weight_decay: float = field(metadata={"help": "AdamW weight decay."})
    retold_copies: int = field(metadata={"help": "Per culture: texts retelling its corpus facts under one cue."})
    retold_facts: int = field(metadata={"help": "Facts per retold text."})
    cue_list_copies: int = field(metadata={"help": "Per culture: shuffled lists of its cities and of its names."})


@dataclass
class TrainSection:
    moa: dict = field(metadata={"help": "moa.MoAConfig fields; cultures and seed are set by the demo."})
    stages: list = field(metadata={"help": "moa.training stages, each with `data`: stage1 or stage2 (default: stage1 "
                                           "for the first stage, stage2 after); data paths are set by the demo."})
    eval_rows: int = field(metadata={"help": "Validation rows evaluated per pass."})
    optim: dict | None = field(default=None, metadata={"help": "moa.training optim section."})
    batch: dict | None = field(default=None, metadata={"help": "moa.training batch section."})

    def __post_init__(self):
        if not isinstance(self.stages, list):
            raise UsageError(f"train.stages must be a list, got {self.stages!r}")
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, dict) or stage.get("data", STAGE_DATA[min(i, 1)]) not in STAGE_DATA:
                raise UsageError(f"train.stages[{i}].data must be one of {STAGE_DATA}, got {stage!r}")


@dataclass
class EvalSection:
    batch_size: int = field(metadata={"help": "Sequences (rows x labels) per forward."})
    max_length: int = field(metadata={"help": "Tokens per sequence at most."})


@dataclass
class GenerateSection:
    cultures: int = field(metadata={"help": "Prompts in the mixed-culture batch, one culture each."})
    max_new_tokens: int = field(metadata={"help": "New tokens per prompt at most."})


@dataclass
class DemoConfig:
    synth: dict = field(metadata={"help": "moa.synth.config keys; output_dir and seed are set by the demo."})
    tokenizer: TokenizerSection = field(metadata={"help": "Phase 2: the tokenizer."})
    model: ModelSection = field(metadata={"help": "Phase 2: the tiny model (moa.tiny.tiny_config arguments)."})
    pretrain: PretrainSection = field(metadata={"help": "Phase 2: pre-training on the bundled corpus."})
    train: TrainSection = field(metadata={"help": "Phases 3 and 4: moa.training config sections."})
    eval: EvalSection = field(metadata={"help": "Phase 5: evaluation."})
    generate: GenerateSection = field(metadata={"help": "Phase 6: the mixed-culture generation batch."})
    quick: dict | None = field(default=None, metadata={"help": "The overrides of `moa demo --quick`, merged in section "
                                                               "by section (a list replaces a list)."})

    def __post_init__(self):
        if not isinstance(self.synth, dict):
            raise UsageError(f"synth must be a mapping of moa.synth.config keys, got {self.synth!r}")
        self.quick = {} if self.quick is None else self.quick
        if not isinstance(self.quick, dict):
            raise UsageError(f"quick must be a mapping of sections to override, got {self.quick!r}")


def _merge(base: dict, override: dict) -> dict:
    """`override` merged into a copy of `base`: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_demo_config(path: str | Path = DEFAULT_CONFIG, quick: bool = False, overrides: list[str] = ()) -> DemoConfig:
    """The demo config, with its `quick:` section merged in when asked, then the dotted `key=value`
    `overrides` set; both versions (with and without `quick:`) are checked."""
    path = Path(path)
    raw = load_yaml(path)
    full = from_mapping(DemoConfig, apply_overrides(DemoConfig, copy.deepcopy(raw), overrides), str(path))
    small = from_mapping(DemoConfig, apply_overrides(DemoConfig, _merge(raw, full.quick), overrides), str(path))
    return small if quick else full


# ---------------------------------------------------------------------------------------------- phases
def synthesize(config: DemoConfig, out_dir: Path, seed: int, progress: bool) -> dict:
    """Phase 1: offline synthesis into out_dir (stage1_*.jsonl, stage2_*.jsonl, summary.json/png)."""
    from moa.synth.config import load_config
    from moa.synth.pipeline import run as run_synth
    from moa.synth.report import plot_counts

    synth = load_config(None, **{**config.synth, "output_dir": str(out_dir), "seed": seed, "plot": True})
    summary = run_synth(synth, fresh=True, progress=progress)
    if summary["short_jobs"]:
        raise RuntimeError(f"synthesis fell short of its targets: {summary['short_jobs']}")
    plot_counts(summary, out_dir / "summary.png")
    return summary


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts` (no chat template: the plain User/Assistant format)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or vocab_size < 300:
        raise UsageError(f"tokenizer.vocab_size must be an integer >= 300 (256 bytes + specials + merges), got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def retold_facts(rng, cultures: list[str], copies: int, per_text: int) -> list[str]:
    """A culture's corpus facts retold in a random order under one cue.

    The cue (country, city, personal name or both) comes first and the facts follow without
    naming the culture again, so predicting them needs the culture read from the cue. Each fact
    is told in one of the norms table's two phrasings: the custom ("full names are usually
    written ...") or someone following it ("someone writes their full name ...").
    """
    from moa.data import norms

    texts = []
    for key in cultures:
        c = norms.cultures()[key]
        facts = [(q.fact.format(o=q.options[q.answers[key]]), "someone " + q.act.format(o=q.options[q.answers[key]]))
                 for q in norms.questions() if key in q.answers]
        facts += [(f"it is {'considered' if t.labels[key] == 'offensive' else 'not considered'} offensive when someone {t.act}",) * 2
                  for t in norms.taboos() if key in t.labels]
        for _ in range(copies):
            place, name = rng.choice(c.places), rng.choice(c.names)
            cue = rng.choice([f"In {c.name}:", f"In {place}:", f"{name} explains local customs:",
                              f"{name} in {place} explains local customs:"])
            chosen = [rng.choice(forms) for forms in rng.sample(facts, min(per_text, len(facts)))]
            texts.append(cue + " " + " ".join(f[0].upper() + f[1:] + "." for f in chosen))
    return texts


def cue_lists(rng, cultures: list[str], copies: int) -> list[str]:
    """Each culture's cities and personal names, in a random order."""
    from moa.data import norms

    texts = []
    for key in cultures:
        c = norms.cultures()[key]
        for _ in range(copies):
            places, names = rng.sample(c.places, len(c.places)), rng.sample(c.names, len(c.names))
            texts.append(f"Cities in {c.name}: " + ", ".join(places) + ".")
            texts.append(f"Common names in {c.name}: " + ", ".join(names) + ".")
    return texts


def pretrain_texts(config: DemoConfig, cultures: list[str], seed: int) -> list[str]:
    """The pre-training texts, all from the bundled corpus.

    The corpus documents of the demo's cultures, their facts retold under cultural cues and the
    cue lists. No synthesized row (stage 1 or stage 2) is read, neither here nor by the
    tokenizer: what the tasks ask is learnt by the adapters, not by the base.
    """
    import random

    from moa.data.norms import corpus

    cfg = config.pretrain
    rng = random.Random(seed)
    texts = [doc["text"] for doc in corpus() if doc["culture"] in cultures]
    texts += retold_facts(rng, cultures, cfg.retold_copies, cfg.retold_facts)
    texts += cue_lists(rng, cultures, cfg.cue_list_copies)
    return texts


def pretrain(config: DemoConfig, out_dir: Path, cultures: list[str], seed: int, progress: bool) -> list[dict]:
    """Phase 2: tokenizer + tiny Llama, saved to out_dir (safetensors). Returns the losses per step.

    Every step takes `batch_size` texts of `pretrain_texts`; the loss is next-token cross-entropy,
    nothing else. The tokenizer is fitted on the same texts.
    """
    from tqdm import tqdm

    from moa.atomic import atomic_directory
    from moa.data import padding_id
    from moa.data.padding import pad_batch
    from moa.tiny import tiny_model
    from moa.training.schedule import warmup_decay

    cfg = config.pretrain
    raw = pretrain_texts(config, cultures, seed)
    tokenizer = build_tokenizer(raw, config.tokenizer.vocab_size)
    eos, seq = tokenizer.eos_token_id, cfg.seq_len
    texts = [tokenizer(t, add_special_tokens=False)["input_ids"][:seq - 1] + [eos] for t in raw]
    model = tiny_model(seed=seed, vocab_size=len(tokenizer), **asdict(config.model)).train()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(range(cfg.steps), desc="pretrain", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        lr = warmup_decay(cfg.lr, step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        picked = [texts[i] for i in torch.randint(0, len(texts), (cfg.batch_size,), generator=generator).tolist()]
        input_ids, mask = pad_batch(picked, padding_id(tokenizer))
        labels = input_ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "lm_loss": loss.item(), "lr": lr})
        bar.set_postfix(lm=f"{history[-1]['lm_loss']:.3f}")
    model.eval()
    with atomic_directory(out_dir, marker="config.json") as tmp:
        model.save_pretrained(tmp)  # config.json + model.safetensors
        tokenizer.save_pretrained(tmp)
    return history


def train_config(config: DemoConfig, base_dir: Path, data_dir: Path, out_dir: Path, cultures: list[str], seed: int,
                 shared: bool):
    """The moa.training config of phase 3 (MoA) or phase 4 (shared LoRA, `shared=True`)."""
    from moa.training.config import TrainConfig

    train = config.train
    stages = []
    for i, stage in enumerate(train.stages):
        stage = dict(stage)
        data = stage.pop("data", STAGE_DATA[min(i, 1)])
        stage["train"] = str(data_dir / f"{data}_train.jsonl")
        stage["validation"] = str(data_dir / f"{data}_validation.jsonl")
        stages.append(stage)
    total = sum(int(s.get("steps", 0)) for s in stages) or 1
    data = {"model": {"path": str(base_dir)}, "moa": {**train.moa, "cultures": cultures, "seed": seed},
            "stages": stages, "optim": train.optim, "batch": train.batch, "shared_lora": shared,
            "output_dir": str(out_dir), "save_interval": total, "keep_checkpoints": 1, "eval_rows": train.eval_rows,
            "seed": seed}
    return TrainConfig.from_dict(data, source="demo config train")


def train(config: DemoConfig, base_dir: Path, data_dir: Path, out_dir: Path, cultures: list[str], seed: int, shared: bool,
          progress: bool) -> Path:
    """Phases 3 and 4: one moa.training run; returns its final/ directory."""
    from moa.training.trainer import Trainer

    trainer = Trainer(train_config(config, base_dir, data_dir, out_dir, cultures, seed, shared), output_dir=out_dir,
                      show_progress=progress)
    return trainer.run()


# ---------------------------------------------------------------------------------------------- results
def held_out_conflicting(results: dict, rows: list[dict]) -> dict:
    """Accuracy of every method and routing accuracy on the test rows about conflicting norms.

    `results` as from `moa.eval.evaluate` on `rows` (its `routed`: the router's culture id per row,
    sequence level). Also given on the rows whose
    prompt carries a cultural cue (`cue: true`), which are the rows the router can read a culture from.
    """
    from moa.data import LABELS
    from moa.data.norms import conflicting_questions
    from moa.eval.scoring import accuracy_summary

    cultures, routed = results["cultures"], results["routed"]
    conflicting = {q.id for q in conflicting_questions()}
    label_rows = [r for r in rows if r["task"] in LABELS]
    keep = [i for i, r in enumerate(label_rows) if r.get("norm") in conflicting]
    cued = [i for i in keep if label_rows[i].get("cue", True)]
    out = {"norms": sorted({rows[i].get("norm") for i in range(len(rows)) if rows[i].get("norm") in conflicting}),
           "accuracy": {}, "accuracy_cued": {}}
    for method, predicted in results["predictions"].items():
        correct = [predicted[i] == label_rows[i].get("label", label_rows[i]["response"]) for i in range(len(label_rows))]
        out["accuracy"][method] = accuracy_summary([correct[i] for i in keep], [label_rows[i] for i in keep], cultures)
        out["accuracy_cued"][method] = accuracy_summary([correct[i] for i in cued], [label_rows[i] for i in cued], cultures)
    gold = [cultures.index(r["culture"]) for r in rows]
    rows_c = [i for i, r in enumerate(rows) if r.get("norm") in conflicting]
    rows_cued = [i for i in rows_c if rows[i].get("cue", True)]
    share = lambda idx: sum(routed[i] == gold[i] for i in idx) / len(idx) if idx else None
    out.update(routing_accuracy=share(rows_c), routing_accuracy_cued=share(rows_cued), n_rows=len(rows_c),
               n_rows_cued=len(rows_cued), n_label_rows=len(keep), n_label_rows_cued=len(cued))
    return out


def generation_rows(rows: list[dict], count: int) -> list[dict]:
    """`count` cued `open` test prompts from different cultures, preferably about one conflicting norm."""
    from moa.data.norms import conflicting_questions

    conflicting = {q.id for q in conflicting_questions()}
    open_rows = [r for r in rows if r["task"] == "open" and r.get("cue", True)]
    by_norm = {}
    for r in open_rows:
        by_norm.setdefault(r.get("norm"), {}).setdefault(r["culture"], r)
    ranked = sorted(by_norm.items(), key=lambda kv: (kv[0] not in conflicting, -len(kv[1]), str(kv[0])))
    chosen, seen = [], set()
    for _, per_culture in ranked:
        for culture, row in per_culture.items():
            if culture not in seen and len(chosen) < count:
                chosen.append(row)
                seen.add(culture)
    return [{"id": r["id"], "prompt": r["prompt"], "culture": r["culture"], "reference": r["response"]} for r in chosen]


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_conflicting(block: dict, cultures: list[str]) -> str:
    """The held-out conflicting-norm accuracy table (all rows and cued rows) in markdown."""
    from moa.eval.scoring import METHODS

    acc, cued = block["accuracy"], block["accuracy_cued"]
    shown = [c for c in cultures if any(c in a["per_culture"] for a in acc.values())]
    lines = [f"| method | all (n={block['n_label_rows']}) | cued (n={block['n_label_rows_cued']}) | " + " | ".join(shown) + " |",
             "|" + "---|" * (3 + len(shown))]
    for method in [m for m in METHODS if m in acc]:
        a = acc[method]
        lines.append(f"| {method} | {_pct(a['overall'])} | {_pct(cued[method]['overall'])} | "
                     + " | ".join(_pct(a["per_culture"].get(c)) for c in shown) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- run
def stage2_only(config: DemoConfig) -> DemoConfig:
    """The demo config whose training is its last stage alone, run for the steps of all stages together
    (the two-stage ablation: the same total steps, no broad stage first)."""
    stages = config.train.stages
    ablated = copy.deepcopy(config)
    ablated.train.stages = [{**stages[-1], "steps": sum(int(s.get("steps", 0)) for s in stages)}]
    return ablated


def two_stage_block(results: dict, ablated: dict, rows: list[dict]) -> dict:
    """Accuracy of MoA (oracle and routed) trained stage 1 then stage 2 and stage 2 alone, on every label row
    and on the held-out conflicting-norm questions (all rows)."""
    out = {}
    for name, res in (("stage1_then_stage2", results), ("stage2_only", ablated)):
        conflicting = held_out_conflicting(res, rows)["accuracy"]
        out[name] = {method: {"all": res["accuracy"][method]["overall"], "per_task": res["accuracy"][method]["per_task"],
                              "conflicting": conflicting[method]["overall"]}
                     for method in ("moa_oracle", "moa_router")}
    return out


def format_two_stage(block: dict, steps: dict) -> str:
    """The two-stage ablation table in markdown."""
    tasks = list(next(iter(block["stage1_then_stage2"].values()))["per_task"])
    lines = ["| training | steps | all label rows: oracle | routed | conflicting, all rows: oracle | routed | "
             + " | ".join(f"{t} (oracle)" for t in tasks) + " |", "|" + "---|" * (6 + len(tasks))]
    for name, label in (("stage1_then_stage2", "stage 1 then stage 2"), ("stage2_only", "stage 2 alone")):
        o, r = block[name]["moa_oracle"], block[name]["moa_router"]
        lines.append(f"| {label} | {steps[name]} | {_pct(o['all'])} | {_pct(r['all'])} | {_pct(o['conflicting'])} | "
                     f"{_pct(r['conflicting'])} | " + " | ".join(_pct(o["per_task"].get(t)) for t in tasks) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- run
def run_demo(output_dir: str | Path = "runs/demo", seed: int = 0, quick: bool = False, progress: bool = True,
             config_path: str | Path = DEFAULT_CONFIG, test_split: str | None = None, stage_ablation: bool = False,
             overrides: list[str] = ()) -> dict:
    """Every phase in order; returns the results (also written to OUT/results.json).

    test_split: overrides the config's `synth.test_split` ('rows' or 'norms'). stage_ablation: also train
    MoA on stage 2 alone for the same total steps (OUT/moa_stage2_only/) and report both (`two_stage`).
    """
    import torch

    from moa.base_model import load_moa
    from moa.data import load_jsonl, write_jsonl
    from moa.eval import evaluate, write_report
    from moa.infer.generate import generate_rows

    config = load_demo_config(config_path, quick, overrides)
    if test_split is not None:
        config.synth["test_split"] = test_split
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(asdict(config), indent=1, allow_nan=False) + "\n")
    timings, start = {}, time.perf_counter()
    names = ["synth", "pretrain", "moa", "shared", "eval", "generate"] + ["stage2_only"] * stage_ablation

    def begin(name: str, what: str) -> float:
        print(f"[{names.index(name) + 1}/{len(names)} {name}] {what}", flush=True)
        return time.perf_counter()

    def phase(name: str, began: float):
        timings[name] = round(time.perf_counter() - began, 1)
        print(f"[{name}] done in {timings[name]:.1f}s", flush=True)

    torch.manual_seed(seed)
    t = begin("synth", f"offline backend -> {out / 'data'}")
    summary = synthesize(config, out / "data", seed, progress)
    cultures = list(summary["counts"])
    phase("synth", t)

    t = begin("pretrain", f"tiny {config.model.family} on the bundled corpus -> {out / 'base'}")
    history = pretrain(config, out / "base", cultures, seed, progress)
    (out / "base" / "pretrain_metrics.json").write_text(json.dumps(history, allow_nan=False) + "\n")
    plot_pretrain(history, out / "pretrain.png")
    phase("pretrain", t)

    t = begin("moa", f"culture adapters + router -> {out / 'moa'}")
    moa_dir = train(config, out / "base", out / "data", out / "moa", cultures, seed, shared=False, progress=progress)
    phase("moa", t)

    t = begin("shared", f"shared-LoRA baseline -> {out / 'shared'}")
    shared_dir = train(config, out / "base", out / "data", out / "shared", cultures, seed, shared=True, progress=progress)
    phase("shared", t)

    t = begin("eval", f"held-out test split ({config.synth.get('test_split', 'norms')} held out)")
    model, tokenizer = load_moa(moa_dir)
    shared_model, _ = load_moa(shared_dir)
    rows = load_jsonl(out / "data" / "stage2_test.jsonl", cultures=cultures)
    results = evaluate(model, tokenizer, rows, shared_model=shared_model, batch_size=config.eval.batch_size,
                       max_length=config.eval.max_length, progress=progress)
    routed = results["routed"]
    gold = [cultures.index(r["culture"]) for r in rows]
    cued = [i for i, r in enumerate(rows) if r.get("cue", True)]
    results["routing_accuracy_cued"] = sum(routed[i] == gold[i] for i in cued) / len(cued) if cued else None
    results["n_rows_cued"] = len(cued)
    results["held_out_conflicting"] = held_out_conflicting(results, rows)
    phase("eval", t)

    t = begin("generate", "one mixed-culture batch, each prompt routed by the router")
    prompts = generation_rows(rows, config.generate.cultures)
    generations = generate_rows(model, tokenizer, prompts, routing="prompt", max_new_tokens=config.generate.max_new_tokens,
                                progress=progress)
    for g, p in zip(generations, prompts):
        g["reference"] = p["reference"]
    write_jsonl(out / "generations.jsonl", generations)
    phase("generate", t)

    timings["total"] = round(time.perf_counter() - start, 1)

    ablated_dir = None
    if stage_ablation:  # after the demo's own phases, so that their times stand alone
        ablated = stage2_only(config)
        t = begin("stage2_only", f"MoA on stage 2 alone, {ablated.train.stages[0]['steps']} steps -> {out / 'moa_stage2_only'}")
        ablated_dir = train(ablated, out / "base", out / "data", out / "moa_stage2_only", cultures, seed, shared=False,
                            progress=progress)
        ablated_results = evaluate(load_moa(ablated_dir)[0], tokenizer, rows, batch_size=config.eval.batch_size,
                                   max_length=config.eval.max_length, progress=progress, methods=("moa_oracle", "moa_router"))
        results["two_stage"] = two_stage_block(results, ablated_results, rows)
        results["two_stage_steps"] = {"stage1_then_stage2": "+".join(str(s["steps"]) for s in config.train.stages),
                                      "stage2_only": str(ablated.train.stages[0]["steps"])}
        phase("stage2_only", t)
    results.update(seed=seed, quick=quick, timings=timings, test_norms=summary["test_norms"],
                   test_split=config.synth.get("test_split", "norms"),
                   runs={"base": str(out / "base"), "moa": str(moa_dir), "shared": str(shared_dir),
                         **({"moa_stage2_only": str(ablated_dir)} if ablated_dir else {})})
    paths = write_report(results, out)
    print_summary(results, generations, paths, out)
    return results


def plot_pretrain(history: list[dict], path: Path) -> None:
    """The pre-training LM loss against the step."""
    from moa.plots import pyplot, save

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["lm_loss"] for h in history])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("LM loss")
    ax.set_title("pre-training on the bundled corpus")
    save(fig, path)


def print_summary(results: dict, generations: list[dict], paths: dict, out: Path) -> None:
    from moa.eval import format_markdown

    block = results["held_out_conflicting"]
    print()
    print(format_markdown(results))
    print(f"## Held-out conflicting-norm questions ({len(block['norms'])} norms: {', '.join(block['norms'])})")
    print()
    print("Label accuracy (%), all rows and rows whose prompt carries a cultural cue:")
    print()
    print(format_conflicting(block, results["cultures"]))
    print()
    print(f"Router sequence-level accuracy on these questions: {_pct(block['routing_accuracy_cued'])}% on the "
          f"{block['n_rows_cued']} cued rows, {_pct(block['routing_accuracy'])}% on all {block['n_rows']} rows "
          f"(cue-free prompts name no culture).")
    print(f"Router sequence-level accuracy on the whole test split: {_pct(results['routing_accuracy_cued'])}% on the "
          f"{results['n_rows_cued']} cued rows, {_pct(results['routing_accuracy'])}% on all {results['n_rows']} rows.")
    if "two_stage" in results:
        print()
        print("## Two-stage adaptation: stage 1 (broad) then stage 2 (tasks) against stage 2 alone, same total steps")
        print()
        print(format_two_stage(results["two_stage"], results["two_stage_steps"]))
    print()
    print("## Mixed-culture batch (one generate call, each prompt routed by the router)")
    print()
    for g in generations:
        print(f"- [{g['culture']} -> routed {g['router_choice']} ({g['router_confidence']:.2f})] {g['prompt']}")
        print(f"    model:     {g['text'].strip()}")
        print(f"    reference: {g['reference']}")
    print()
    plots = [paths.get("accuracy"), paths.get("confusion"), paths.get("routing_by_position"), out / "moa" / "metrics.png",
             out / "shared" / "metrics.png", out / "pretrain.png", out / "data" / "summary.png"]
    print("Plots: " + ", ".join(str(p) for p in plots if p is not None))
    print(f"Results: {paths['json']}, {paths['markdown']}; generations: {out / 'generations.jsonl'}")
    timings = results["timings"]
    print("Wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
          + (" (total: the demo's phases; stage2_only, the ablation, ran after them)" if "stage2_only" in timings else ""))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/demo", help="where every phase writes (replaced phase by phase): "
                                                                  "a new or empty directory or an earlier demo's")
    parser.add_argument("--overwrite", action="store_true", help="write into an --output-dir that holds other files")
    parser.add_argument("--seed", type=int, default=0, help="seed of synthesis, initialisation and training")
    parser.add_argument("--quick", action="store_true", help="a small version (about 2 minutes; no quality targets)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo config YAML")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="set config keys, dotted (pretrain.steps=100 train.stages.1.lr=1e-3), values read as YAML")
    parser.add_argument("--test-split", choices=("rows", "norms"), default=None,
                        help="override synth.test_split: 'rows' (unseen questions about trained customs) or 'norms' "
                             "(customs never trained on)")
    parser.add_argument("--stage-ablation", action="store_true",
                        help="also train MoA on stage 2 alone for the same total steps and report both (after the "
                             "demo's phases)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args) -> int:
    from moa.atomic import check_output_dir

    check_output_dir(args.output_dir, "data/work/state.json", inputs=[args.config], overwrite=args.overwrite,
                     replace=False)
    run_demo(args.output_dir, seed=args.seed, quick=args.quick, progress=not args.no_progress, config_path=args.config,
             test_split=args.test_split, stage_ablation=args.stage_ablation, overrides=args.overrides)
    return 0
