"""Surface-similarity baselines, and the check that the trap corpus fools them.

The MiniLM check on the full default corpus for seeds 0-2 takes about 30 s per seed
on 2 CPU cores (marked slow; `pytest -m "not slow"` skips it). The fast test runs
MiniLM on a smaller trap corpus (the trap is per entity, so size does not matter).
"""

import pytest

from clara_ray.data.formats import Document
from clara_ray.data.trap import generate_trap_corpus
from clara_ray.data.trap_families import FAMILIES
from clara_ray.eval.baselines import bm25_rankings, dense_rankings
from clara_ray.eval.metrics import recall_at_k

TOY_DOCUMENTS = [
    Document("cats", "Cats are small furry animals that purr and chase mice."),
    Document("rain", "Rain falls from clouds when water droplets grow heavy."),
    Document("piano", "A piano has 88 keys and is played with both hands.", title="Piano"),
]
TOY_QUESTIONS = ["Which animal purrs and chases mice?", "How many keys does a piano have?"]
MAX_TRAP_RECALL_AT_1 = 0.2


def _trap_recall(rank, corpus) -> tuple[float, float]:
    questions = [example.question for example in corpus.test_qa]
    gold = [example.gold_doc_ids for example in corpus.test_qa]
    rankings = rank(corpus.documents, questions, 5)
    return recall_at_k(rankings, gold, 1), recall_at_k(rankings, gold, 5)


@pytest.mark.parametrize("rank", [bm25_rankings, dense_rankings])
def test_rankings_find_the_obvious_document(rank):
    rankings = rank(TOY_DOCUMENTS, TOY_QUESTIONS, 2)
    assert [ranking[0] for ranking in rankings] == ["cats", "piano"]
    assert all(len(ranking) == 2 and len(set(ranking)) == 2 for ranking in rankings)
    assert rank(TOY_DOCUMENTS, [], 1) == []


@pytest.mark.parametrize("rank", [bm25_rankings, dense_rankings])
def test_k_out_of_range_raises(rank):
    with pytest.raises(ValueError, match="k must be between"):
        rank(TOY_DOCUMENTS, TOY_QUESTIONS, 4)


def test_bm25_handles_questions_without_known_words():
    (ranking,) = bm25_rankings(TOY_DOCUMENTS, ["zzzz qqqq"], 3)
    assert sorted(ranking) == sorted(document.id for document in TOY_DOCUMENTS)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bm25_falls_for_the_trap(seed, family):
    recall_1, recall_5 = _trap_recall(bm25_rankings, generate_trap_corpus(seed=seed, family=family))
    print(f"BM25 {family} seed={seed}: Recall@1={recall_1:.3f} Recall@5={recall_5:.3f}")
    assert recall_1 <= MAX_TRAP_RECALL_AT_1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_minilm_falls_for_the_trap_small_corpus(family):
    recall_1, recall_5 = _trap_recall(dense_rankings, generate_trap_corpus(num_entities=40, seed=0, family=family))
    print(f"MiniLM {family} 40 entities: Recall@1={recall_1:.3f} Recall@5={recall_5:.3f}")
    assert recall_1 <= MAX_TRAP_RECALL_AT_1


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_minilm_falls_for_the_trap_default_corpus(seed):
    recall_1, recall_5 = _trap_recall(dense_rankings, generate_trap_corpus(seed=seed))
    print(f"MiniLM seed={seed}: Recall@1={recall_1:.3f} Recall@5={recall_5:.3f}")
    assert recall_1 <= MAX_TRAP_RECALL_AT_1
