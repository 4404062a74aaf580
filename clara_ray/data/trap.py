"""The similarity-trap corpus: a seeded benchmark where surface similarity misleads.

Each fictional person (e.g. "Zorvan Kellit") has three facts: a birth city, a
profession and an instrument. For every (person, relation) the corpus holds:

- one *gold* document that states the fact in words that avoid the question's
  words except the name ("Zorvan Kellit grew up near Marlow and still calls it home.");
- two *echo* documents that repeat the question's words and the name but hold
  no answer ("Which city was Zorvan Kellit born in? Nobody knows the birth city
  of Zorvan Kellit.").

So for every question the echoes share more words with it than the gold
document does: BM25 and an off-the-shelf dense encoder rank an echo first,
while a retriever trained through a generator's answer loss can learn that
only the gold document helps.

Questions are split by person: test questions ask about people who never
appear in a training question (one question per fact, random wording); training
questions cover the other people with every question wording. Names are built
from one shared inventory of 3-letter syllables, so test names reuse the
sub-word pieces of training names, and since every name part is exactly two
syllables, no full name is a substring of another.

Everything is drawn from ``random.Random(seed)``: the same arguments always give
the same corpus. Document ids (``d00000``, ...) follow a shuffled order, so an
id says nothing about which document is gold.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from clara_ray.data.formats import Document, QAExample, write_corpus, write_qa


@dataclass(frozen=True)
class Relation:
    """One kind of fact. Templates use ``{name}``, ``{value}`` and ``{a_value}`` ("an oboe")."""

    name: str
    values: tuple[str, ...]
    question_templates: tuple[str, ...]
    gold_templates: tuple[str, ...]
    echo_templates: tuple[str, ...]


RELATIONS: tuple[Relation, ...] = (
    Relation(
        name="birth_city",
        values=(
            "Marlow", "Tessin", "Brakka", "Quorin", "Velmora", "Ostrel", "Dunmere", "Halvik",
            "Corrin", "Pellan", "Yarrow", "Sendal", "Mirevale", "Tolliver", "Ashkirk", "Brennos",
            "Calden", "Farrow", "Grisby", "Lunvik", "Norrath", "Ravelle", "Stowick", "Umbrel",
        ),
        question_templates=(
            "Which city was {name} born in?",
            "In which city was {name} born?",
            "What is the birth city of {name}?",
        ),
        gold_templates=(
            "{name} grew up near {value} and still calls it home.",
            "{name} spent childhood years around {value}.",
            "{name} came into this world at {value}.",
        ),
        echo_templates=(
            "Which city was {name} born in? Records of the birth city of {name} were lost.",
            "In which city was {name} born? Nobody knows the birth city of {name}.",
            "What is the birth city of {name}? The city where {name} was born is unknown.",
            "The birth city of {name} is a question; which city {name} was born in is unknown.",
        ),
    ),
    Relation(
        name="profession",
        values=(
            "baker", "surveyor", "carpenter", "weaver", "potter", "tailor", "glassblower",
            "cartographer", "librarian", "chemist", "pilot", "sailor", "farmer", "jeweler",
            "locksmith", "architect", "nurse", "dentist", "florist", "butcher", "translator",
            "geologist", "astronomer", "beekeeper",
        ),
        question_templates=(
            "What is the profession of {name}?",
            "What job does {name} do for work?",
            "Which profession does {name} work in?",
        ),
        gold_templates=(
            "{name} earns a living as {a_value}.",
            "{name} has been {a_value} since leaving school.",
            "{name} trained many years to become {a_value}.",
        ),
        echo_templates=(
            "What is the profession of {name}? Nobody knows what job {name} does for work.",
            "Which profession does {name} work in? The profession of {name} was never recorded.",
            "What job does {name} do for work? The job and profession of {name} are unknown.",
            "The profession of {name} is a question; which job {name} does for work is unclear.",
        ),
    ),
    Relation(
        name="instrument",
        values=(
            "cello", "violin", "flute", "harp", "oboe", "trumpet", "banjo", "piano", "clarinet",
            "drum", "saxophone", "tuba", "lute", "mandolin", "accordion", "bassoon", "trombone",
            "ukulele", "harmonica", "viola", "sitar", "zither", "bagpipe", "xylophone",
        ),
        question_templates=(
            "Which instrument does {name} play?",
            "What musical instrument does {name} play?",
            "What instrument is {name} known to play?",
        ),
        gold_templates=(
            "{name} practices the {value} every evening.",
            "On stage, {name} performs with {a_value}.",
            "{name} owns an old {value} and carries it everywhere.",
        ),
        echo_templates=(
            "Which instrument does {name} play? Nobody has heard {name} play any instrument.",
            "What musical instrument does {name} play? The instrument of {name} is unknown.",
            "What instrument is {name} known to play? No musical instrument of {name} was seen.",
            "The musical instrument {name} is known to play is a question nobody can answer.",
        ),
    ),
)

# Every syllable has 3 letters, so every name part has 6: a full name can then
# only be a substring of another full name if the two are equal.
SYLLABLES: tuple[str, ...] = (
    "zor", "van", "kel", "lit", "mar", "ben", "dra", "fen", "gal", "hir", "jor", "kas",
    "lum", "nor", "pel", "qui", "rad", "sil", "tam", "vor", "wen", "yel", "bri", "dun",
)
ECHOES_PER_FACT = 2
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class TrapCorpus:
    documents: list[Document]
    train_qa: list[QAExample]
    test_qa: list[QAExample]


def words(text: str) -> set[str]:
    """Lowercase alphabetic words of ``text`` (used to check what a document shares)."""
    return set(_WORD.findall(text.lower()))


def _with_article(value: str) -> str:
    return f"an {value}" if value[0].lower() in "aeiou" else f"a {value}"


def _fill(template: str, name: str, value: str = "") -> str:
    return template.format(name=name, value=value, a_value=_with_article(value) if value else "")


def _reserved_words() -> set[str]:
    reserved: set[str] = set()
    for relation in RELATIONS:
        templates = relation.question_templates + relation.gold_templates + relation.echo_templates
        for text in templates + relation.values:
            reserved |= words(_fill(text, name="", value="x"))
        reserved |= {value.lower() for value in relation.values}
    return reserved


def _make_names(num_entities: int, rng: random.Random) -> list[str]:
    reserved = _reserved_words()
    max_attempts = 100 * num_entities
    names: list[str] = []
    seen: set[str] = set()
    for _ in range(max_attempts):
        first, family = ("".join(rng.choices(SYLLABLES, k=2)) for _ in range(2))
        full = f"{first.capitalize()} {family.capitalize()}"
        if first in reserved or family in reserved or full in seen:
            continue
        seen.add(full)
        names.append(full)
        if len(names) == num_entities:
            return names
    raise ValueError(f"could not draw {num_entities} distinct names; use fewer entities")


def generate_trap_corpus(
    num_entities: int = 160, test_fraction: float = 0.5, seed: int = 0
) -> TrapCorpus:
    """Build the corpus: 9 documents per entity, test questions on held-out entities."""
    if num_entities < 2:
        raise ValueError(f"num_entities must be at least 2, got {num_entities}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    num_test = round(num_entities * test_fraction)
    if not 0 < num_test < num_entities:
        raise ValueError(
            f"test_fraction={test_fraction} of {num_entities} entities leaves an empty split"
        )

    rng = random.Random(seed)
    names = _make_names(num_entities, rng)
    facts = [[rng.choice(relation.values) for relation in RELATIONS] for _ in names]

    # (text, gold key or None); gold key = (entity index, relation index).
    drafts: list[tuple[str, tuple[int, int] | None]] = []
    for entity, name in enumerate(names):
        for relation_index, relation in enumerate(RELATIONS):
            value = facts[entity][relation_index]
            gold_text = _fill(rng.choice(relation.gold_templates), name, value)
            drafts.append((gold_text, (entity, relation_index)))
            for template in rng.sample(relation.echo_templates, ECHOES_PER_FACT):
                drafts.append((_fill(template, name), None))
    rng.shuffle(drafts)

    documents: list[Document] = []
    gold_doc_id: dict[tuple[int, int], str] = {}
    for position, (text, gold_key) in enumerate(drafts):
        document = Document(id=f"d{position:05d}", text=text)
        documents.append(document)
        if gold_key is not None:
            gold_doc_id[gold_key] = document.id

    test_entities = set(rng.sample(range(num_entities), num_test))
    train_qa: list[QAExample] = []
    test_qa: list[QAExample] = []
    for entity, name in enumerate(names):
        for relation_index, relation in enumerate(RELATIONS):
            if entity in test_entities:
                templates = [rng.choice(relation.question_templates)]
                split, prefix = test_qa, "test"
            else:
                templates = list(relation.question_templates)
                split, prefix = train_qa, "train"
            for template in templates:
                split.append(
                    QAExample(
                        id=f"{prefix}-{len(split):05d}",
                        question=_fill(template, name),
                        answers=[facts[entity][relation_index]],
                        gold_doc_ids=[gold_doc_id[(entity, relation_index)]],
                    )
                )
    return TrapCorpus(documents=documents, train_qa=train_qa, test_qa=test_qa)


def write_trap_corpus(directory: str | Path, corpus: TrapCorpus) -> dict[str, Path]:
    """Write ``corpus.jsonl``, ``train_qa.jsonl`` and ``test_qa.jsonl`` into ``directory``."""
    directory = Path(directory)
    return {
        "corpus": write_corpus(directory / "corpus.jsonl", corpus.documents),
        "train_qa": write_qa(directory / "train_qa.jsonl", corpus.train_qa),
        "test_qa": write_qa(directory / "test_qa.jsonl", corpus.test_qa),
    }
