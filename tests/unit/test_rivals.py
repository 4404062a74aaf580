import random
import re

from clara_ray.data.formats import QAExample
from clara_ray.data.trap import generate_trap_corpus
from clara_ray.data.trap_families import FAMILIES
from clara_ray.training.batches import stage1_examples
from clara_ray.training.rivals import ask_text, rival_documents

NAME = re.compile(r"[A-Z][a-z]{5} [A-Z][a-z]{5}")


def test_ask_is_the_question_without_the_words_of_its_gold_document():
    assert ask_text("Which city was Ann Lee born in?", "Ann Lee grew up near Marlow.") == "Which city was born in"
    assert ask_text("Where?", "") == "Where"


def test_rivals_answer_the_same_kind_of_question_about_someone_else():
    corpus = generate_trap_corpus(num_entities=40, seed=3)
    documents = {d.id: d.text for d in corpus.documents}
    rivals = rival_documents(documents, corpus.train_qa, pool=6, seed=0)
    relation_of = {}  # gold document id -> relation index
    for qa in corpus.train_qa:
        question_relation = next(
            r for r, relation in enumerate(FAMILIES["bundled"].relation_list())
            if any(qa.question == t.format(name=NAME.search(qa.question).group(0)) for t in relation.question_templates)
        )
        relation_of[qa.gold_doc_ids[0]] = question_relation
    for qa, chosen in zip(corpus.train_qa, rivals):
        assert len(chosen) == 6
        person = NAME.search(qa.question).group(0)
        for doc_id in chosen:
            assert doc_id not in qa.gold_doc_ids
            assert person not in documents[doc_id]
            assert qa.answers[0].lower() not in documents[doc_id].lower()
        # Most share the question's relation (the ask); with ties broken at random
        # the same wording about different people gets different rivals.
        same_relation = sum(relation_of[d] == relation_of[qa.gold_doc_ids[0]] for d in chosen)
        assert same_relation >= 5
    first_wording = [r for qa, r in zip(corpus.train_qa, rivals) if qa.question.startswith("Which city was")]
    assert len({tuple(r) for r in first_wording}) > len(first_wording) // 2


def test_rivals_need_two_questions_with_gold_documents():
    documents = {"a": "Ann is a baker."}
    qa = [QAExample("q1", "What is Ann?", ["baker"], ["a"]), QAExample("q2", "Who?", ["x"], ["missing"])]
    assert rival_documents(documents, qa, pool=3, seed=0) == [[], []]


def test_rivals_join_the_hard_distractors():
    from clara_ray.training.batches import _distractors

    documents = {f"d{i}": f"doc {i}" for i in range(30)}
    qa = [QAExample("q1", "about d3?", ["x"], ["d3"])]
    example = stage1_examples(documents, qa, neighbours=[["d7", "d8"]], rivals=[["d3", "d20", "d21"]])[-1]
    assert example.rivals == (20, 21)  # never the question's own gold document
    rng = random.Random(0)
    drawn = set()
    for _ in range(50):
        chosen = _distractors(example, len(documents), 4, 1.0, rng)
        assert set(chosen) == {7, 8, 20, 21}
        drawn.update(_distractors(example, len(documents), 2, 1.0, rng))
    assert drawn == {7, 8, 20, 21}
