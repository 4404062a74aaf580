"""Where stage 3 draws its L candidates from: a small protocol and its Ray-free sources.

    source.candidates(query_keys, num_candidates, question_ids) -> SearchResult

`query_keys` are the query reasoner's flattened memories (B, n_mem * d) float32;
the result holds, per question, L document ids, their scores (descending) and
their stored memory vectors (B, L, n_mem, d) float16, which the step re-scores
exactly with the current query reasoner.

- `ExactSearch`: every document's memory in RAM, exact cosine (tests, small runs,
  the one-process recipe runs).
- `FixedCandidates`: CLaRa's mode, a fixed list of candidate ids shipped with each
  question (kept to compare with CLaRa); the order within a list is by score.
- `clara_ray.index.actor.IndexActorCandidates`: the sharded FAISS index served by
  Ray actors (the pipeline's source).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SearchResult:
    """L candidates per question (here, not with FAISS, so the Ray-free training path needs no faiss)."""

    doc_ids: np.ndarray  # (B, L) object array of str
    scores: np.ndarray  # (B, L) float32, descending
    memory: np.ndarray  # (B, L, n_mem, d) float16


class CandidateSource(Protocol):
    def candidates(self, query_keys: np.ndarray, num_candidates: int, question_ids: Sequence[str]) -> SearchResult: ...


def _normalised(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


class ExactSearch:
    """Exact cosine search over memories held in RAM: (N, n_mem, d)."""

    def __init__(self, doc_ids: Sequence[str], memory: np.ndarray):
        self.doc_ids = np.asarray(doc_ids, dtype=object)
        self.memory = np.asarray(memory, dtype=np.float16)
        self.keys = _normalised(self.memory.reshape(len(self.doc_ids), -1))  # (N, n_mem * d)

    def candidates(self, query_keys: np.ndarray, num_candidates: int, question_ids: Sequence[str] = ()) -> SearchResult:
        if not 1 <= num_candidates <= len(self.doc_ids):
            raise ValueError(f"num_candidates must be in [1, {len(self.doc_ids)}], got {num_candidates}")
        scores = _normalised(query_keys) @ self.keys.T  # (B, N)
        top = np.argpartition(-scores, num_candidates - 1, axis=1)[:, :num_candidates]  # (B, L) unordered
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        rows = np.take_along_axis(top, order, axis=1)  # (B, L) by descending score
        return SearchResult(self.doc_ids[rows], np.take_along_axis(scores, rows, axis=1), self.memory[rows])


class FixedCandidates:
    """CLaRa's per-question candidate lists: question id -> document ids (at least L)."""

    def __init__(self, lists: Mapping[str, Sequence[str]], doc_ids: Sequence[str], memory: np.ndarray):
        self.lists = {question: list(ids) for question, ids in lists.items()}
        self.row = {doc_id: i for i, doc_id in enumerate(doc_ids)}
        self.memory = np.asarray(memory, dtype=np.float16)
        self.keys = _normalised(self.memory.reshape(len(self.row), -1))
        unknown = {d for ids in self.lists.values() for d in ids if d not in self.row}
        if unknown:
            raise ValueError(f"{len(unknown)} candidate ids are not in the corpus, e.g. {sorted(unknown)[:3]}")

    def candidates(self, query_keys: np.ndarray, num_candidates: int, question_ids: Sequence[str]) -> SearchResult:
        short = [q for q in question_ids if len(self.lists.get(q, ())) < num_candidates]
        if short:
            raise ValueError(
                f"{len(short)} questions have fewer than {num_candidates} fixed candidates, e.g. {short[:3]}"
            )
        rows = np.array([[self.row[d] for d in self.lists[q][:num_candidates]] for q in question_ids])  # (B, L)
        scores = np.einsum("bd,bld->bl", _normalised(query_keys), self.keys[rows])
        order = np.argsort(-scores, axis=1, kind="stable")
        rows = np.take_along_axis(rows, order, axis=1)
        doc_ids = np.asarray(list(self.row), dtype=object)
        return SearchResult(doc_ids[rows], np.take_along_axis(scores, order, axis=1), self.memory[rows])
