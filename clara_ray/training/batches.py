"""Turn training examples into model inputs. Pure Python + torch, no Ray.

Stage 1 (compressor pretraining) mixes two kinds of example:
- reconstruction: one document's memory -> the document text, in reading
  order or word-reversed. Reversed, the generator cannot learn "subject ->
  fact" from the text itself (it only ever sees the fact before the subject),
  so a small model does not memorise the corpus into its weights: answers must
  then come from memory vectors, i.e. from retrieval.
- QA: memory of the gold document placed at a random slot among
  `num_context_docs - 1` random other documents -> the answer. Training the
  generator to find the answer among several memories is what it must do in
  stage 3, where it reads the top-k. A `hard_fraction` share of the other
  documents are the question's lexical neighbours (BM25, computed by the
  driver): the documents a retriever will put beside the gold one — the same
  entity's other facts, texts that echo the question — so the generator learns
  to pick the document that answers, not the one that looks like the question.
  With `counterfactual_rate` > 0, that share
  of QA examples whose gold document contains the answer verbatim gets another
  training answer swapped in, in document and target alike: the question alone
  no longer determines the answer, so the generator learns to read it from
  memory instead of memorising question -> answer.
  Rivals (see `clara_ray.training.rivals`: documents stating the asked kind of
  fact about another subject) can join the hard distractors, so that the
  generator must tell the subjects apart to find the answering memory.
Stage 3 batches carry only questions and answers; candidates come from the index.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from clara_ray.config import ReconstructionOrder
from clara_ray.modeling.text import (
    RECONSTRUCTION_PROMPT,
    answer_target,
    question_prompt,
    tokenize_targets,
    tokenize_texts,
)


def reconstruction_target(document: str, order: ReconstructionOrder) -> str:
    words = document.split()
    return " " + " ".join(reversed(words) if order == ReconstructionOrder.REVERSED else words)


def counterfactual(document: str, answer: str, answer_pool: list[str], rng: random.Random) -> tuple[str, str]:
    """Swap `answer` in `document` for another answer of the pool (unchanged if absent)."""
    if answer not in document:
        return document, answer
    replacement = rng.choice(answer_pool)
    if replacement == answer or replacement in document:
        return document, answer
    return document.replace(answer, replacement), replacement


@dataclass(frozen=True)
class Stage1Example:
    """A reconstruction (question None) or a QA example about `document`."""

    document: str
    question: str | None = None
    answer: str | None = None
    neighbours: tuple[str, ...] = ()  # texts of lexically similar non-gold documents (QA only)
    rivals: tuple[str, ...] = ()  # texts of documents answering the same ask about other subjects (QA only)


@dataclass(frozen=True)
class Lengths:
    doc: int
    question: int
    answer: int
    reconstruction: int


def stage1_examples(
    documents: dict[str, str],
    qa_pairs,
    neighbours: list[list[str]] | None = None,
    rivals: list[list[str]] | None = None,
) -> list[Stage1Example]:
    """Reconstruction of every document + QA of every training pair with a gold document.

    qa_pairs: QAExample-like objects; pairs without a gold document in `documents`
    are skipped (they cannot teach the compressor anything about a document).
    neighbours: per pair, ids of its lexically nearest documents, best first;
    its gold documents are dropped from them.
    rivals: per pair, ids of its rival documents (`clara_ray.training.rivals`).
    """
    examples = [Stage1Example(text) for text in documents.values()]
    for j, qa in enumerate(qa_pairs):
        gold = [documents[i] for i in qa.gold_doc_ids if i in documents]
        if gold:
            near = () if neighbours is None else tuple(
                documents[i] for i in neighbours[j] if i in documents and i not in qa.gold_doc_ids
            )
            rival = () if rivals is None else tuple(
                documents[i] for i in rivals[j] if i in documents and i not in qa.gold_doc_ids
            )
            examples.append(Stage1Example(gold[0], qa.question, qa.answers[0], near, rival))
    return examples


def stage1_batch(
    examples: list[Stage1Example],
    all_documents: list[str],
    num_context_docs: int,
    num_memory_tokens: int,
    tokenizer,
    lengths: Lengths,
    rng: random.Random,
    reconstruction_order: ReconstructionOrder = ReconstructionOrder.FORWARD,
    counterfactual_rate: float = 0.0,
    answer_pool: list[str] = (),
    hard_fraction: float = 0.0,
    min_context_docs: int | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs for `ClaraModel(Objective.COMPRESSOR_PRETRAINING, ...)`.

    A QA example reads between `min_context_docs` (default: all) and
    `num_context_docs` documents, the count drawn uniformly per example.
    """
    min_context_docs = num_context_docs if min_context_docs is None else min_context_docs
    if not 1 <= min_context_docs <= num_context_docs:
        raise ValueError(f"min_context_docs must be in [1, {num_context_docs}], got {min_context_docs}")
    doc_texts, doc_slots, prompts, targets = [], [], [], []
    for example in examples:
        if example.question is None:
            context = [example.document]
            prompts.append(RECONSTRUCTION_PROMPT)
            targets.append(reconstruction_target(example.document, reconstruction_order))
        else:
            document, answer = example.document, example.answer
            if answer_pool and rng.random() < counterfactual_rate:
                document, answer = counterfactual(document, answer, answer_pool, rng)
            size = rng.randint(min_context_docs, num_context_docs)
            context = _distractors(example, all_documents, size - 1, hard_fraction, rng)
            context.insert(rng.randrange(size), document)
            prompts.append(question_prompt(example.question))
            targets.append(answer_target(answer))
        doc_slots.append(len(context))
        doc_texts.extend(context)

    docs = tokenize_texts(tokenizer, doc_texts, lengths.doc)
    prompt = tokenize_texts(tokenizer, prompts, lengths.question)
    target_length = max(lengths.answer, lengths.reconstruction)
    target = tokenize_targets(tokenizer, targets, target_length)
    # Document i of example j goes to memory group j; groups are padded to the widest.
    group = torch.repeat_interleave(torch.arange(len(examples)), torch.tensor(doc_slots))
    slot = torch.cat([torch.arange(n) for n in doc_slots])
    memory_slots = torch.tensor(doc_slots) * num_memory_tokens
    width = int(memory_slots.max())
    memory_mask = (torch.arange(width)[None, :] < memory_slots[:, None]).long()  # (B, M)
    return {
        "doc_ids": docs.ids,
        "doc_mask": docs.mask,
        "doc_group": group,
        "doc_slot": slot,
        "memory_mask": memory_mask,
        "prompt_ids": prompt.ids,
        "prompt_mask": prompt.mask,
        "target_ids": target.ids,
        "target_mask": target.mask,
    }


def _distractors(
    example: Stage1Example, all_documents: list[str], count: int, hard_fraction: float, rng: random.Random
) -> list[str]:
    """`count` documents other than the example's: about `hard_fraction` of them
    drawn from its neighbours and rivals, the rest at random."""
    if len(all_documents) <= count:
        raise ValueError(f"need more than {count} documents to draw {count} distractors, got {len(all_documents)}")
    hard = list(example.neighbours + example.rivals)
    chosen = rng.sample(hard, min(len(hard), round(hard_fraction * count)))
    while len(chosen) < count:
        candidate = rng.choice(all_documents)
        if candidate != example.document and candidate not in chosen:
            chosen.append(candidate)
    return chosen


def stage3_batch(questions: list[str], answers: list[str], tokenizer, lengths: Lengths) -> dict[str, torch.Tensor]:
    """Question tokens (query reasoner input), generator prompt and answer target."""
    question = tokenize_texts(tokenizer, questions, lengths.question)
    prompt = tokenize_texts(tokenizer, [question_prompt(q) for q in questions], lengths.question)
    target = tokenize_targets(tokenizer, [answer_target(a) for a in answers], lengths.answer)
    return {
        "question_ids": question.ids,
        "question_mask": question.mask,
        "prompt_ids": prompt.ids,
        "prompt_mask": prompt.mask,
        "target_ids": target.ids,
        "target_mask": target.mask,
    }
