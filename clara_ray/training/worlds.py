"""Counterfactual worlds for stage 3: the training answers' values permuted across
the corpus, so that a question's answer can only be read, never remembered.

Stage 3 trains the query reasoner by the generator's loss on the answer. On its
training questions the reasoner can lower that loss without knowing whose
document it retrieves: it can learn the answer value itself ("X -> Paris") and
look for any document stating that value, another person's as well as X's. That
fits the training questions and carries nothing to a question about someone it
never saw. In a world drawn here every value in the answer pool is replaced by
another, the same way everywhere in one micro-batch (question, candidate
documents and target), so a remembered value points at the wrong documents and
only matching the question's subject to the document's finds the one that
answers. Gold labels are not used: the permutation is the same for every
document.

    worlds = CounterfactualWorlds(answer_pool, rate=0.5, seed=0, rank=0)
    world = worlds.draw(step)          # None for the steps trained in the real world
    world.text("Ann was born in Oslo.")  # -> "Ann was born in Lima."
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence


class World:
    """One permutation of the answer pool's values, applied to whole words."""

    def __init__(self, mapping: dict[str, str]):
        self.mapping = mapping
        # Longest first, so a value inside a longer one ("York", "New York") never wins.
        values = sorted(mapping, key=len, reverse=True)
        self._pattern = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(v) for v in values) + r")(?!\w)")

    def text(self, text: str) -> str:
        return self._pattern.sub(lambda match: self.mapping[match.group(0)], text)

    def texts(self, texts: Sequence[str]) -> list[str]:
        return [self.text(t) for t in texts]


class CounterfactualWorlds:
    """For each step after `start_step`, with probability `rate`, a fresh permutation
    of `answer_pool` (distinct non-empty answers); drawn from (seed, step, rank), so a
    resumed run draws the same worlds."""

    def __init__(self, answer_pool: Sequence[str], rate: float, seed: int, rank: int = 0, start_step: int = 0):
        self.pool = sorted({a.strip() for a in answer_pool if a and a.strip()})
        self.rate, self.seed, self.rank, self.start_step = rate, seed, rank, start_step

    def draw(self, step: int) -> World | None:
        rng = random.Random(f"counterfactual-world:{self.seed}:{step}:{self.rank}")
        if step <= self.start_step or len(self.pool) < 2 or rng.random() >= self.rate:
            return None
        shuffled = list(self.pool)
        rng.shuffle(shuffled)
        return World(dict(zip(self.pool, shuffled)))
