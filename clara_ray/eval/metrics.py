"""Answer and retrieval metrics as pure functions.

Answer metrics follow the SQuAD evaluation script: both strings are normalized
(lowercase, punctuation removed, articles "a"/"an"/"the" removed, whitespace
collapsed) and the best score over the reference answers is kept.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(character for character in text.lower() if character not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _check_answers(answers: Sequence[str]) -> None:
    if isinstance(answers, str):
        raise TypeError("answers must be a list of strings, not a single string")
    if not answers:
        raise ValueError("answers must hold at least one reference answer")


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized answer, else 0.0."""
    _check_answers(answers)
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(answer) for answer in answers))


def cover_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if a normalized answer appears, as whole words, inside the normalized prediction.

    FlashRAG's "acc" and CLaRa's cover-EM both ask whether the answer is covered by a
    longer generation; this is the contiguous form ("in Paris, France" covers "Paris";
    "Parisian" does not).
    """
    _check_answers(answers)
    normalized = f" {normalize_answer(prediction)} "
    return float(any(
        f" {answer} " in normalized for answer in map(normalize_answer, answers) if answer
    ))


def _token_f1(prediction_tokens: list[str], answer_tokens: list[str]) -> float:
    if not prediction_tokens or not answer_tokens:
        # SQuAD v2 convention: two empty answers agree, one empty answer scores 0.
        return float(prediction_tokens == answer_tokens)
    num_common = sum((Counter(prediction_tokens) & Counter(answer_tokens)).values())
    if num_common == 0:
        return 0.0
    precision = num_common / len(prediction_tokens)
    recall = num_common / len(answer_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Token-level F1 of the normalized strings, best over answers."""
    _check_answers(answers)
    prediction_tokens = normalize_answer(prediction).split()
    return max(_token_f1(prediction_tokens, normalize_answer(answer).split()) for answer in answers)


def recall_at_k(
    ranked_ids: Sequence[Sequence[str]], gold_ids: Sequence[Sequence[str]], k: int
) -> float:
    """Fraction of questions whose top-k ranked ids hold at least one gold id.

    Questions without gold ids are left out of the average.
    """
    _check_ranking_inputs(ranked_ids, gold_ids, k)
    hits = [
        float(not set(ranking[:k]).isdisjoint(gold))
        for ranking, gold in zip(ranked_ids, gold_ids)
        if gold
    ]
    if not hits:
        raise ValueError("no question has gold document ids; Recall@k is undefined")
    return mean(hits)


def mrr_at_k(
    ranked_ids: Sequence[Sequence[str]], gold_ids: Sequence[Sequence[str]], k: int
) -> float:
    """Mean over questions of 1 / (rank of the first gold id), 0 when none is in the top k.

    Questions without gold ids are left out of the average, as in ``recall_at_k``.
    """
    _check_ranking_inputs(ranked_ids, gold_ids, k)
    reciprocal_ranks = [
        next((1.0 / rank for rank, doc_id in enumerate(ranking[:k], start=1) if doc_id in set(gold)), 0.0)
        for ranking, gold in zip(ranked_ids, gold_ids)
        if gold
    ]
    if not reciprocal_ranks:
        raise ValueError("no question has gold document ids; MRR@k is undefined")
    return mean(reciprocal_ranks)


def _check_ranking_inputs(ranked_ids, gold_ids, k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(ranked_ids) != len(gold_ids):
        raise ValueError(
            f"got rankings for {len(ranked_ids)} questions but gold ids for {len(gold_ids)}"
        )


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of an empty sequence is undefined")
    return sum(values) / len(values)


def mean_exact_match(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    _check_lengths(predictions, answers)
    return mean([exact_match(prediction, gold) for prediction, gold in zip(predictions, answers)])


def mean_f1(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    _check_lengths(predictions, answers)
    return mean([f1_score(prediction, gold) for prediction, gold in zip(predictions, answers)])


def mean_cover_exact_match(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    _check_lengths(predictions, answers)
    return mean([cover_exact_match(prediction, gold) for prediction, gold in zip(predictions, answers)])


def _check_lengths(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions for {len(answers)} questions")
