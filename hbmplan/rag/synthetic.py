"""A locally generated multi-turn retrieval benchmark: invented entities and facts, one passage per
fact, dialogues with coreference, bridges, topic shifts and returns, one gold passage per turn.

Nothing is downloaded; the same ``BenchConfig`` always yields the same benchmark. The two splits
are two disjoint *worlds* of entities whose passages share one corpus, so a method tuned on
``dev`` has never seen a ``test`` entity, and every passage of both worlds is a distractor.

Turn kinds (the proportions are fixed in ``BenchConfig`` before any method was run):

- ``opening``: the first turn, names its entity ("When was Varelko founded?");
- ``follow-up``: same entity, by pronoun ("Who runs it?");
- ``bridge``: the entity that was the previous turn's *answer* ("Where was that founder born?");
- ``shift``: a new entity, named;
- ``return``: an entity of an earlier topic, by a descriptor unique in the dialogue but not in
  the corpus ("Back to the shipping company: who runs it?").
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from hbmplan.rag.synthetic_schema import (
    CATEGORIES,
    CODAS,
    LANDMARKS,
    ONSETS,
    PRODUCTS,
    SCHEMA,
    SUFFIXES,
    TYPE_SHARE,
    VOWELS,
)

__all__ = ["BenchConfig", "Benchmark", "Dialogue", "Turn", "TurnKind", "generate"]

TurnKind = Literal["opening", "follow-up", "bridge", "shift", "return"]
KINDS: tuple[TurnKind, ...] = ("opening", "follow-up", "bridge", "shift", "return")


@dataclass(frozen=True)
class BenchConfig:
    """What to generate. Defaults are the benchmark the README reports."""

    seed: int = 0
    """Seed of the one ``random.Random`` every choice draws from."""
    entities_per_split: int = 160
    """Entities in each world (dev, test); each has 6 facts, one passage per fact."""
    dialogues_per_split: int = 120
    """Dialogues generated over each world."""
    min_turns: int = 8
    """Fewest turns in a dialogue."""
    max_turns: int = 16
    """Most turns in a dialogue (uniform in [min_turns, max_turns])."""
    p_follow_up: float = 0.40
    """Chance that a turn asks about the current entity again, by pronoun."""
    p_bridge: float = 0.15
    """Chance of asking about the previous answer's entity (when that answer is an entity)."""
    p_return: float = 0.20
    """Chance of returning to an earlier topic (when one is left); the rest are shifts."""

    def __post_init__(self) -> None:
        if self.entities_per_split < 20:
            raise ValueError(
                f"entities_per_split must be >= 20 (each type needs a few), "
                f"got {self.entities_per_split}"
            )
        if self.dialogues_per_split < 1:
            raise ValueError(f"dialogues_per_split must be >= 1, got {self.dialogues_per_split}")
        if not 2 <= self.min_turns <= self.max_turns:
            raise ValueError(
                f"turns must satisfy 2 <= min_turns <= max_turns, "
                f"got min_turns={self.min_turns}, max_turns={self.max_turns}"
            )
        if self.max_turns > self.entities_per_split // 2:
            raise ValueError(
                f"max_turns must be <= entities_per_split // 2 (every shift needs a new entity), "
                f"got max_turns={self.max_turns}, entities_per_split={self.entities_per_split}"
            )
        probs = (self.p_follow_up, self.p_bridge, self.p_return)
        if any(p < 0 for p in probs) or sum(probs) > 1:
            raise ValueError(
                f"p_follow_up, p_bridge, p_return must be >= 0 with sum <= 1, got {probs}"
            )


@dataclass(frozen=True)
class Turn:
    """One user turn. ``query`` is all a method may read; the rest is for scoring and analysis."""

    query: str
    gold: int
    """Index into ``Benchmark.corpus`` of the one passage that answers the query."""
    kind: TurnKind


@dataclass(frozen=True)
class Dialogue:
    id: str
    turns: tuple[Turn, ...]

    @property
    def queries(self) -> list[str]:
        """The user's words, turn by turn: the only part of a dialogue a method is given."""
        return [t.query for t in self.turns]


@dataclass(frozen=True)
class Benchmark:
    corpus: tuple[str, ...]
    """Passages of both worlds, shuffled; a passage's index is its id."""
    splits: dict[str, tuple[Dialogue, ...]] = field(default_factory=dict)
    """``"dev"`` and ``"test"``: dialogues over disjoint entities."""
    entities: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Each split's entity names (for analysis and tests; no method reads them)."""
    config: BenchConfig = BenchConfig()


@dataclass
class _Entity:
    type: str
    name: str
    category: str
    gender: str = "it"
    facts: dict[str, object] = field(default_factory=dict)  # attr -> str value or _Entity
    passages: dict[str, int] = field(default_factory=dict)  # attr -> corpus index
    texts: dict[str, str] = field(default_factory=dict)  # attr -> passage text

    def refs(self) -> dict[str, str]:
        if self.gender == "it":
            return {"subj": "it", "obj": "it", "poss": "its"}
        he = self.gender == "he"
        return {
            "subj": "he" if he else "she",
            "obj": "him" if he else "her",
            "poss": "his" if he else "her",
        }

    def descriptors(self, shown: str, asked: list[str]) -> list[str]:
        """Ways a user can point back at this entity without its name, using only what the
        dialogue has shown them (``shown``: the correct answers so far about it, ``asked``: the
        attributes asked about it)."""
        out = []
        if self.category in shown.split():
            out.append(f"the {self.category}" + ("" if self.type == "person" else f" {self.type}"))
        noun = "person" if self.type == "person" else self.type
        for a in asked:
            v = self.facts[a]
            if SCHEMA[self.type][a].value != "category":
                out.append(f"the {noun} linked to {getattr(v, 'name', v)}")
        return out


class _Names:
    def __init__(self, rng: random.Random) -> None:
        self.rng, self.used = rng, set()

    def word(self) -> str:
        while True:
            n = self.rng.choice((2, 2, 3))
            parts = [self.rng.choice(ONSETS) + self.rng.choice(VOWELS) for _ in range(n)]
            w = ("".join(parts) + self.rng.choice(CODAS)).capitalize()
            if w not in self.used and len(w) >= 4:
                self.used.add(w)
                return w


def _world(rng: random.Random, names: _Names, n: int) -> list[_Entity]:
    ents: list[_Entity] = []
    counts = [max(3, round(n * share)) for _, share in TYPE_SHARE]
    surnames = [names.word() for _ in range(max(4, counts[1] // 2))]
    taken: set[str] = set()
    for (typ, _), count in zip(TYPE_SHARE, counts, strict=True):
        for _ in range(count):
            cat = rng.choice(CATEGORIES[typ])
            gender = rng.choice(("she", "he")) if typ == "person" else "it"
            name = ""
            while not name or name in taken:
                if typ == "person":
                    name = f"{names.word()} {rng.choice(surnames)}"
                elif typ == "company":
                    base = rng.choice(surnames) if rng.random() < 0.4 else names.word()
                    name = f"{base} {rng.choice(SUFFIXES)}"
                elif typ == "university":
                    name = f"{names.word()} Institute"
                else:
                    name = names.word()
            taken.add(name)
            ents.append(_Entity(typ, name, cat, gender))
    by_type = {t: [e for e in ents if e.type == t] for t, _ in TYPE_SHARE}
    countries = [names.word() for _ in range(6)]
    for e in ents:
        for attr, spec in SCHEMA[e.type].items():
            e.facts[attr] = _value(rng, names, spec.value, e, by_type, countries)
    return ents


def _value(rng, names, kind, e, by_type, countries):
    if kind in by_type:
        return rng.choice([x for x in by_type[kind] if x is not e])
    if kind == "category":
        return e.category
    if kind == "year":
        return str(rng.randint(1850, 2015))
    if kind == "number":
        return f"{rng.randint(2, 900)},{rng.randint(0, 999):03d}"
    if kind == "product":
        return f"{names.word()} {rng.choice(PRODUCTS)}"
    if kind == "award":
        return f"{names.word()} {rng.choice(('Prize', 'Medal', 'Honour'))}"
    if kind == "landmark":
        return f"{names.word()} {rng.choice(LANDMARKS)}"
    if kind == "motto":
        return f"'{names.word()} {names.word().lower()}'"
    if kind == "country":
        return rng.choice(countries)
    return names.word()  # river


def _passage(rng: random.Random, e: _Entity, attr: str) -> str:
    value = e.facts[attr]
    text = rng.choice(SCHEMA[e.type][attr].passages)
    text = text.format(name=e.name, value=getattr(value, "name", value), category=e.category)
    for vowel in "aeiou":  # "a engineer" -> "an engineer"
        text = text.replace(f" a {vowel}", f" an {vowel}")
    return text


def _question(rng: random.Random, e: _Entity, attr: str, ref: dict[str, str]) -> str:
    q = rng.choice(SCHEMA[e.type][attr].questions).format(**ref)
    return q[0].upper() + q[1:]


def _named(e: _Entity) -> dict[str, str]:
    return {"subj": e.name, "obj": e.name, "poss": f"{e.name}'s"}


def _dialogue(rng: random.Random, cfg: BenchConfig, ents: list[_Entity], did: str) -> Dialogue:
    asked: dict[str, list[str]] = {}  # entity name -> attributes asked, in order
    shown: dict[str, str] = {}  # entity name -> the correct answers about it so far
    topics: list[_Entity] = []

    def unasked(e: _Entity) -> list[str]:
        return [a for a in SCHEMA[e.type] if a not in asked.get(e.name, ())]

    def pointers(e: _Entity) -> list[str]:
        """Descriptors of ``e`` that no other topic of this dialogue shares."""
        mine = e.descriptors(shown.get(e.name, ""), asked.get(e.name, []))
        others = {
            d
            for t in topics
            if t is not e
            for d in t.descriptors(shown.get(t.name, ""), asked.get(t.name, []))
        }
        return [d for d in mine if d not in others]

    cur = rng.choice(ents)
    attr = rng.choice(unasked(cur))
    turns = [Turn(_question(rng, cur, attr, _named(cur)), cur.passages[attr], "opening")]
    for _ in range(rng.randint(cfg.min_turns, cfg.max_turns) - 1):
        asked.setdefault(cur.name, []).append(attr)
        shown[cur.name] = shown.get(cur.name, "") + " " + _words(cur.texts[attr])
        if cur not in topics:
            topics.append(cur)
        answer = cur.facts[attr]
        relation = SCHEMA[cur.type][attr].bridge
        returns = [t for t in topics if t is not cur and unasked(t) and pointers(t)]
        r = rng.random()
        p1, p2 = cfg.p_follow_up, cfg.p_follow_up + cfg.p_bridge
        p3 = p2 + cfg.p_return
        if r < p1 and unasked(cur):
            kind, e, ref = "follow-up", cur, cur.refs()
        elif r < p2 and isinstance(answer, _Entity) and relation and unasked(answer):
            that = f"that {relation}"
            kind, e, ref = "bridge", answer, {"subj": that, "obj": that, "poss": f"{that}'s"}
        elif r < p3 and returns:
            kind, e, ref = "return", rng.choice(returns), None
        else:
            fresh = [x for x in ents if x not in topics and x is not answer]
            kind, e = "shift", rng.choice(fresh)
            ref = _named(e)
        attr = rng.choice(unasked(e))
        if kind == "return":
            q = _question(rng, e, attr, e.refs())
            lead = rng.choice(
                ("Back to {d}: {l}", "Returning to {d}, {l}", "Going back to {d}, {l}")
            )
            q = lead.format(d=rng.choice(pointers(e)), l=q[0].lower() + q[1:])
        else:
            q = _question(rng, e, attr, ref)
        turns.append(Turn(q, e.passages[attr], kind))
        cur = e
    return Dialogue(did, tuple(turns))


def _words(text: str) -> str:
    return " ".join("".join(c if c.isalnum() else " " for c in text).lower().split())


def generate(config: BenchConfig | None = None) -> Benchmark:
    """Build the benchmark described by ``config`` (``BenchConfig()`` when None): the corpus of
    both worlds and, for each split, its dialogues. Deterministic in ``config``."""
    cfg = config if config is not None else BenchConfig()
    rng = random.Random(cfg.seed)
    names = _Names(rng)
    worlds = {split: _world(rng, names, cfg.entities_per_split) for split in ("dev", "test")}
    facts = [(e, a) for ents in worlds.values() for e in ents for a in SCHEMA[e.type]]
    order = list(range(len(facts)))
    rng.shuffle(order)
    corpus = []
    for pid, i in enumerate(order):
        e, a = facts[i]
        e.passages[a] = pid
        e.texts[a] = _passage(rng, e, a)
        corpus.append(e.texts[a])
    splits = {
        split: tuple(
            _dialogue(rng, cfg, ents, f"{split}-{d:04d}") for d in range(cfg.dialogues_per_split)
        )
        for split, ents in worlds.items()
    }
    entities = {split: tuple(e.name for e in ents) for split, ents in worlds.items()}
    return Benchmark(tuple(corpus), splits, entities, cfg)
