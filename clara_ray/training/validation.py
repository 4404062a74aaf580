"""A validation split of the training questions, and retrieval measured on it while
stage 3 runs (the metric sweeps rank trials by; test questions are never used).

    train, validation = split_validation(QuestionBatch.from_qa(train_qa), 0.2, seed)
    metrics = validation_recall(model, tokenizer, validation, candidates, num_candidates, question_max_len)
"""

from __future__ import annotations

import random

from clara_ray.eval.evaluate import query_reasoner_rankings
from clara_ray.eval.metrics import recall_at_k
from clara_ray.training.examples import QuestionBatch
from clara_ray.training.candidates import CandidateSource


def split_validation(questions: QuestionBatch, fraction: float, seed: int) -> tuple[QuestionBatch, QuestionBatch]:
    """(training, validation): whole groups of questions sharing a first gold document
    go to one side, so no validation question's document is trained on through
    another question; about `fraction` of the questions are held out (at least one group)."""
    if questions.gold_doc_ids is None:
        raise ValueError("a validation split needs gold_doc_ids in the training QA file (retrieval is scored against them)")
    groups: dict[str, list[int]] = {}
    for row, gold in enumerate(questions.gold_doc_ids):
        groups.setdefault(gold[0] if gold else questions.question_ids[row], []).append(row)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    held: list[int] = []
    for key in keys:
        if held and len(held) >= fraction * len(questions):
            break
        held.extend(groups[key])
    if len(held) == len(questions):
        raise ValueError(f"holding out {fraction} of {len(questions)} training questions leaves none to train on")
    held_set = set(held)
    return (questions.take([i for i in range(len(questions)) if i not in held_set]), questions.take(sorted(held)))


def validation_recall(model, tokenizer, questions: QuestionBatch, candidates: CandidateSource, num_candidates: int,
                      question_max_len: int, batch_size: int = 64) -> dict[str, float]:
    """Recall@1 and @5 of the query reasoner's ranking (index candidates, exact re-score),
    as the evaluation ranks test questions, and the mean reciprocal rank of the gold
    document within the L candidates (0 when it is not among them): it moves before
    recall@1 does, so early stopping can tell trials apart while recall is still 0."""
    was_training, rankings = model.training, []
    model.eval()
    try:
        for start in range(0, len(questions), batch_size):
            chunk = questions.take(list(range(start, min(start + batch_size, len(questions)))))
            rankings += query_reasoner_rankings(
                model, tokenizer, chunk.questions, lambda keys, n: candidates.candidates(keys, n, chunk.question_ids),
                max(num_candidates, 5), question_max_len, batch_size,
            )
    finally:
        model.train(was_training)
    gold = [list(g) for g in questions.gold_doc_ids]
    reciprocal = [max((1 / (rank + 1) for rank, doc in enumerate(ranking) if doc in g), default=0.0)
                  for ranking, g in zip(rankings, gold)]
    return {"val_recall_at_1": recall_at_k(rankings, gold, 1), "val_recall_at_5": recall_at_k(rankings, gold, 5),
            "val_mrr": sum(reciprocal) / len(reciprocal)}

