"""The invented world of the synthetic multi-turn benchmark: entity types, their attributes, the
passage and question templates of each attribute, and the word lists names are drawn from.

Every question template shares its attribute's key word with every passage template of that
attribute, so a question that names its entity is answerable by plain BM25; what a method must
add for the other turns is the entity, from the history.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "CATEGORIES",
    "CODAS",
    "LANDMARKS",
    "ONSETS",
    "PRODUCTS",
    "SCHEMA",
    "SUFFIXES",
    "TYPE_SHARE",
    "VOWELS",
    "Attr",
]


class Attr(NamedTuple):
    value: str
    """Kind of value: an entity type ("person", "city", ...) or a literal kind ("year", ...)."""
    passages: tuple[str, ...]
    """Passage templates; slots {name} {value} {category}."""
    questions: tuple[str, ...]
    """Question templates; slots {subj} {obj} {poss} (a name, a pronoun, or "that founder")."""
    bridge: str | None
    """Noun for a bridge back to the value entity ("that founder"); None if not an entity."""


SCHEMA: dict[str, dict[str, Attr]] = {
    "company": {
        "category": Attr(
            "category",
            (
                "{name} is a {category} business.",
                "{name} is a business in the {category} sector.",
            ),
            (
                "What kind of business is {subj}?",
                "In which business sector is {subj}?",
            ),
            None,
        ),
        "founded": Attr(
            "year",
            (
                "{name} was founded in {value}.",
                "The {category} company {name} was founded back in {value}.",
            ),
            (
                "When was {subj} founded?",
                "In which year was {subj} founded?",
            ),
            None,
        ),
        "headquarters": Attr(
            "city",
            (
                "{name} has its headquarters in {value}.",
                "The {category} firm {name} keeps its headquarters in {value}.",
            ),
            (
                "Where are {poss} headquarters?",
                "In which city does {subj} have its headquarters?",
            ),
            "city",
        ),
        "founder": Attr(
            "person",
            (
                "{value} is the founder of {name}.",
                "The founder of {name} was {value}.",
            ),
            (
                "Who is the founder of {obj}?",
                "Who was {poss} founder?",
            ),
            "founder",
        ),
        "ceo": Attr(
            "person",
            (
                "{name} is led by chief executive {value}.",
                "The chief executive of the {category} company {name} is {value}.",
            ),
            (
                "Who is the chief executive of {obj}?",
                "Who serves as {poss} chief executive?",
            ),
            "chief executive",
        ),
        "product": Attr(
            "product",
            (
                "{name} is best known for its product, the {value}.",
                "The flagship product of {name} is the {value}.",
            ),
            (
                "What is {poss} best known product?",
                "What is the flagship product of {obj}?",
            ),
            None,
        ),
    },
    "person": {
        "category": Attr(
            "category",
            (
                "{name} is a {category} by profession.",
                "By profession, {name} is a {category}.",
            ),
            (
                "What is {poss} profession?",
                "What does {subj} do by profession?",
            ),
            None,
        ),
        "born_in": Attr(
            "city",
            (
                "{name} was born in the city of {value}.",
                "The {category} {name} was born in {value}.",
            ),
            (
                "Where was {subj} born?",
                "In which city was {subj} born?",
            ),
            "city",
        ),
        "birth_year": Attr(
            "year",
            (
                "{name}'s year of birth is {value}.",
                "The {category} {name} has {value} as year of birth.",
            ),
            (
                "What is {poss} year of birth?",
                "Which year of birth does {subj} have?",
            ),
            None,
        ),
        "employer": Attr(
            "company",
            (
                "The employer of {name} is {value}.",
                "{name} works for the employer {value}.",
            ),
            (
                "Who is {poss} employer?",
                "Which employer does {subj} work for?",
            ),
            "employer",
        ),
        "alma_mater": Attr(
            "university",
            (
                "{name} studied at {value}.",
                "The {category} {name} studied at {value} as a student.",
            ),
            (
                "Where has {subj} studied?",
                "Which university has {subj} studied at?",
            ),
            "university",
        ),
        "award": Attr(
            "award",
            (
                "{name} received the {value} award.",
                "For the work, {name} won the {value} award.",
            ),
            (
                "What award did {subj} receive?",
                "Which award has {subj} won?",
            ),
            None,
        ),
    },
    "city": {
        "category": Attr(
            "category",
            (
                "{name} is a {category} city.",
                "{name} is known as a {category} city.",
            ),
            (
                "What kind of city is {subj}?",
                "What sort of city is {subj}?",
            ),
            None,
        ),
        "country": Attr(
            "country",
            (
                "{name} lies in the country of {value}.",
                "{name} is in the country {value}.",
            ),
            (
                "Which country is {subj} in?",
                "In what country does {subj} lie?",
            ),
            None,
        ),
        "population": Attr(
            "number",
            (
                "{name} has a population of {value} people.",
                "The population of {name} is about {value} people.",
            ),
            (
                "What is {poss} population?",
                "How many people make up {poss} population?",
            ),
            None,
        ),
        "mayor": Attr(
            "person",
            (
                "The mayor of {name} is {value}.",
                "{value} serves as mayor of {name}.",
            ),
            (
                "Who is the mayor of {obj}?",
                "Who is {poss} mayor?",
            ),
            "mayor",
        ),
        "river": Attr(
            "river",
            (
                "The {value} river flows through {name}.",
                "{name} lies on the banks of the {value} river.",
            ),
            (
                "Which river runs through {obj}?",
                "What river is {subj} on?",
            ),
            None,
        ),
        "landmark": Attr(
            "landmark",
            (
                "{name} is famous for its landmark, the {value}.",
                "The best-known landmark of {name} is the {value}.",
            ),
            (
                "What landmark is {subj} famous for?",
                "What is {poss} best-known landmark?",
            ),
            None,
        ),
    },
    "university": {
        "category": Attr(
            "category",
            (
                "{name} is a {category} university.",
                "{name} is a university with a {category} focus.",
            ),
            (
                "What kind of university is {subj}?",
                "What is the focus of {subj} as a university?",
            ),
            None,
        ),
        "founded": Attr(
            "year",
            (
                "{name} was founded in {value}.",
                "{name}, a {category} school, was founded in {value}.",
            ),
            (
                "When was {subj} founded?",
                "In which year was {subj} founded?",
            ),
            None,
        ),
        "located_in": Attr(
            "city",
            (
                "The campus of {name} is located in {value}.",
                "{name} has its campus in {value}.",
            ),
            (
                "Where is {poss} campus?",
                "In which city is {poss} campus located?",
            ),
            "city",
        ),
        "rector": Attr(
            "person",
            (
                "The rector of {name} is {value}.",
                "{value} leads {name} as rector.",
            ),
            (
                "Who is the rector of {obj}?",
                "Who is {poss} rector?",
            ),
            "rector",
        ),
        "students": Attr(
            "number",
            (
                "{name} enrolls {value} students.",
                "Some {value} students attend {name}.",
            ),
            (
                "How many students does {subj} have?",
                "How many students attend {obj}?",
            ),
            None,
        ),
        "motto": Attr(
            "motto",
            (
                "The motto of {name} is {value}.",
                "{name} chose the motto {value}.",
            ),
            (
                "What is {poss} motto?",
                "Which motto did {subj} choose?",
            ),
            None,
        ),
    },
}
CATEGORIES = {
    "company": (
        "shipping",
        "software",
        "textile",
        "mining",
        "brewing",
        "aerospace",
        "publishing",
        "pharmaceutical",
    ),
    "person": (
        "architect",
        "violinist",
        "chemist",
        "novelist",
        "surveyor",
        "cartographer",
        "engineer",
        "painter",
    ),
    "city": ("port", "mountain", "border", "market", "garrison", "spa"),
    "university": ("technical", "agricultural", "maritime", "medical", "arts"),
}
TYPE_SHARE = (("company", 0.30), ("person", 0.35), ("city", 0.20), ("university", 0.15))
SUFFIXES = ("Works", "Lines", "Labs", "Holdings", "Group", "Industries")
PRODUCTS = ("lamp", "engine", "loom", "valve", "drill", "press", "compass", "kettle")
LANDMARKS = ("tower", "bridge", "gate", "cathedral", "market hall", "lighthouse")
ONSETS = tuple(
    [
        "b",
        "c",
        "d",
        "f",
        "g",
        "h",
        "k",
        "l",
        "m",
        "n",
        "p",
        "r",
        "s",
        "t",
        "v",
        "z",
        "br",
        "dr",
        "gr",
        "kr",
        "st",
        "tr",
        "th",
        "sh",
    ]
)
VOWELS = tuple(["a", "e", "i", "o", "u", "ai", "ei", "ou"])
CODAS = ["", "", "", "n", "r", "l", "s", "k", "m"]
