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
  stage 3, where it reads the top-k. With `counterfactual_rate` > 0, that share
  of QA examples whose gold document contains the answer verbatim gets another
  training answer swapped in, in document and target alike: the question alone
  no longer determines the answer, so the generator learns to read it from
  memory instead of memorising question -> answer.
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


@dataclass(frozen=True)
class Lengths:
    doc: int
    question: int
    answer: int
    reconstruction: int


def stage1_examples(documents: dict[str, str], qa_pairs) -> list[Stage1Example]:
    """Reconstruction of every document + QA of every training pair with a gold document.

    qa_pairs: QAExample-like objects; pairs without a gold document in `documents`
    are skipped (they cannot teach the compressor anything about a document).
    """
    examples = [Stage1Example(text) for text in documents.values()]
    for qa in qa_pairs:
        gold = [documents[i] for i in qa.gold_doc_ids if i in documents]
        if gold:
            examples.append(Stage1Example(gold[0], qa.question, qa.answers[0]))
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
) -> dict[str, torch.Tensor]:
    """Model inputs for `ClaraModel(Objective.COMPRESSOR_PRETRAINING, ...)`."""
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
            context = rng.sample(all_documents, num_context_docs - 1)
            context.insert(rng.randrange(num_context_docs), document)
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
