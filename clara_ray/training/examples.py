"""What a training example is, and the order the stages draw examples in.

Plain Python and numpy: Ray Train's controller and the Ray Data tasks that lay out a
stage's draw plan (``data.py``) unpickle what refers to this module, and they
never need torch, transformers or the model code (~10 s of imports per process on
2 cores, paid again for every stage).

Both stages draw micro-batches with `epoch_slices`: one seeded shuffle per epoch
shared by every rank, rank r taking every world-th batch, so the union of the
ranks' batches in a step is the same whatever the number of workers. `draws` is the
same order position by position, the draw plan's rows.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Stage1Example:
    """A reconstruction (question None) or a QA example about document `document`.
    Documents are positions in the corpus's document table (``tables.DocumentTable``
    or a list of texts in the same order): examples stay small, texts are read
    where the step needs them."""

    document: int
    question: str | None = None
    answer: str | None = None
    neighbours: tuple[int, ...] = ()  # lexically similar non-gold documents (QA only)
    rivals: tuple[int, ...] = ()  # documents answering the same ask about other subjects (QA only)
    rival_answers: tuple[str, ...] = ()  # what those documents answer: values of the asked kind (QA only)


@dataclass(frozen=True)
class QuestionBatch:
    """Stage-3 examples. Gold ids, when known, are only measured against, never trained on."""

    question_ids: list[str]
    questions: list[str]
    answers: list[str]
    gold_doc_ids: list[tuple[str, ...]] | None = None

    @classmethod
    def from_qa(cls, qa_examples) -> QuestionBatch:
        """QAExample-like objects (the first answer is the target)."""
        gold = [tuple(qa.gold_doc_ids) for qa in qa_examples]
        return cls([qa.id for qa in qa_examples], [qa.question for qa in qa_examples],
                   [qa.answers[0] for qa in qa_examples], gold if any(gold) else None)

    def __len__(self) -> int:
        return len(self.questions)

    def take(self, rows: list[int]) -> QuestionBatch:
        return QuestionBatch(
            [self.question_ids[i] for i in rows], [self.questions[i] for i in rows], [self.answers[i] for i in rows],
            None if self.gold_doc_ids is None else [self.gold_doc_ids[i] for i in rows],
        )



def epoch_slices(num_items: int, batch_size: int, rank: int, world: int, seed: int, start: int = 0) -> Iterator[list[int]]:
    """Endless micro-batches of item indices from this rank's `start`-th on (0-based):
    each epoch is one seeded shuffle shared by all ranks, rank r taking every
    world-th full batch."""
    usable = (num_items // (batch_size * world)) * batch_size * world
    if usable == 0:
        raise ValueError(f"{num_items} training examples cannot fill one micro-batch of {batch_size} on {world} workers")
    per_epoch = usable // (batch_size * world)
    epoch, skip = divmod(start, per_epoch)
    while True:
        order = list(range(num_items))
        random.Random(seed + epoch).shuffle(order)
        for start_row in range((skip * world + rank) * batch_size, usable, batch_size * world):
            yield order[start_row : start_row + batch_size]
        epoch, skip = epoch + 1, 0


@functools.lru_cache(maxsize=4)
def _epoch_order(num_items: int, seed: int, epoch: int) -> np.ndarray:
    order = list(range(num_items))
    random.Random(seed + epoch).shuffle(order)
    return np.asarray(order, dtype=np.int64)


def draws(positions: np.ndarray, num_items: int, batch_size: int, world: int, seed: int) -> dict[str, np.ndarray]:
    """The draw plan behind `epoch_slices`, position by position: the run's draws laid
    out step by step, rank by rank, `batch_size` each (position p is draw p % batch_size
    of rank (p // batch_size) % world in step p // (batch_size * world) + 1). Returns
    step (1-based), rank and item (the drawn index) for each position; rank r's
    items, step by step, are exactly what `epoch_slices(..., rank=r)` yields."""
    per_step = batch_size * world
    per_epoch = (num_items // per_step)
    if per_epoch == 0:
        raise ValueError(f"{num_items} training examples cannot fill one micro-batch of {batch_size} on {world} workers")
    positions = np.asarray(positions, dtype=np.int64)
    step_index, rank = positions // per_step, (positions // batch_size) % world
    epoch, within = np.divmod(step_index, per_epoch)
    row = (within * world + rank) * batch_size + positions % batch_size
    items = np.empty_like(positions)
    for e in np.unique(epoch):
        chosen = epoch == e
        items[chosen] = _epoch_order(num_items, seed, int(e))[row[chosen]]
    return {"step": step_index + 1, "rank": rank, "item": items}
