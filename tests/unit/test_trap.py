import dataclasses

import pytest

from clara_ray.data.formats import BadRowPolicy, read_corpus, read_qa
from clara_ray.data.trap import (
    RELATIONS,
    TrapCorpus,
    generate_trap_corpus,
    words,
    write_trap_corpus,
)

ALL_VALUES = {value.lower() for relation in RELATIONS for value in relation.values}
RELATION_BY_VALUE = {value: relation for relation in RELATIONS for value in relation.values}


@pytest.fixture(scope="module")
def corpus() -> TrapCorpus:
    return generate_trap_corpus(seed=0)


def _name_of(question: str) -> str:
    # Every name is two capitalized words; questions start with a capital too.
    capitalized = [word.strip("?") for word in question.split()[1:] if word[0].isupper()]
    assert len(capitalized) == 2, question
    return " ".join(capitalized)


def test_default_sizes(corpus):
    assert len(corpus.documents) == 160 * 3 * 3 >= 1000
    assert len(corpus.test_qa) == 80 * 3 >= 200
    num_question_templates = sum(len(relation.question_templates) for relation in RELATIONS)
    assert len(corpus.train_qa) == 80 * num_question_templates


def test_same_seed_same_corpus_other_seed_differs(corpus):
    assert generate_trap_corpus(seed=0) == corpus
    assert generate_trap_corpus(seed=1) != corpus


def test_ids_unique_and_present(corpus):
    document_ids = [document.id for document in corpus.documents]
    assert len(set(document_ids)) == len(document_ids)
    qa_ids = [example.id for example in corpus.train_qa + corpus.test_qa]
    assert len(set(qa_ids)) == len(qa_ids)
    known = set(document_ids)
    for example in corpus.train_qa + corpus.test_qa:
        assert len(example.gold_doc_ids) == 1 and example.gold_doc_ids[0] in known


def test_gold_documents_hold_the_answer_and_avoid_question_words(corpus):
    texts = {document.id: document.text for document in corpus.documents}
    for example in corpus.train_qa + corpus.test_qa:
        gold_text = texts[example.gold_doc_ids[0]]
        (answer,) = example.answers
        name = _name_of(example.question)
        gold_words = words(gold_text)
        assert answer.lower() in gold_words
        assert words(name) <= gold_words
        relation_values = {value.lower() for value in RELATION_BY_VALUE[answer].values}
        other_values = relation_values - {answer.lower()}
        assert not gold_words & other_values
        assert not (words(example.question) - words(name)) & gold_words, (example, gold_text)


def test_echo_documents_hold_no_value_and_outword_the_gold(corpus):
    gold_ids = {example.gold_doc_ids[0] for example in corpus.train_qa + corpus.test_qa}
    echoes = [document for document in corpus.documents if document.id not in gold_ids]
    assert len(echoes) == 2 * len(gold_ids) and len(gold_ids) == 160 * 3
    for echo in echoes:
        assert not words(echo.text) & ALL_VALUES, echo
    texts = {document.id: document.text for document in corpus.documents}
    for example in corpus.test_qa:
        name = _name_of(example.question)
        question_words = words(example.question)
        shared_with_gold = len(question_words & words(texts[example.gold_doc_ids[0]]))
        num_closer_echoes = sum(
            len(question_words & words(echo.text)) > shared_with_gold
            for echo in echoes
            if name in echo.text
        )
        assert num_closer_echoes >= 2, example


def test_documents_are_short(corpus):
    assert max(len(document.text.split()) for document in corpus.documents) <= 20


def test_document_order_does_not_reveal_gold(corpus):
    gold_positions = sorted(
        int(example.gold_doc_ids[0][1:]) for example in corpus.test_qa + corpus.train_qa
    )
    # Unshuffled, every third document would be gold.
    assert gold_positions != list(range(0, len(corpus.documents), 3))
    assert gold_positions[0] < 50 and gold_positions[-1] > len(corpus.documents) - 50


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


def test_names_unique_and_not_substrings():
    corpus = generate_trap_corpus(num_entities=300, seed=3)
    names = {_name_of(example.question) for example in corpus.train_qa + corpus.test_qa}
    assert len(names) == 300
    for name in names:
        assert sum(name in other for other in names) == 1


def test_every_fact_asked_once_in_test_and_with_every_wording_in_train(corpus):
    test_facts = [(example.gold_doc_ids[0]) for example in corpus.test_qa]
    assert len(set(test_facts)) == len(test_facts)
    by_fact: dict[str, int] = {}
    for example in corpus.train_qa:
        by_fact[example.gold_doc_ids[0]] = by_fact.get(example.gold_doc_ids[0], 0) + 1
    assert set(by_fact.values()) == {3}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_entities": 1},
        {"test_fraction": 0.0},
        {"test_fraction": 1.0},
        {"num_entities": 3, "test_fraction": 0.1},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        generate_trap_corpus(**kwargs)


def test_write_and_read_back(tmp_path):
    corpus = generate_trap_corpus(num_entities=10, seed=5)
    paths = write_trap_corpus(tmp_path, corpus)
    assert set(paths) == {"corpus", "train_qa", "test_qa"}
    assert paths["corpus"] == tmp_path / "corpus.jsonl"
    documents = read_corpus(paths["corpus"], BadRowPolicy.FAIL)
    train = read_qa(paths["train_qa"], BadRowPolicy.FAIL)
    test = read_qa(paths["test_qa"], BadRowPolicy.FAIL)
    assert not documents.quarantined and not train.quarantined and not test.quarantined
    loaded = TrapCorpus(documents.records, train.records, test.records)
    assert dataclasses.asdict(loaded) == dataclasses.asdict(corpus)
