"""Counterfactual worlds for stage 3: the training answers' values, or the training
questions' subjects, permuted across the corpus, so that what a question asks can
only be read and matched, never remembered.

Stage 3 trains the query reasoner by the generator's loss on the answer. On its
training questions the reasoner can lower that loss without knowing whose
document it retrieves: it can learn the answer value itself ("X -> Paris") and
look for any document stating that value, another person's as well as X's. That
fits the training questions and carries nothing to a question about someone it
never saw. In a world drawn here every training answer's value is replaced by
another of its kind, the same way everywhere in one micro-batch (question, candidate
documents and target), so a remembered value points at the wrong documents and
only matching the question's subject to the document's finds the one that
answers. Gold labels are not used: the permutation is the same for every
document.

It can also learn each training person's documents one by one ("X's city question
-> that document") instead of a way to match a name in the question to the name in
a document. A *name* world permutes the training questions' subjects among
themselves (`question_subjects`: a question's run of rare words, "Ann Berg"), in
question and documents alike: X's question now asks about the person whose
documents carry X's name, so a remembered pairing points at the wrong person and
only the name match carries, as it must for people no training question asks about.

    worlds = CounterfactualWorlds.of_questions(questions, answers, rate=1.0, seed=0, rank=0)
    world = worlds.draw(step)            # None for the steps trained in the real world
    world.text("Ann was born in Oslo.")  # -> "Ann was born in Lima."

Values are permuted within their kind (`answer_kinds`): a city for a city, so a
document of the asked kind about another subject still reads better than an echo
of the question, the signal that first takes retrieval off.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence

from clara_ray.config import WorldSwap

_WORD = re.compile(r"\w+")


class World:
    """One permutation of the answer pool's values, applied to whole words. `memory`
    keeps the frozen compressor's memory of each document this world rewrote, by id,
    for as long as the world is drawn again (``CounterfactualWorlds.num_worlds``)."""

    def __init__(self, mapping: dict[str, str]):
        self.mapping = mapping
        self.memory: dict[str, object] = {}
        # Longest first, so a value inside a longer one ("York", "New York") never wins.
        values = sorted(mapping, key=len, reverse=True)
        self._pattern = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(v) for v in values) + r")(?!\w)")

    def text(self, text: str) -> str:
        return self._pattern.sub(lambda match: self.mapping[match.group(0)], text)

    def texts(self, texts: Sequence[str]) -> list[str]:
        return [self.text(t) for t in texts]

    def in_play(self, texts: Sequence[str]) -> frozenset[str]:
        """The words this world swaps that `texts` (a micro-batch's questions and
        answers) hold, and what they become: the only words whose rewriting a document
        must follow for those questions. A rewritten question asks about `mapping[x]`;
        after rewriting, the documents that carry that word are exactly those that
        carried `x` when every document holding `x` or `mapping[x]` is rewritten, and
        the others stand as they are (a name neither asked about nor given)."""
        found = {match for text in texts for match in self._pattern.findall(text)}
        return frozenset(found | {self.mapping[word] for word in found})

    def touches(self, text: str, words: frozenset[str]) -> bool:
        """Whether `text` holds one of `words` (from ``in_play``)."""
        return any(match in words for match in self._pattern.findall(text))


def answer_kinds(questions: Sequence[str], answers: Sequence[str], min_share: float = 0.02) -> list[list[str]]:
    """The training answers grouped by kind, from the questions alone: two answers are
    of one kind when they answer questions of one wording. A question's wording is its
    words that at least `min_share` of all questions use ("which city was born in"),
    which leaves out the subject's name when there are enough subjects (a name is in
    1 / subjects of the questions); answers to one wording are then joined across the
    wordings they share (union-find). Answers of a wording no other question uses stay
    alone, and a world leaves them as they are: with few subjects (names above
    `min_share`) every wording names its subject and no answer has a kind."""
    tokens = [_WORD.findall(q.lower()) for q in questions]
    counts = Counter(w for words in tokens for w in set(words))
    frequent = {w for w, n in counts.items() if n >= min_share * len(questions)}
    parent: dict[str, str] = {}

    def root(value: str) -> str:
        while parent.setdefault(value, value) != value:
            parent[value] = parent[parent[value]]
            value = parent[value]
        return value

    first_of_wording: dict[tuple[str, ...], str] = {}
    for words, answer in zip(tokens, answers):
        answer = answer.strip()
        if not answer:
            continue
        root(answer)
        wording = tuple(w for w in words if w in frequent)
        if wording:
            parent[root(answer)] = root(first_of_wording.setdefault(wording, answer))
    kinds: dict[str, list[str]] = {}
    for value in parent:
        kinds.setdefault(root(value), []).append(value)
    return sorted(sorted(kind) for kind in kinds.values())


def question_subjects(questions: Sequence[str], min_share: float = 0.02) -> list[str]:
    """The subjects of the questions: in each, its one run of consecutive capitalised
    words, as written ("Which city was Ann Berg born in?" -> "Ann Berg"); its first
    word counts only if it is rare (fewer than `min_share` of the questions use it, as
    in `answer_kinds`), so "Which" never does. A one-word run is no name when it is one
    letter or the questions also write it in lower case ("The", "A", "May" in real
    questions: a world would swap them in every document). A question with no such run
    or with two has no subject. Distinct subjects, sorted."""
    tokens = [list(_WORD.finditer(q)) for q in questions]
    counts = Counter(w for matches in tokens for w in {m.group(0).lower() for m in matches})
    rare = {w for w, n in counts.items() if n < min_share * len(questions)}
    lower = {m.group(0) for matches in tokens for m in matches if m.group(0).islower()}
    subjects = set()
    for question, matches in zip(questions, tokens):
        runs: list[list[re.Match]] = []
        for i, match in enumerate(matches):
            word = match.group(0)
            if not word[0].isupper() or (i == 0 and word.lower() not in rare):
                continue
            previous = matches[i - 1] if i else None
            if runs and runs[-1][-1] is previous and question[previous.end():match.start()].isspace():
                runs[-1].append(match)
            else:
                runs.append([match])
        runs = [run for run in runs if len(run) > 1 or (len(run[0].group(0)) > 1 and run[0].group(0).lower() not in lower)]
        if len(runs) == 1:
            subjects.add(question[runs[0][0].start():runs[0][-1].end()])
    return sorted(subjects)


class CounterfactualWorlds:
    """For each step after `start_step`, with probability `rate`, a permutation of
    the values within each of their kinds (``answer_kinds``: a city's answer becomes
    another city, so the documents of the asked kind still read better than echoes of
    the question; or one kind, the questions' subjects): one of `num_worlds` fixed ones, the same on every rank, whose
    rewritten documents are compressed once each (``World.memory``); or, with
    `num_worlds` 0, a fresh one every step. Drawn from (seed, step, rank), so a resumed
    run draws the same worlds."""

    def __init__(self, kinds: Sequence[Sequence[str]], rate: float, seed: int, rank: int = 0, start_step: int = 0,
                 num_worlds: int = 0):
        self.kinds = [sorted(set(kind)) for kind in kinds if len(set(kind)) > 1]
        self.rate, self.seed, self.rank, self.start_step = rate, seed, rank, start_step
        self.fixed = [self._permuted(random.Random(f"counterfactual-worlds:{seed}:{i}")) for i in range(num_worlds)]

    @classmethod
    def of_questions(cls, questions: Sequence[str], answers: Sequence[str], rate: float, seed: int, rank: int = 0,
                     start_step: int = 0, num_worlds: int = 0,
                     swap: WorldSwap = WorldSwap.VALUES) -> CounterfactualWorlds:
        """Worlds that permute the answers within their kinds (`swap` values) or the
        questions' subjects among themselves (names)."""
        kinds = answer_kinds(questions, answers) if swap == WorldSwap.VALUES else [question_subjects(questions)]
        return cls(kinds, rate, seed, rank, start_step, num_worlds)

    def draw(self, step: int) -> World | None:
        rng = random.Random(f"counterfactual-world:{self.seed}:{step}:{self.rank}")
        if step <= self.start_step or not self.kinds or rng.random() >= self.rate:
            return None
        return self.fixed[rng.randrange(len(self.fixed))] if self.fixed else self._permuted(rng)

    def _permuted(self, rng: random.Random) -> World:
        mapping = {}
        for kind in self.kinds:
            shuffled = list(kind)
            rng.shuffle(shuffled)
            mapping.update(zip(kind, shuffled))
        return World(mapping)
