"""The pre-training texts, all from the bundled corpus, and the tokenizer fitted on them.

The corpus documents of the demo's cultures, their facts retold under cultural cues and the cue
lists. No synthesized row (stage 1 or stage 2) is read, neither here nor by the tokenizer: what
the tasks ask is learnt by the adapters, not by the base.
"""
from __future__ import annotations

import random

from moa.errors import UsageError

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2: the pad and eos ids of moa.tiny.tiny_config


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


def retold_facts(rng: random.Random, cultures: list[str], copies: int, per_text: int) -> list[dict]:
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
            texts.append({"culture": key, "text": cue + " " + " ".join(f[0].upper() + f[1:] + "." for f in chosen)})
    return texts


def cue_lists(rng: random.Random, cultures: list[str], copies: int) -> list[dict]:
    """Each culture's cities and personal names, in a random order."""
    from moa.data import norms

    texts = []
    for key in cultures:
        c = norms.cultures()[key]
        for _ in range(copies):
            places, names = rng.sample(c.places, len(c.places)), rng.sample(c.names, len(c.names))
            texts.append({"culture": key, "text": f"Cities in {c.name}: " + ", ".join(places) + "."})
            texts.append({"culture": key, "text": f"Common names in {c.name}: " + ", ".join(names) + "."})
    return texts


def pretrain_texts(section, cultures: list[str], seed: int) -> list[dict]:
    """The pre-training texts of the demo config's `pretrain` section for `cultures`, as text rows
    `{"culture", "text"}` (moa.training's `train_base` data; the culture labels the loss statistics)."""
    from moa.data.norms import corpus

    rng = random.Random(seed)
    texts = [{"culture": doc["culture"], "text": doc["text"]} for doc in corpus() if doc["culture"] in cultures]
    texts += retold_facts(rng, cultures, section.retold_copies, section.retold_facts)
    texts += cue_lists(rng, cultures, section.cue_list_copies)
    return texts
