import pytest
import torch

from clara_ray.modeling.topk import retrieval_scores, select_memory, straight_through_topk
from clara_ray.training.settings import annealed_temperature


def test_forward_is_hard_topk_in_order():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.5], [0.7, 0.2, 0.8, 0.0]])
    weights = straight_through_topk(scores, k=3, temperature=0.1)
    assert weights.shape == (2, 3, 4)
    picked = weights.argmax(-1)
    assert picked.tolist() == [[1, 3, 2], [2, 0, 1]]
    expected = torch.nn.functional.one_hot(picked, 4).float()
    assert torch.allclose(weights, expected, atol=1e-6)


def test_backward_is_masked_softmax_per_slot():
    scores = torch.tensor([[2.0, 1.0, 0.0]], requires_grad=True)
    tau = 0.5
    weights = straight_through_topk(scores, k=2, temperature=tau)
    # d/d scores of sum over slot 2 weights of candidate 2 (= softmax over the unchosen {1, 2}).
    weights[0, 1, 2].backward()
    p = torch.softmax(torch.tensor([1.0, 0.0]) / tau, dim=0)  # slot 2 over candidates 1, 2
    expected = torch.tensor([0.0, -p[1] * p[0] / tau, p[1] * (1 - p[1]) / tau])
    assert torch.allclose(scores.grad[0], expected, atol=1e-5)


def test_sampled_topk_draws_the_first_pick_from_the_softmax_and_never_repeats_a_candidate():
    scores = torch.tensor([0.30, 0.25, 0.10, 0.0]).repeat(20000, 1)
    tau = 0.1
    torch.manual_seed(0)
    weights = straight_through_topk(scores, k=2, temperature=tau, sample=True)
    picked = weights.argmax(-1)  # (N, 2)
    assert torch.allclose(weights, torch.nn.functional.one_hot(picked, 4).float(), atol=1e-6)
    assert (picked[:, 0] != picked[:, 1]).all()
    first = torch.bincount(picked[:, 0], minlength=4).float() / len(picked)
    # 20,000 draws: each share within 0.015 of its probability (over 4 standard errors).
    assert torch.allclose(first, torch.softmax(scores[0] / tau, dim=0), atol=0.015)
    # Not the best two every time: the third and fourth candidates are read too.
    assert (picked >= 2).any(dim=1).float().mean() > 0.2


def test_sampled_topk_gradient_is_the_perturbed_softmax_of_the_picked_slot():
    scores = torch.tensor([[2.0, 1.0, 0.0]], requires_grad=True)
    torch.manual_seed(3)
    weights = straight_through_topk(scores, k=1, temperature=0.5, sample=True)
    torch.manual_seed(3)
    uniform = torch.rand(1, 3).clamp(min=torch.finfo(torch.float32).tiny)
    perturbed = (scores.detach() - 0.5 * torch.log(-torch.log(uniform))) / 0.5
    assert weights[0, 0].argmax() == perturbed.argmax()
    weights[0, 0, 2].backward()
    p = torch.softmax(perturbed[0], dim=0)
    expected = torch.tensor([-p[2] * p[0], -p[2] * p[1], p[2] * (1 - p[2])]) / 0.5
    assert torch.allclose(scores.grad[0], expected, atol=1e-5)


def test_selected_memory_forward_equals_picked_candidates():
    memory = torch.randn(2, 5, 3, 4)
    scores = torch.randn(2, 5)
    weights = straight_through_topk(scores, k=2, temperature=0.02)
    selected = select_memory(weights, memory)
    order = scores.argsort(-1, descending=True)[:, :2]
    expected = torch.stack([memory[b, order[b]] for b in range(2)])
    assert torch.allclose(selected, expected, atol=1e-6)


def test_retrieval_scores_are_cosine_of_flattened_memory():
    query = torch.randn(1, 2, 3)
    candidates = torch.randn(1, 4, 2, 3)
    scores = retrieval_scores(query, candidates)
    expected = torch.nn.functional.cosine_similarity(query.flatten(1), candidates.flatten(2)[0], dim=-1)
    assert torch.allclose(scores[0], expected, atol=1e-6)


@pytest.mark.parametrize("k, tau", [(0, 0.1), (5, 0.1), (2, 0.0)])
def test_rejects_bad_arguments(k, tau):
    with pytest.raises(ValueError):
        straight_through_topk(torch.randn(1, 4), k=k, temperature=tau)


def test_annealed_temperature_goes_geometrically_from_initial_to_final():
    assert annealed_temperature(1, 5, 0.1, 0.02) == pytest.approx(0.1)
    assert annealed_temperature(5, 5, 0.1, 0.02) == pytest.approx(0.02)
    assert annealed_temperature(3, 5, 0.1, 0.02) == pytest.approx((0.1 * 0.02) ** 0.5)  # geometric midpoint
    assert annealed_temperature(2, 3, 0.05, 0.05) == pytest.approx(0.05)  # constant when equal
    with pytest.raises(ValueError, match="step"):
        annealed_temperature(0, 5, 0.1, 0.02)
    with pytest.raises(ValueError, match="temperatures"):
        annealed_temperature(1, 5, 0.0, 0.02)
