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

Both stages draw micro-batches in the order of ``examples.epoch_slices``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Iterator, Sequence

import torch

from clara_ray.config import ReconstructionOrder, ReconstructionWeighting, UnanswerableFrom
from clara_ray.data.formats import Document
from clara_ray.eval.baselines import bm25_rankings
from clara_ray.modeling.text import UNANSWERABLE, Prompts, tokenize_targets, tokenize_texts
from clara_ray.training.examples import QuestionBatch, Stage1Example, epoch_slices
from clara_ray.training.settings import Lengths, Stage1Settings, Stage2Settings


_WORD = re.compile(r"\w+")


def word_weights(documents: Sequence[str], max_documents: int = 100_000) -> dict[str, float]:
    """Each word's inverse document frequency, log(n / df), over the documents (an even
    sample of `max_documents` of them): what a salient reconstruction weighs a word by.
    A template's words and a boilerplate sentence's are in many documents and weigh
    little; a name or a value is in a few and weighs much."""
    stride = max(1, math.ceil(len(documents) / max_documents))
    sample = range(0, len(documents), stride)
    frequency: dict[str, int] = {}
    for i in sample:
        for word in {w.lower() for w in _WORD.findall(documents[i])}:
            frequency[word] = frequency.get(word, 0) + 1
    return {w: math.log(len(sample) / n) for w, n in frequency.items()}


def reconstruction_weights(tokenizer, targets: list[str], weights: dict[str, float], max_length: int) -> torch.Tensor:
    """(B, max_length) per-token weights of reconstruction targets as ``tokenize_targets``
    lays them out: a token weighs what the word it starts in does (a word no document
    holds weighs the most any does; punctuation and EOS the mean of the target's words),
    normalised to a mean of 1 over each target's tokens, so a target's share of the loss
    stays its token count and only moves towards its rare words."""
    unseen = max(weights.values(), default=1.0)
    encoded = tokenizer(list(targets), add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    out = torch.zeros(len(targets), max_length)
    for row, (text, offsets) in enumerate(zip(targets, encoded)):
        spans = [(m.start(), m.end(), weights.get(m.group(0).lower(), unseen)) for m in _WORD.finditer(text)]
        mean = sum(w for _, _, w in spans) / len(spans) if spans else 1.0
        token_weights = []
        for start, end in offsets[: max_length - 1]:
            token_weights.append(next((w for a, b, w in spans if a < end and start < b), mean))
        token_weights.append(mean)  # EOS
        row_weights = torch.tensor(token_weights)
        out[row, : len(token_weights)] = row_weights / row_weights.mean().clamp(min=1e-6)
    return out


def reconstruction_target(document: str, order: ReconstructionOrder) -> str:
    words = document.split()
    return " " + " ".join(reversed(words) if order == ReconstructionOrder.REVERSED else words)


def _as_word(text: str) -> re.Pattern:
    """`text` where it stands as whole words: "harp", not the "harp" in "sharp"."""
    return re.compile(rf"(?<!\w){re.escape(text)}(?!\w)")


def states(document: str, answer: str) -> bool:
    return _as_word(answer).search(document) is not None


def swap_answer(document: str, answer: str, replacement: str) -> str:
    """`document` with each whole-word `answer` replaced by `replacement`."""
    return _as_word(answer).sub(lambda _: replacement, document)


def counterfactual(document: str, answer: str, answer_pool: list[str], rng: random.Random) -> tuple[str, str]:
    """Swap `answer` in `document` for another answer of the pool (unchanged if absent)."""
    if not states(document, answer):
        return document, answer
    replacement = rng.choice(answer_pool)
    if replacement == answer or states(document, replacement):
        return document, answer
    return swap_answer(document, answer, replacement), replacement


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
    rivals: per pair, ids of its rival documents (`clara_ray.training.rivals`); what
    they answer (for the pairs they are gold of) becomes the example's `rival_answers`.
    Documents become their positions in `documents`' order.
    """
    position = {doc_id: i for i, doc_id in enumerate(documents)}
    answer_of = {}  # a gold document -> the first answer of the first pair it answers
    for qa in qa_pairs:
        for doc_id in qa.gold_doc_ids:
            answer_of.setdefault(doc_id, qa.answers[0])
    examples = [Stage1Example(i) for i in range(len(documents))]
    for j, qa in enumerate(qa_pairs):
        gold = [position[i] for i in qa.gold_doc_ids if i in position]
        if gold:
            near = () if neighbours is None else tuple(
                position[i] for i in neighbours[j] if i in position and i not in qa.gold_doc_ids
            )
            chosen = [] if rivals is None else [i for i in rivals[j] if i in position and i not in qa.gold_doc_ids]
            stated = (answer_of.get(i) for i in chosen)
            rival_answers = tuple(dict.fromkeys(a for a in stated if a is not None and a not in qa.answers))
            examples.append(Stage1Example(gold[0], qa.question, qa.answers[0], near,
                                          tuple(position[i] for i in chosen), rival_answers))
    return examples


def prepare_stage1_examples(
    documents: dict[str, str], train_qa, hard_distractor_fraction: float, hard_distractor_pool: int,
    rival_pool: int, seed: int,
) -> list[Stage1Example]:
    """`stage1_examples` with each question's BM25 neighbours (when hard distractors
    are used) and rivals (when `rival_pool` > 0)."""
    neighbours = None
    if hard_distractor_fraction > 0 and len(documents) > 1:
        corpus = [Document(doc_id, text) for doc_id, text in documents.items()]
        depth = min(len(corpus), hard_distractor_pool + 1)  # +1: the gold one drops out
        neighbours = bm25_rankings(corpus, [qa.question for qa in train_qa], depth)
    rivals = None
    if rival_pool > 0:
        from clara_ray.training.rivals import rival_documents

        rivals = rival_documents(documents, train_qa, rival_pool, seed)
    return stage1_examples(documents, train_qa, neighbours, rivals)


def prepare_stage2_examples(documents: dict[str, str], train_qa, num_documents: int) -> list[Stage1Example]:
    """QA examples only, each with its question's BM25 neighbours: the `num_documents`
    - 1 other documents stage 2 reads beside the gold one."""
    examples = prepare_stage1_examples(documents, train_qa, 1.0, max(1, num_documents - 1), 0, 0)
    return [e for e in examples if e.question is not None]


def answer_pool(examples) -> list[str]:
    """The counterfactual answers: every QA example's answer, sorted."""
    return sorted({e.answer for e in examples if e.answer is not None})


def memory_qa_batch(
    examples: list[Stage1Example], documents: Sequence[str], settings: Stage1Settings | Stage2Settings, step: int,
    lengths: Lengths, tokenizer, num_memory_tokens: int, rng: random.Random, answers: list[str],
    reconstruction_word_weights: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs of step `step` (stage 1, or stage 2 whose settings read the same
    way) from this rank's examples of that step: QA examples read their gold document
    alone up to `settings.single_document_steps`, then rivals join the distractors for
    `settings.rival_steps`; `answers` is `answer_pool` of every example."""
    single = step <= settings.single_document_steps
    return stage1_batch(
        examples, documents, 1 if single else settings.max_context_docs, num_memory_tokens, tokenizer, lengths, rng,
        settings.reconstruction_order, settings.counterfactual_rate, answers, settings.hard_distractor_fraction,
        1 if single else settings.min_context_docs, settings.question_memory_rate, settings.unanswerable_rate,
        settings.unanswerable_from,
        rivals_as_distractors=not single and step <= settings.single_document_steps + settings.rival_steps,
        reconstruction_word_weights=reconstruction_word_weights,
        reconstruction_word_dropout=getattr(settings, "reconstruction_word_dropout", 0.0),
        counterfactual_of_kind=getattr(settings, "counterfactual_of_kind", 0.0),
    )


def _draw(probability: float, rng: random.Random) -> bool:
    """True with `probability`; at 0 or 1 without drawing, so a setting at either end
    leaves the rest of the batch's draws as they were without it."""
    return probability >= 1 or (probability > 0 and rng.random() < probability)


def stage1_batches(
    examples: list[Stage1Example], documents: Sequence[str], settings: Stage1Settings | Stage2Settings,
    lengths: Lengths, tokenizer, num_memory_tokens: int, seed: int, rng: random.Random, rank: int = 0,
    world: int = 1, start_step: int = 1,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(step, model inputs) for steps start_step..settings.steps of this rank, drawn
    in one process (the Ray Train loops draw the same examples through Ray Data,
    ``training.data``). `rng` draws the examples' random choices (a resumed run
    passes it in the state it was saved in)."""
    answers, weights = answer_pool(examples), salient_word_weights(settings, documents)
    slices = epoch_slices(len(examples), settings.micro_batch_size, rank, world, seed, start_step - 1)
    for step in range(start_step, settings.steps + 1):
        chosen = [examples[i] for i in next(slices)]
        yield step, memory_qa_batch(chosen, documents, settings, step, lengths, tokenizer, num_memory_tokens, rng,
                                    answers, weights)


def salient_word_weights(settings: Stage1Settings | Stage2Settings, documents: Sequence[str]) -> dict | None:
    """``word_weights`` of the corpus when the settings weigh reconstructions by rarity, else None."""
    weighting = getattr(settings, "reconstruction_weighting", ReconstructionWeighting.UNIFORM)
    return word_weights(documents) if weighting == ReconstructionWeighting.IDF else None


def stage3_batches(
    questions: QuestionBatch, micro_batch_size: int, steps: int, seed: int, rank: int = 0, world: int = 1,
    start_step: int = 1,
) -> Iterator[tuple[int, QuestionBatch]]:
    """(step, this rank's questions) for steps start_step..steps."""
    slices = epoch_slices(len(questions), micro_batch_size, rank, world, seed, start_step - 1)
    for step in range(start_step, steps + 1):
        yield step, questions.take(next(slices))


def stage1_batch(
    examples: list[Stage1Example],
    documents: Sequence[str],
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
    question_memory_rate: float = 0.0,
    unanswerable_rate: float = 0.0,
    unanswerable_from: UnanswerableFrom = UnanswerableFrom.RIVALS,
    rivals_as_distractors: bool = True,
    reconstruction_word_weights: dict[str, float] | None = None,
    reconstruction_word_dropout: float = 0.0,
    counterfactual_of_kind: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Model inputs for `ClaraModel(Objective.COMPRESSOR_PRETRAINING, ...)`.

    A counterfactual answer (`counterfactual_rate`) comes from `answer_pool`, or with
    probability `counterfactual_of_kind` from the example's `rival_answers` where it
    has any.

    With probability `question_memory_rate` a QA example's question is compressed
    too, read as its last memory, and the prompt only says to answer it. With
    probability `unanswerable_rate` a QA example reads, in place of its gold
    document, one of its rivals or of its neighbours that does not contain its
    answer (`unanswerable_from`; the document's stated answer swapped like a
    counterfactual one), and the target is UNANSWERABLE; an example with no such
    document stays answerable. Rivals join the distractors while
    `rivals_as_distractors`.

    A QA example reads between `min_context_docs` (default: all) and
    `num_context_docs` documents, the count drawn uniformly per example.

    With `reconstruction_word_weights` (``word_weights``) the batch carries
    "target_weight": a reconstruction's tokens weighted by their words' rarity
    (``reconstruction_weights``), a QA example's all 1. With
    `reconstruction_word_dropout` it carries "target_input_ids": the targets with
    that share of each reconstruction's tokens blanked (``word_dropout``).
    """
    min_context_docs = num_context_docs if min_context_docs is None else min_context_docs
    if not 1 <= min_context_docs <= num_context_docs:
        raise ValueError(f"min_context_docs must be in [1, {num_context_docs}], got {min_context_docs}")
    doc_texts, doc_slots, prompts, targets = [], [], [], []
    formats = Prompts(tokenizer)
    for example in examples:
        if example.question is None:
            context = [documents[example.document]]
            prompts.append(formats.reconstruction())
            targets.append(reconstruction_target(context[0], reconstruction_order))
        else:
            document, answer = documents[example.document], example.answer
            if answer_pool and rng.random() < counterfactual_rate:
                of_kind = example.rival_answers and _draw(counterfactual_of_kind, rng)
                pool = list(example.rival_answers) if of_kind else answer_pool
                document, answer = counterfactual(document, answer, pool, rng)
            drawing = example if rivals_as_distractors else dataclasses.replace(example, rivals=())
            stand_ins = _stand_ins(example, documents, unanswerable_from) if unanswerable_rate else ()
            if stand_ins and rng.random() < unanswerable_rate:
                stand_in = rng.choice(stand_ins)
                document = _stated_counterfactual(documents[stand_in], answer_pool, counterfactual_rate, rng)
                answer = UNANSWERABLE
                drawing = dataclasses.replace(
                    drawing,
                    rivals=tuple(r for r in drawing.rivals if r != stand_in),
                    neighbours=tuple(n for n in drawing.neighbours if n != stand_in),
                )
            size = rng.randint(min_context_docs, num_context_docs)
            context = [documents[i] for i in _distractors(drawing, len(documents), size - 1, hard_fraction, rng)]
            context.insert(rng.randrange(size), document)
            if question_memory_rate and rng.random() < question_memory_rate:
                context.append(example.question)
                prompts.append(formats.question_in_memory())
            else:
                prompts.append(formats.question(example.question))
            targets.append(formats.answer(answer))
        doc_slots.append(len(context))
        doc_texts.extend(context)

    docs = tokenize_texts(tokenizer, doc_texts, lengths.doc)
    prompt = tokenize_texts(tokenizer, prompts, lengths.question)
    target_length = max(lengths.answer, lengths.reconstruction)
    target = tokenize_targets(tokenizer, targets, target_length)
    optional = {}  # target_weight, target_input_ids
    if reconstruction_word_weights is not None:
        weight = torch.ones(target.ids.shape)
        rebuilt = [i for i, e in enumerate(examples) if e.question is None]
        if rebuilt:
            weight[rebuilt] = reconstruction_weights(tokenizer, [targets[i] for i in rebuilt],
                                                     reconstruction_word_weights, target.ids.shape[1])
        optional["target_weight"] = weight * target.mask
    if reconstruction_word_dropout:
        rebuilt = torch.tensor([e.question is None for e in examples])
        optional["target_input_ids"] = word_dropout(target.ids, target.mask * rebuilt[:, None],
                                                    reconstruction_word_dropout, tokenizer.pad_token_id, rng)
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
        "is_qa": torch.tensor([e.question is not None for e in examples]),
        **optional,
    }


def word_dropout(ids: torch.Tensor, droppable: torch.Tensor, rate: float, blank_id: int,
                 rng: random.Random) -> torch.Tensor:
    """`ids` with a `rate` share of the `droppable` positions (drawn with `rng`) set to
    `blank_id`: the generator's teacher-forced input, while its labels stay whole.

    A generator that sees the reconstruction's previous words can guess the next
    template word from them and needs memory only for what no text predicts; it may
    then learn to put a typical name where the document's own belongs, and the
    compressor never has to keep the name. With words blanked it must read the
    document's memory to go on (word dropout against a decoder that ignores its code).
    """
    generator = torch.Generator().manual_seed(rng.getrandbits(63))
    drop = (torch.rand(ids.shape, generator=generator) < rate) & droppable.bool()
    return ids.masked_fill(drop, blank_id)


def _stand_ins(example: Stage1Example, documents: Sequence[str], source: UnanswerableFrom) -> tuple[int, ...]:
    """The documents an unanswerable version of `example` may read in place of its gold one."""
    rivals = example.rivals if source in (UnanswerableFrom.RIVALS, UnanswerableFrom.BOTH) else ()
    if source is UnanswerableFrom.RIVALS:
        return rivals
    answer = example.answer.lower()
    neighbours = tuple(n for n in example.neighbours if n not in rivals and answer not in documents[n].lower())
    return rivals + neighbours


def _stated_counterfactual(document: str, answer_pool: list[str], rate: float, rng: random.Random) -> str:
    """`document` with the longest pool answer it states swapped for another (with
    probability `rate`), as a gold document's is: a rival's value then gives nothing away."""
    if not answer_pool or rng.random() >= rate:
        return document
    stated = max((a for a in answer_pool if states(document, a)), key=len, default=None)
    others = [a for a in answer_pool if not states(document, a)]
    return document if stated is None or not others else swap_answer(document, stated, rng.choice(others))


def _distractors(
    example: Stage1Example, num_documents: int, count: int, hard_fraction: float, rng: random.Random
) -> list[int]:
    """`count` documents other than the example's: about `hard_fraction` of them
    drawn from its neighbours and rivals, the rest at random."""
    if num_documents <= count:
        raise ValueError(f"need more than {count} documents to draw {count} distractors, got {num_documents}")
    hard = list(example.neighbours + example.rivals)
    chosen = rng.sample(hard, min(len(hard), round(hard_fraction * count)))
    while len(chosen) < count:
        candidate = rng.choice(range(num_documents))
        if candidate != example.document and candidate not in chosen:
            chosen.append(candidate)
    return chosen


def stage3_batch(questions: list[str], answers: list[str], tokenizer, lengths: Lengths) -> dict[str, torch.Tensor]:
    """Question tokens (query reasoner input), generator prompt and answer target."""
    question = tokenize_texts(tokenizer, questions, lengths.question)
    formats = Prompts(tokenizer)
    prompt = tokenize_texts(tokenizer, [formats.question(q) for q in questions], lengths.question)
    target = tokenize_targets(tokenizer, [formats.answer(a) for a in answers], lengths.answer)
    return {
        "question_ids": question.ids,
        "question_mask": question.mask,
        "prompt_ids": prompt.ids,
        "prompt_mask": prompt.mask,
        "target_ids": target.ids,
        "target_mask": target.mask,
    }
