"""Rival documents for stage 1: documents that answer the same kind of question
about a different subject.

A question's *ask* is the part of it that its gold document does not contain:
"Which city was Zorvan Kellit born in?" against "Zorvan Kellit grew up near
Marlow ..." asks "which city was born in"; the words both share name the subject.
The rivals of a training question are the gold documents of the other training
questions whose asks are most alike (BM25 over the asks): each states a fact of
the asked kind, about someone or something else.

Early in stage 1 rivals join a QA example's hard distractors. To find the
answering memory among them the generator must compare the question's subject
with each memory's, so the compressor has to make one memory vector a key for
the document's subject. That key is what lets the query reasoner, which starts
as the compressor, match a question to the right subject's documents by cosine
before stage 3 has taught it anything (the BM25 neighbours alone are mostly the
same subject's other documents and rarely require it). Rivals are dropped for
the rest of stage 1: with them to the end, the generator read the answer from a
gold memory less reliably (BENCHMARKS.md, recipe sweep).

Rivals come from training questions and their gold documents only: the
compressor and generator learn from them in stage 1; the retriever never does.
"""

from __future__ import annotations

import random
import re

from clara_ray.eval.baselines import bm25_search

_WORD = re.compile(r"\w+")
# Candidates looked at per question, as a multiple of the pool size: many
# questions can tie on their ask (one wording, many subjects), and ties are
# broken at random so that not every question gets the same rivals.
_DEPTH_FACTOR = 50


def ask_text(question: str, gold_document: str) -> str:
    """The words of `question` that `gold_document` does not contain, in order."""
    in_document = {w.lower() for w in _WORD.findall(gold_document)}
    return " ".join(w for w in _WORD.findall(question) if w.lower() not in in_document)


def _mentions(document: str, answers) -> bool:
    text = document.lower()
    return any(a.strip() and a.strip().lower() in text for a in answers)


def rival_documents(documents: dict[str, str], qa_pairs, pool: int, seed: int) -> list[list[str]]:
    """Per QA pair, up to `pool` rival document ids, most similar ask first.

    A rival is never one of the pair's own gold documents and never mentions one
    of its answers. Pairs without a gold document in `documents` get none.
    """
    if pool < 1:
        raise ValueError(f"pool must be at least 1, got {pool}")
    rivals: list[list[str]] = [[] for _ in qa_pairs]
    with_gold = [
        (j, next(i for i in qa.gold_doc_ids if i in documents))
        for j, qa in enumerate(qa_pairs)
        if any(i in documents for i in qa.gold_doc_ids)
    ]
    if len(with_gold) < 2:
        return rivals
    asks = [ask_text(qa_pairs[j].question, documents[gold]) for j, gold in with_gold]
    positions, scores = bm25_search(asks, asks, min(len(asks), _DEPTH_FACTOR * pool))
    rng = random.Random(seed)
    for row, (j, _) in enumerate(with_gold):
        qa = qa_pairs[j]
        order = list(range(positions.shape[1]))
        rng.shuffle(order)
        order.sort(key=lambda c: -scores[row, c])  # stable: equal scores stay shuffled
        chosen: list[str] = []
        for c in order:
            if scores[row, c] <= 0 or len(chosen) == pool:
                break
            candidate = with_gold[positions[row, c]][1]
            if candidate in qa.gold_doc_ids or candidate in chosen or _mentions(documents[candidate], qa.answers):
                continue
            chosen.append(candidate)
        rivals[j] = chosen
    return rivals
