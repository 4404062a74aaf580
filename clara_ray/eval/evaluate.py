"""Evaluate retrieval (Recall@k of gold documents) and answers (EM / F1).

Every retriever — BM25, MiniLM, the query reasoner — produces a ranking over
the corpus; the generator then answers each question from the memory vectors
of that ranking's top-k documents, so answer quality is compared on equal terms.
Gold document ids are read here only, to score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from clara_ray.eval.metrics import mean_exact_match, mean_f1, recall_at_k
from clara_ray.modeling.clara import ClaraModel, Role
from clara_ray.modeling.text import Prompts, decode_answers, tokenize_texts
from clara_ray.modeling.topk import retrieval_scores
from clara_ray.progress import Progress

Search = Callable[[np.ndarray, int], "object"]  # (queries (B, key_dim), L) -> SearchResult


@dataclass(frozen=True)
class Scores:
    recall_at_1: float
    recall_at_5: float
    exact_match: float
    f1: float

    def as_dict(self) -> dict[str, float]:
        return {"recall@1": self.recall_at_1, "recall@5": self.recall_at_5, "em": self.exact_match, "f1": self.f1}


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _progress(batches, description: str | None, total: int):
    """The batches (lists of questions) as they are, counted on a progress bar named `description`."""
    if description is None:
        yield from batches
        return
    with Progress(description, total, unit="questions") as progress:
        for batch in batches:
            yield batch
            progress.update(len(batch))


@torch.inference_mode()
def query_reasoner_rankings(
    model: ClaraModel, tokenizer, questions: list[str], search: Search,
    num_candidates: int, question_max_len: int, batch_size: int, progress: str | None = None,
) -> list[list[str]]:
    """Top-L documents per question: index search, then exact re-score on memory.
    `progress`: the name of a progress bar (or of periodic lines) over the questions."""
    rankings, device = [], next(model.parameters()).device
    for chunk in _progress(_batches(questions, batch_size), progress, len(questions)):
        tokens = tokenize_texts(tokenizer, chunk, question_max_len)
        query_memory, _ = model.encode(Role.QUERY_REASONER, tokens.ids.to(device), tokens.mask.to(device))  # (B, n, d)
        query_memory = query_memory.float().cpu()
        found = search(query_memory.flatten(1).numpy(), num_candidates)
        scores = retrieval_scores(query_memory, torch.from_numpy(found.memory.astype(np.float32)))
        order = scores.argsort(dim=-1, descending=True).numpy()  # (B, L)
        rankings.extend([list(found.doc_ids[row, order[row]]) for row in range(len(chunk))])
    return rankings


@torch.inference_mode()
def generate_answers(
    model: ClaraModel, tokenizer, questions: list[str], rankings: list[list[str]],
    memory_of: dict[str, np.ndarray], top_k: int, question_max_len: int, answer_max_len: int, batch_size: int,
    progress: str | None = None,
) -> list[str]:
    """Answers from the memory of each question's top-k ranked documents (`progress`:
    as in ``query_reasoner_rankings``)."""
    answers, device, prompts = [], next(model.parameters()).device, Prompts(tokenizer)
    for rows in _progress(_batches(range(len(questions)), batch_size), progress, len(questions)):
        chunk = questions[rows.start : rows.stop]  # rows: a range of question rows
        memory = np.stack(
            [np.stack([memory_of[d] for d in ranking[:top_k]]) for ranking in rankings[rows.start : rows.stop]]
        )  # (B, k, n, d)
        prompt = tokenize_texts(tokenizer, [prompts.question(q) for q in chunk], question_max_len)
        generated = model.generate(
            torch.from_numpy(memory.astype(np.float32)).flatten(1, 2).to(device), prompt.ids.to(device),
            prompt.mask.to(device), max_new_tokens=answer_max_len, eos_token_id=tokenizer.eos_token_id,
        )
        answers.extend(decode_answers(tokenizer, generated.cpu()))
    return answers


def score(rankings: list[list[str]], predictions: list[str], qa) -> Scores:
    gold = [list(q.gold_doc_ids) for q in qa]
    references = [list(q.answers) for q in qa]
    return Scores(
        recall_at_k(rankings, gold, 1),
        recall_at_k(rankings, gold, 5),
        mean_exact_match(predictions, references),
        mean_f1(predictions, references),
    )
