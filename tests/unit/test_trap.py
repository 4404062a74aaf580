import dataclasses
import re

import pytest

from clara_ray.data.formats import BadRowPolicy, read_corpus, read_qa
from clara_ray.data.trap import TrapCorpus, generate_trap_corpus, words, write_trap_corpus
from clara_ray.data.trap_families import FAMILIES, FILLERS, HELD_OUT_FAMILIES, NAME_POOLS, RELATIONS

NAME = re.compile(r"\b[A-Z][a-z]{5,7} [A-Z][a-z]{5,7}\b")  # every name: two parts of two syllables


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def corpus(family) -> TrapCorpus:
    return generate_trap_corpus(seed=0, family=family)


def _name_of(question: str) -> str:
    (name,) = NAME.findall(question)
    return name


def _value_words(family: str) -> dict[str, str]:
    """Lowercased value -> relation name, for the family's relations."""
    return {value.lower(): name for name in FAMILIES[family].relations for value in RELATIONS[name].values}


def _gold_ids(corpus) -> set[str]:
    return {example.gold_doc_ids[0] for example in corpus.train_qa + corpus.test_qa}


def test_sizes(corpus, family):
    kind = FAMILIES[family]
    facts = 160 * len(kind.relations)
    assert len(_gold_ids(corpus)) == facts
    low = facts * (1 + kind.echoes_per_fact[0] + kind.near_misses_per_fact)
    high = facts * (1 + kind.echoes_per_fact[1] + kind.near_misses_per_fact)
    assert low <= len(corpus.documents) <= high
    if low < high:  # drawn per fact: some of each count
        assert low < len(corpus.documents) < high
    assert len(corpus.test_qa) == 80 * len(kind.relations)
    assert len(corpus.train_qa) == 80 * len(kind.relations) * kind.question_templates


def test_bundled_family_is_the_corpus_of_earlier_figures():
    corpus = generate_trap_corpus(seed=0)
    assert len(corpus.documents) == 160 * 3 * 3 and len(corpus.train_qa) == 80 * 9
    assert [d.text for d in corpus.documents[:2]] == [
        "Quipel Silhir owns an old cello and carries it everywhere.",
        "Which city was Radjor Galdun born in? Records of the birth city of Radjor Galdun were lost.",
    ]
    assert corpus.test_qa[0].question == "What is the birth city of Wentam Jordra?"
    assert max(len(document.text.split()) for document in corpus.documents) <= 20


def test_same_seed_same_corpus_other_seed_differs(corpus, family):
    assert generate_trap_corpus(seed=0, family=family) == corpus
    assert generate_trap_corpus(seed=1, family=family) != corpus


def test_ids_unique_and_present(corpus):
    document_ids = [document.id for document in corpus.documents]
    assert len(set(document_ids)) == len(document_ids)
    qa_ids = [example.id for example in corpus.train_qa + corpus.test_qa]
    assert len(set(qa_ids)) == len(qa_ids)
    known = set(document_ids)
    for example in corpus.train_qa + corpus.test_qa:
        assert len(example.gold_doc_ids) == 1 and example.gold_doc_ids[0] in known


def test_gold_documents_hold_the_answer_and_avoid_question_words(corpus, family):
    texts = {document.id: document.text for document in corpus.documents}
    values = _value_words(family)
    for example in corpus.train_qa + corpus.test_qa:
        gold_text = texts[example.gold_doc_ids[0]]
        (answer,) = example.answers
        name = _name_of(example.question)
        gold_words = words(gold_text)
        assert answer.lower() in gold_words and name in gold_text
        assert gold_words & set(values) == {answer.lower()}
        assert not (words(example.question) - words(name)) & gold_words, (example, gold_text)


def test_other_documents_never_hold_their_persons_answer_and_outword_the_gold(corpus, family):
    kind = FAMILIES[family]
    values = _value_words(family)
    texts = {document.id: document.text for document in corpus.documents}
    facts = {}  # (name, relation) -> answer
    for example in corpus.train_qa + corpus.test_qa:
        (answer,) = example.answers
        facts[_name_of(example.question), values[answer.lower()]] = answer.lower()
    gold_ids = _gold_ids(corpus)
    others = [document for document in corpus.documents if document.id not in gold_ids]
    near_misses = 0
    for document in others:
        (name,) = set(NAME.findall(document.text))  # each other document is about one person
        held = words(document.text) & set(values)
        assert len(held) <= 1, document
        if held:  # a near miss: a value, never the person's own
            near_misses += 1
            (value,) = held
            assert facts[name, values[value]] != value, document
    assert near_misses == len(gold_ids) * kind.near_misses_per_fact
    for example in corpus.test_qa:
        name = _name_of(example.question)
        question_words = words(example.question)
        shared_with_gold = len(question_words & words(texts[example.gold_doc_ids[0]]))
        closer = sum(len(question_words & words(d.text)) > shared_with_gold for d in others if name in d.text)
        assert closer >= kind.echoes_per_fact[0], example


def test_fillers_lengthen_documents_of_every_kind(corpus, family):
    kind = FAMILIES[family]
    gold_ids = _gold_ids(corpus)
    padded = {d.id for d in corpus.documents if any(filler in d.text for filler in FILLERS)}
    if kind.fillers_per_document[1] == 0:
        assert not padded
    else:
        assert padded & gold_ids and padded - gold_ids
        if kind.fillers_per_document[0] > 0:
            assert len(padded) == len(corpus.documents)


def test_document_order_does_not_reveal_gold(corpus):
    gold_positions = sorted(int(doc_id[1:]) for doc_id in _gold_ids(corpus))
    assert gold_positions[0] < 50 and gold_positions[-1] > len(corpus.documents) - 50
    gaps = {b - a for a, b in zip(gold_positions, gold_positions[1:])}
    assert len(gaps) > 3


def test_split_is_by_entity(corpus):
    train_names = {_name_of(example.question) for example in corpus.train_qa}
    test_names = {_name_of(example.question) for example in corpus.test_qa}
    assert len(train_names) == 80 and len(test_names) == 80
    assert not train_names & test_names
    train_text = " ".join(example.question for example in corpus.train_qa)
    for name in test_names:
        assert name not in train_text
    # Test names are built from the same syllables as training names.
    train_parts = {part for name in train_names for part in name.split()}
    assert any(part in train_parts for name in test_names for part in name.split())


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_names_unique_and_not_substrings(family_name):
    corpus = generate_trap_corpus(num_entities=300, seed=3, family=family_name)
    names = {_name_of(example.question) for example in corpus.train_qa + corpus.test_qa}
    assert len(names) == 300
    for name in names:
        assert sum(name in other for other in names) == 1


def test_every_fact_asked_once_in_test_and_with_every_wording_in_train(corpus, family):
    test_facts = [(example.gold_doc_ids[0]) for example in corpus.test_qa]
    assert len(set(test_facts)) == len(test_facts)
    by_fact: dict[str, int] = {}
    for example in corpus.train_qa:
        by_fact[example.gold_doc_ids[0]] = by_fact.get(example.gold_doc_ids[0], 0) + 1
    assert set(by_fact.values()) == {FAMILIES[family].question_templates}


def test_held_out_families_share_nothing_with_the_tuning_families():
    tuning = [kind for name, kind in FAMILIES.items() if name not in HELD_OUT_FAMILIES]
    held_out = [FAMILIES[name] for name in HELD_OUT_FAMILIES]
    assert len(held_out) >= 2
    tuning_relations = {r for kind in tuning for r in kind.relations}
    tuning_syllables = {s for kind in tuning for s in NAME_POOLS[kind.name_pool]}
    for kind in held_out:
        assert not set(kind.relations) & tuning_relations
        assert not set(NAME_POOLS[kind.name_pool]) & tuning_syllables


def test_templates_follow_the_rules():
    all_values = {value.lower() for relation in RELATIONS.values() for value in relation.values}
    assert len(all_values) == sum(len(relation.values) for relation in RELATIONS.values())
    question_words = set()
    for relation in RELATIONS.values():
        asked = set().union(*(words(q.format(name="")) for q in relation.question_templates))
        question_words |= asked
        for gold in relation.gold_templates:
            assert not words(gold.format(name="", value="", a_value="")) & asked, gold
        for template in relation.echo_templates + relation.near_miss_templates:
            assert not words(template.format(name="", value="", a_value="")) & all_values, template
    for filler in FILLERS:
        assert not words(filler) & (question_words | all_values), filler


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_entities": 1},
        {"test_fraction": 0.0},
        {"test_fraction": 1.0},
        {"num_entities": 3, "test_fraction": 0.1},
        {"family": "no_such_family"},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        generate_trap_corpus(**kwargs)


def test_write_and_read_back(tmp_path):
    corpus = generate_trap_corpus(num_entities=10, seed=5, family="held_out_b")
    paths = write_trap_corpus(tmp_path, corpus)
    assert set(paths) == {"corpus", "train_qa", "test_qa"}
    assert paths["corpus"] == tmp_path / "corpus.jsonl"
    documents = read_corpus(paths["corpus"], BadRowPolicy.FAIL)
    train = read_qa(paths["train_qa"], BadRowPolicy.FAIL)
    test = read_qa(paths["test_qa"], BadRowPolicy.FAIL)
    assert not documents.quarantined and not train.quarantined and not test.quarantined
    loaded = TrapCorpus(documents.records, train.records, test.records)
    assert dataclasses.asdict(loaded) == dataclasses.asdict(corpus)
