import pytest

from clara_ray.eval.metrics import (
    exact_match,
    f1_score,
    mean,
    mean_exact_match,
    mean_f1,
    normalize_answer,
    recall_at_k,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat", "cat"),
        ("  a  big\tdog. ", "big dog"),
        ("An apple, the pear!", "apple pear"),
        ("theater", "theater"),  # articles only as whole words
        ("Anne", "anne"),
        ("don't", "dont"),  # punctuation is deleted, not replaced by a space
        ("U.S.A.", "usa"),
        ("", ""),
        ("the", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_is_max_over_answers():
    assert exact_match("The Marlow.", ["Tessin", "marlow"]) == 1.0
    assert exact_match("Marlow city", ["Marlow"]) == 0.0


def test_f1_partial_overlap():
    # normalized: ["big", "cat"] vs ["big", "dog"]: precision 1/2, recall 1/2.
    assert f1_score("the big cat", ["big dog"]) == pytest.approx(0.5)
    # ["big", "cat"] vs ["big"]: precision 1/2, recall 1 -> 2/3.
    assert f1_score("big cat", ["big"]) == pytest.approx(2 / 3)


def test_f1_counts_repeated_tokens_once_per_match():
    # ["a1", "a1", "b"] vs ["a1"]: one common token, precision 1/3, recall 1 -> 0.5.
    assert f1_score("a1 a1 b", ["a1"]) == pytest.approx(0.5)


def test_f1_is_max_over_answers_and_handles_empty():
    assert f1_score("big cat", ["dog", "big cat"]) == 1.0
    assert f1_score("cat", ["dog"]) == 0.0
    assert f1_score("the", ["a"]) == 1.0  # both normalize to empty
    assert f1_score("the", ["cat"]) == 0.0


def test_answers_must_be_a_non_empty_list():
    with pytest.raises(ValueError):
        exact_match("x", [])
    with pytest.raises(TypeError):
        f1_score("x", "x")


def test_recall_at_k():
    ranked = [["d1", "d2", "d3"], ["d4", "d5", "d6"], ["d7", "d8", "d9"], ["d1"]]
    gold = [["d1"], ["d6", "x"], ["nope"], []]  # the last question has no gold: left out
    assert recall_at_k(ranked, gold, 1) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, gold, 3) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, gold, 10) == pytest.approx(2 / 3)


def test_recall_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match="no question has gold"):
        recall_at_k([["d1"]], [[]], 1)
    with pytest.raises(ValueError):
        recall_at_k([["d1"]], [["d1"]], 0)
    with pytest.raises(ValueError):
        recall_at_k([["d1"]], [["d1"], ["d2"]], 1)


def test_means():
    assert mean([1.0, 0.0, 0.5]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mean([])
    assert mean_exact_match(["a cat", "dog"], [["cat"], ["bird"]]) == 0.5
    assert mean_f1(["the big cat", "dog"], [["big dog"], ["dog"]]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        mean_f1(["x"], [])


def test_cover_exact_match_needs_the_answer_as_whole_words():
    from clara_ray.eval.metrics import cover_exact_match, mean_cover_exact_match

    assert cover_exact_match("It was in Paris, France.", ["paris"]) == 1.0
    assert cover_exact_match("The Parisian side", ["Paris"]) == 0.0
    assert cover_exact_match("New York City", ["the new york"]) == 1.0  # articles normalised away
    assert cover_exact_match("anything", ["!!"]) == 0.0  # an answer that normalises to nothing covers nothing
    assert mean_cover_exact_match(["a b c", "x"], [["b c"], ["y"]]) == 0.5


def test_mrr_at_k_by_hand():
    from clara_ray.eval.metrics import mrr_at_k

    rankings = [["a", "g", "c"], ["g", "b", "c"], ["a", "b", "c"], ["a", "b"]]
    gold = [["g"], ["g", "b"], ["x"], []]  # the last has no gold and is left out
    assert mrr_at_k(rankings, gold, 3) == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert mrr_at_k(rankings, gold, 1) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        mrr_at_k(rankings, gold, 0)
