"""The offline backend: writes grounded samples from the bundled norms table, with no network or model.

It answers the same requests as an LLM backend and replies with the same JSON. The samples of a
request are built only from the norms behind the retrieved passages of the requested culture,
so retrieval decides what the samples are about. Each sample carries its norm id, whether its
prompt has a cultural cue, and the document it is grounded in.

Prompts carry cultural cues (the country, a city, a personal name) except for a `cue_free_share`
of them, which mention nothing cultural: the same cue-free prompt can have different answers in
different cultures.
"""
from __future__ import annotations

import hashlib
import json
import random
import re

from moa.data import norms
from moa.errors import UsageError
from moa.synth.backends import Backend, Reply
from moa.synth.prompting import SynthRequest

LETTERS = "ABCD"
MCQ_TAIL = "Answer with one letter."
YESNO_TAIL = "Is this appropriate by local custom? Answer yes or no."
OFFENSIVE_TAIL = "By local standards, is this offensive or not_offensive?"
# Question prefixes (mcq, open) and scenario openings (yesno, offensive) by cue kind.
QUESTION_CUES = {"country": "In {country}: ", "place": "In {place}: ", "name": "{name} asks: ",
                 "name_place": "{name} in {place} asks: "}
SCENARIO_CUES = {"country": "In {country}, someone {act}.", "place": "In {place}, someone {act}.",
                 "name": "{name} {act}.", "name_place": "In {place}, {name} {act}."}
CUE_FREE_SCENARIOS = ("Someone {act}.", "A person {act}.", "A guest {act}.")


def without_cue(prompt: str, culture: str) -> str:
    """A prompt this backend wrote for `culture`, with its cultural cue taken out: a question's cue prefix
    (`In Osaka: `, `Kenji asks: `) dropped, a scenario's cued opening (`In Osaka, Kenji `) replaced by `Someone `, as
    a cue-free scenario reads. A prompt without a cue comes back as it is. ValueError when a cue is left."""
    c = norms.cultures()[culture]
    values = [{"country": c.name, "place": place, "name": name} for place in c.places for name in c.names]
    openings = {template.format(**v): "" for template in QUESTION_CUES.values() for v in values}
    openings |= {template.split("{act}")[0].format(**v): "Someone " for template in SCENARIO_CUES.values() for v in values}
    for opening in sorted(openings, key=len, reverse=True):
        if prompt.startswith(opening):
            prompt = openings[opening] + prompt[len(opening):]
            break
    left = norms.cultures_mentioned(prompt) | {name for name in c.names if re.search(rf"\b{re.escape(name)}\b", prompt)}
    if left:
        raise ValueError(f"the prompt still names {sorted(left)} after its cue was taken out: {prompt[:80]!r}")
    return prompt


def _seeded(*parts) -> random.Random:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


class OfflineBackend(Backend):
    name = "offline"

    def __init__(self, seed: int = 0, cue_free_share: float = 0.15):
        if not 0 <= cue_free_share <= 1:
            raise UsageError(f"cue_free_share must be within [0, 1], got {cue_free_share}")
        self.seed, self.cue_free_share = seed, cue_free_share
        self.questions = {q.id: q for q in norms.questions()}
        self.taboos = {t.id: t for t in norms.taboos()}
        self.docs = {d["id"]: d for d in norms.corpus()}

    def identity(self) -> dict:
        return {"backend": self.name, "cue_free_share": self.cue_free_share}

    # -- cues -------------------------------------------------------------------------------
    def _cue(self, rng: random.Random, culture: str) -> dict | None:
        """A cue kind with its values, or None for a cue-free prompt."""
        if rng.random() < self.cue_free_share:
            return None
        c = norms.cultures()[culture]
        return {"kind": rng.choice(sorted(QUESTION_CUES)), "country": c.name, "place": rng.choice(c.places),
                "name": rng.choice(c.names)}

    def _question_prefix(self, cue: dict | None) -> str:
        return "" if cue is None else QUESTION_CUES[cue["kind"]].format(**cue)

    def _scenario(self, rng: random.Random, cue: dict | None, act: str) -> str:
        if cue is None:
            return rng.choice(CUE_FREE_SCENARIOS).format(act=act)
        return SCENARIO_CUES[cue["kind"]].format(act=act, **cue)

    # -- one sample per task ----------------------------------------------------------------
    def _mcq(self, rng, culture, q, cue):
        correct = q.correct(culture)
        gold = q.answers[culture]
        shown = [gold] + [letter for letter in q.options if letter not in correct]
        rng.shuffle(shown)
        lines = [f"{LETTERS[i]}) {q.options[letter]}" for i, letter in enumerate(shown)]
        prompt = "\n".join([self._question_prefix(cue) + q.q, *lines, MCQ_TAIL])
        return {"prompt": prompt, "response": LETTERS[shown.index(gold)]}

    def _yesno(self, rng, culture, q, cue, want_yes):
        wrong = [letter for letter in q.options if letter not in q.correct(culture)]
        letter = q.answers[culture] if want_yes or not wrong else rng.choice(wrong)
        scenario = self._scenario(rng, cue, q.act.format(o=q.options[letter]))
        return {"prompt": f"{scenario} {YESNO_TAIL}", "response": "yes" if letter in q.correct(culture) else "no"}

    def _offensive(self, rng, culture, t, cue):
        return {"prompt": f"{self._scenario(rng, cue, t.act)} {OFFENSIVE_TAIL}", "response": t.labels[culture]}

    def _open(self, rng, culture, norm, cue):
        prefix = self._question_prefix(cue)
        if norm.id in self.questions:
            answer = _capital(norm.options[norm.answers[culture]]) + "."
            note = norm.notes.get(culture)
            return {"prompt": prefix + norm.q, "response": f"{answer} {note}" if note else answer}
        verdict = ("No, that is considered offensive." if norm.labels[culture] == "offensive"
                   else "Yes, that is not considered offensive.")
        note = norm.notes.get(culture)
        return {"prompt": f"{prefix}Is it acceptable if someone {norm.act}?",
                "response": f"{verdict} {note}" if note else verdict}

    def _stage1(self, rng, culture, doc):
        """Broad knowledge: profile facts, values, and norms stated for the named culture."""
        c = norms.cultures()[culture]
        if doc["topic"] == "general":
            name, fact = rng.choice(sorted(norms.profile_facts(culture).items()))
            asks = {"capital": "What is the capital of {n}?", "languages": "What languages are spoken in {n}?",
                    "currency": "What currency is used in {n}?", "dishes": "Name some well-known dishes of {n}.",
                    "holidays": "What are some major holidays in {n}?"}
            return {"prompt": asks[name].format(n=c.name), "response": fact}, None
        if doc["topic"] == "values":
            ask = rng.choice(["What values are important in {n}?", "Describe the core cultural values of {n}.",
                              "What should a visitor know about social values in {n}?"])
            return {"prompt": ask.format(n=c.name), "response": c.values}, None
        norm_id = rng.choice(doc["norms"])
        if norm_id in self.questions:
            q = self.questions[norm_id]
            ask = rng.choice(["In {n}, {q}", "Tell me about customs in {n}. {q}", "About {n}: {q}"])
            prompt = ask.format(n=c.name, q=q.q[0].lower() + q.q[1:] if ask.startswith("In") else q.q)
            return {"prompt": prompt, "response": norms.question_fact(q, culture)}, norm_id
        t = self.taboos[norm_id]
        ask = rng.choice(["In {n}, is it offensive when someone {act}?", "How is it seen in {n} if someone {act}?"])
        return {"prompt": ask.format(n=c.name, act=t.act), "response": norms.taboo_fact(t, culture)}, norm_id

    # -- a request --------------------------------------------------------------------------
    def _usable(self, task: str, culture: str, norm_id: str) -> bool:
        q, t = self.questions.get(norm_id), self.taboos.get(norm_id)
        if task in ("mcq", "yesno"):
            return q is not None and culture in q.answers and (task == "mcq" or q.yesno)
        if task == "offensive":
            return t is not None and culture in t.labels
        return (q is not None and culture in q.answers) or (t is not None and culture in t.labels)

    async def generate(self, request: SynthRequest) -> Reply:
        return Reply(self.write(request))

    def write(self, request: SynthRequest) -> str:
        """The reply text (JSON samples) for one request."""
        culture, task = request.culture, request.task
        rng = _seeded(self.seed, request.seed, culture, task, request.stage, request.query, request.round,
                      [p["id"] for p in request.passages])
        own = [self.docs[p["id"]] for p in request.passages
               if p["id"] in self.docs and self.docs[p["id"]]["culture"] == culture]
        samples = []
        if request.stage == 1:
            usable = [d for d in own if d["topic"] in ("general", "values") or d["norms"]]
            for _ in range(request.n if usable else 0):
                doc = rng.choice(usable)
                sample, norm_id = self._stage1(rng, culture, doc)
                samples.append({**sample, "cue": True, "evidence": [doc["id"]], **({"norm": norm_id} if norm_id else {})})
            return json.dumps({"samples": samples}, ensure_ascii=False)
        grounded = [(doc["id"], norm_id) for doc in own for norm_id in doc["norms"] if self._usable(task, culture, norm_id)]
        if task == "offensive":
            by_label = {label: [g for g in grounded if self.taboos[g[1]].labels[culture] == label]
                        for label in norms.TABOO_LABELS}
        for i in range(request.n if grounded else 0):
            if task == "offensive":
                wanted = norms.TABOO_LABELS[i % 2]
                doc_id, norm_id = rng.choice(by_label[wanted] or grounded)
            else:
                doc_id, norm_id = rng.choice(grounded)
            cue = self._cue(rng, culture)
            if task == "mcq":
                sample = self._mcq(rng, culture, self.questions[norm_id], cue)
            elif task == "yesno":
                sample = self._yesno(rng, culture, self.questions[norm_id], cue, want_yes=i % 2 == 0)
            elif task == "offensive":
                sample = self._offensive(rng, culture, self.taboos[norm_id], cue)
            else:
                sample = self._open(rng, culture, self.questions.get(norm_id) or self.taboos[norm_id], cue)
            if task in ("mcq", "yesno", "offensive"):
                sample["label"] = sample["response"]
            samples.append({**sample, "norm": norm_id, "cue": cue is not None, "evidence": [doc_id]})
        return json.dumps({"samples": samples}, ensure_ascii=False)
