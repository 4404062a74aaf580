"""Differentiable top-k selection (straight-through), as in CLaRa stage 3.

Forward: a hard top-k — slot j holds exactly the j-th best candidate.
Backward: slot j's one-hot is replaced by a softmax (temperature tau) over the
candidates not chosen by slots 1..j-1, so the generator's loss reaches the
retrieval scores of every remaining candidate, not only of the picked one.
"""

from __future__ import annotations

import torch


def straight_through_topk(scores: torch.Tensor, k: int, temperature: float, sample: bool = False) -> torch.Tensor:
    """Selection weights for the top-k of ``scores``.

    scores: (B, L) retrieval scores of L candidates per query.
    Returns weights (B, k, L): forward values are one-hot rows picking the
    k best candidates in descending order; gradients are those of the masked
    softmax(scores / temperature) of each slot.
    sample: perturb the scores by temperature x Gumbel(0, 1) noise (torch's global
    generator) first, so the k picked are a sample without replacement from
    softmax(scores / temperature) (Gumbel top-k), and the backward softmaxes are
    those of the perturbed scores (straight-through Gumbel-softmax).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (batch, candidates), got shape {tuple(scores.shape)}")
    num_candidates = scores.shape[1]
    if not 1 <= k <= num_candidates:
        raise ValueError(f"k must be in [1, {num_candidates}] (number of candidates), got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    if sample:
        uniform = torch.rand_like(scores).clamp(min=torch.finfo(scores.dtype).tiny)
        scores = scores - temperature * torch.log(-torch.log(uniform))
    chosen = torch.zeros_like(scores, dtype=torch.bool)  # (B, L)
    slots = []
    for _ in range(k):
        masked = scores.masked_fill(chosen, float("-inf"))
        soft = torch.softmax(masked / temperature, dim=-1)  # (B, L), 0 on chosen
        index = masked.argmax(dim=-1)  # (B,)
        hard = torch.nn.functional.one_hot(index, num_candidates).to(scores.dtype)
        slots.append(hard + soft - soft.detach())
        chosen = chosen | hard.bool()
    return torch.stack(slots, dim=1)  # (B, k, L)


def select_memory(weights: torch.Tensor, candidate_memory: torch.Tensor) -> torch.Tensor:
    """Mix candidate memories by selection weights.

    weights: (B, k, L); candidate_memory: (B, L, n_mem, d) -> (B, k, n_mem, d).
    """
    return torch.einsum("bkl,blmd->bkmd", weights, candidate_memory.to(weights.dtype))


def retrieval_scores(query_memory: torch.Tensor, candidate_memory: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of flattened memory vectors.

    query_memory: (B, n_mem, d); candidate_memory: (B, L, n_mem, d) -> (B, L).
    """
    query = torch.nn.functional.normalize(query_memory.flatten(1), dim=-1)  # (B, n_mem*d)
    candidates = torch.nn.functional.normalize(
        candidate_memory.flatten(2).to(query.dtype), dim=-1
    )  # (B, L, n_mem*d)
    return torch.einsum("bd,bld->bl", query, candidates)
