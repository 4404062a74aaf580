"""The similarity-trap corpus: a seeded benchmark where surface similarity misleads.

Fictional people (e.g. "Zorvan Kellit") each have one fact per relation of the
corpus's family (`trap_families.py`; the bundled family: birth city, profession,
instrument). For every (person, relation) the corpus holds:

- one *gold* document that states the fact in words that avoid the question's
  words except the name ("Zorvan Kellit grew up near Marlow and still calls it home.");
- *echo* documents (two in the bundled family) that repeat the question's words
  and the name but hold no answer ("Which city was Zorvan Kellit born in? Nobody
  knows the birth city of Zorvan Kellit.");
- in some families *near-miss* documents that name the person and a wrong value
  in the question's words ("Was Zorvan Kellit born in Tessin? No, ..."), and
  filler sentences that lengthen every kind of document alike.

So for every question the echoes share more words with it than the gold
document does: BM25 and an off-the-shelf dense encoder rank an echo first,
while a retriever trained through a generator's answer loss can learn that
only the gold document helps.

Questions are split by person: test questions ask about people who never
appear in a training question (one question per fact, random wording); training
questions cover the other people with every question wording. Names are built
from one shared syllable inventory (the family's name pool), so test names reuse
the sub-word pieces of training names, and since every name part of a pool has
the same length, no full name is a substring of another.

Everything is drawn from ``random.Random(seed)``: the same arguments always give
the same corpus (the bundled family's corpora are those of every figure measured
before families existed). Document ids (``d00000``, ...) follow a shuffled order,
so an id says nothing about which document is gold."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from clara_ray.data.formats import Document, QAExample, write_corpus, write_qa
from clara_ray.data.trap_families import FAMILIES, FILLERS, NAME_POOLS, Relation, TrapFamily

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


def _reserved_words(family: TrapFamily, relations: list[Relation]) -> set[str]:
    """Words no name part may be: every word of the templates, values and fillers in use."""
    reserved: set[str] = set()
    for relation in relations:
        templates = relation.question_templates + relation.gold_templates + relation.echo_templates
        if family.near_misses_per_fact:
            templates += relation.near_miss_templates
        for text in templates + relation.values:
            reserved |= words(_fill(text, name="", value="x"))
        reserved |= {value.lower() for value in relation.values}
    if family.fillers_per_document[1]:
        for filler in FILLERS:
            reserved |= words(filler)
    return reserved


def _make_names(num_entities: int, syllables: tuple[str, ...], reserved: set[str], rng: random.Random) -> list[str]:
    max_attempts = 100 * num_entities
    names: list[str] = []
    seen: set[str] = set()
    for _ in range(max_attempts):
        first, family = ("".join(rng.choices(syllables, k=2)) for _ in range(2))
        full = f"{first.capitalize()} {family.capitalize()}"
        if first in reserved or family in reserved or full in seen:
            continue
        seen.add(full)
        names.append(full)
        if len(names) == num_entities:
            return names
    raise ValueError(f"could not draw {num_entities} distinct names; use fewer entities")


def _draw(bounds: tuple[int, int], rng: random.Random) -> int:
    low, high = bounds
    return low if low == high else rng.randint(low, high)  # no draw when fixed: same stream as before families


def generate_trap_corpus(
    num_entities: int = 160, test_fraction: float = 0.5, seed: int = 0, family: str = "bundled"
) -> TrapCorpus:
    """Draw a corpus of ``family`` (`trap_families.FAMILIES`); test questions ask about held-out people."""
    if family not in FAMILIES:
        raise ValueError(f"unknown trap family {family!r}; known: {', '.join(FAMILIES)}")
    kind = FAMILIES[family]
    if num_entities < 2:
        raise ValueError(f"num_entities must be at least 2, got {num_entities}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    num_test = round(num_entities * test_fraction)
    if not 0 < num_test < num_entities:
        raise ValueError(
            f"test_fraction={test_fraction} of {num_entities} entities leaves an empty split"
        )

    relations = kind.relation_list()
    rng = random.Random(seed)
    names = _make_names(num_entities, NAME_POOLS[kind.name_pool], _reserved_words(kind, relations), rng)
    facts = [[rng.choice(relation.values) for relation in relations] for _ in names]

    # (text, gold key or None); gold key = (entity index, relation index).
    drafts: list[tuple[str, tuple[int, int] | None]] = []
    for entity, name in enumerate(names):
        for relation_index, relation in enumerate(relations):
            value = facts[entity][relation_index]
            gold_text = _fill(rng.choice(relation.gold_templates), name, value)
            drafts.append((gold_text, (entity, relation_index)))
            for template in rng.sample(relation.echo_templates, _draw(kind.echoes_per_fact, rng)):
                drafts.append((_fill(template, name), None))
            wrong_values = [other for other in relation.values if other != value]
            for _ in range(kind.near_misses_per_fact):
                template = rng.choice(relation.near_miss_templates)
                drafts.append((_fill(template, name, rng.choice(wrong_values)), None))
    if kind.fillers_per_document[1]:
        drafts = [(_pad(text, _draw(kind.fillers_per_document, rng), rng), key) for text, key in drafts]
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
        for relation_index, relation in enumerate(relations):
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


def _pad(text: str, num_fillers: int, rng: random.Random) -> str:
    """``text`` among ``num_fillers`` filler sentences, at a random place."""
    sentences = rng.sample(FILLERS, num_fillers)
    sentences.insert(rng.randint(0, num_fillers), text)
    return " ".join(sentences)


def write_trap_corpus(directory: str | Path, corpus: TrapCorpus) -> dict[str, Path]:
    """Write ``corpus.jsonl``, ``train_qa.jsonl`` and ``test_qa.jsonl`` into ``directory``."""
    directory = Path(directory)
    return {
        "corpus": write_corpus(directory / "corpus.jsonl", corpus.documents),
        "train_qa": write_qa(directory / "train_qa.jsonl", corpus.train_qa),
        "test_qa": write_qa(directory / "test_qa.jsonl", corpus.test_qa),
    }
