"""Token lengths picked from the data, what each length cuts, and answers that do not fit.

    report = choose_lengths(config.model, tokenizer, documents, train_qa, test_qa)
    config = config.with_lengths(report.lengths)
    kept, set_aside = fit_answers(tokenizer, qa, report.answer_max_len)

A length the config gives is kept; one set to ``auto`` is picked from the token
counts (with the run's tokenizer) of what it limits:

- ``doc_max_len``: the ``model.length_coverage`` quantile of the documents'
  counts, rounded up to a multiple of ``compression_rate`` (memory vectors come
  from whole blocks), so by default 98% of documents are encoded whole;
- ``question_max_len``: the longest question prompt (padding is per batch, so a
  long limit costs nothing until a long question comes), rounded up to 8;
- ``answer_max_len``: the coverage quantile of the answers' counts with the
  end-of-answer token, rounded up to 4; a longer answer is quarantined with its
  reason, or kept and cut (``data.on_long_answer``);
- ``reconstruction_max_len``: ``doc_max_len`` + 8 (stage 1 rebuilds the document).

None is picked above ``model.max_auto_len``. Document counts come from at most
`SAMPLE` documents spread evenly over the corpus; the encoder counts every cut
document exactly (``num_truncated`` in the memory manifest and the report).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from clara_ray.config import AUTO, LENGTH_KEYS, ModelConfig
from clara_ray.data.formats import Document, QAExample
from clara_ray.modeling.text import Prompts, document_input

SAMPLE = 50_000


@dataclass(frozen=True)
class Spread:
    """Token counts of one kind of text against its limit."""

    count: int  # texts measured
    median: float
    quantile: float  # at model.length_coverage
    longest: int
    limit: int
    over: int  # texts longer than the limit

    @property
    def share_over(self) -> float:
        return self.over / self.count if self.count else 0.0


@dataclass(frozen=True)
class LengthReport:
    doc_max_len: int
    question_max_len: int
    answer_max_len: int
    reconstruction_max_len: int
    picked: tuple[str, ...]  # the lengths that were auto
    coverage: float
    documents: Spread
    questions: Spread
    answers: Spread

    @property
    def lengths(self) -> dict[str, int]:
        return {key: getattr(self, key) for key in LENGTH_KEYS}

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LengthReport:
        spreads = {kind: Spread(**data[kind]) for kind in ("documents", "questions", "answers")}
        return cls(**{**data, **spreads, "picked": tuple(data["picked"])})

    def lines(self) -> list[str]:
        """One line per length: the limit, how it was chosen, what it cuts."""
        sampled = " (sampled)" if self.documents.count == SAMPLE else ""
        rows = (
            ("model.doc_max_len", self.doc_max_len, "doc_max_len", self.documents, f"documents{sampled} cut"),
            ("model.question_max_len", self.question_max_len, "question_max_len", self.questions, "questions cut"),
            ("model.answer_max_len", self.answer_max_len, "answer_max_len", self.answers, "answers too long"),
        )
        lines = []
        for name, limit, key, spread, what in rows:
            rule = "the longest" if key == "question_max_len" else f"q{self.coverage:g}"
            how = f"auto ({rule} of the data)" if key in self.picked else "set"
            lines.append(
                f"{name} = {limit} [{how}]: median {spread.median:g}, q{self.coverage:g} {spread.quantile:g}, "
                f"longest {spread.longest} tokens; {spread.over} of {spread.count} {what} ({spread.share_over:.1%})"
            )
        how = "auto (doc_max_len + 8)" if "reconstruction_max_len" in self.picked else "set"
        lines.append(f"model.reconstruction_max_len = {self.reconstruction_max_len} [{how}]")
        return lines

    def warnings(self, threshold: float) -> list[str]:
        """A line for each kind of text cut (or set aside) more often than `threshold`."""
        warnings = []
        for key, spread, what in (("doc_max_len", self.documents, "documents are cut"),
                                  ("question_max_len", self.questions, "questions are cut"),
                                  ("answer_max_len", self.answers, "answers do not fit")):
            if spread.share_over > threshold:
                advice = ("raise model.max_auto_len or model.length_coverage" if key in self.picked
                          else "raise it, or set it to auto")
                warnings.append(
                    f"{spread.share_over:.1%} of {what} at model.{key}={getattr(self, key)} tokens "
                    f"(longest {spread.longest}); {advice}"
                )
        return warnings


def _round_up(value: float, multiple: int) -> int:
    return max(multiple, math.ceil(value / multiple) * multiple)


def _counts(tokenizer, texts: Sequence[str]) -> np.ndarray:
    counts = []
    for start in range(0, len(texts), 4096):
        counts += [len(ids) for ids in tokenizer(list(texts[start:start + 4096]), add_special_tokens=False)["input_ids"]]
    return np.asarray(counts, dtype=np.int64)


def answer_tokens(tokenizer, answer: str) -> int:
    """Tokens a target answer takes, end-of-answer token included."""
    return len(tokenizer(Prompts(tokenizer).answer(answer), add_special_tokens=False)["input_ids"]) + 1


def _needed(tokenizer, qa: QAExample, training: bool) -> int:
    # Training targets are the first answer; a test question is answered when any answer is generated.
    return answer_tokens(tokenizer, qa.answers[0]) if training else min(answer_tokens(tokenizer, a) for a in qa.answers)


def _spread(counts: np.ndarray, coverage: float, limit: int) -> Spread:
    if not len(counts):
        return Spread(0, 0.0, 0.0, 0, limit, 0)
    return Spread(len(counts), float(np.median(counts)), float(np.quantile(counts, coverage)), int(counts.max()),
                  limit, int((counts > limit).sum()))


def choose_lengths(model: ModelConfig, tokenizer, documents: Sequence[Document], train_qa: Sequence[QAExample],
                   test_qa: Sequence[QAExample] = ()) -> LengthReport:
    """The four token lengths: each given one kept, each ``auto`` one picked from the data."""
    step = max(1, len(documents) // SAMPLE) if len(documents) > SAMPLE else 1
    sample = documents[::step][:SAMPLE]
    docs = _counts(tokenizer, [document_input(d.text, d.title) for d in sample])
    prompts = Prompts(tokenizer)
    questions = _counts(tokenizer, [prompts.question(q.question) for q in [*train_qa, *test_qa]])
    # Reconstruction examples' instruction goes in the same prompt tensor.
    instruction = len(tokenizer(prompts.reconstruction(), add_special_tokens=False)["input_ids"])
    answers = np.asarray([_needed(tokenizer, q, True) for q in train_qa]
                         + [_needed(tokenizer, q, False) for q in test_qa], dtype=np.int64)
    q = model.length_coverage
    cap = model.max_auto_len
    rate = model.compression_rate

    def pick(key: str, auto: int) -> int:
        return auto if getattr(model, key) == AUTO else getattr(model, key)

    doc = pick("doc_max_len", min(_round_up(np.quantile(docs, q) if len(docs) else 1, rate), max(rate, cap // rate * rate)))
    question = pick("question_max_len", min(_round_up(max(questions.max(initial=1), instruction), 8), cap))
    answer = pick("answer_max_len", min(_round_up(np.quantile(answers, q) if len(answers) else 1, 4), cap))
    reconstruction = pick("reconstruction_max_len", doc + 8)
    return LengthReport(
        doc_max_len=doc, question_max_len=question, answer_max_len=answer, reconstruction_max_len=reconstruction,
        picked=tuple(key for key in LENGTH_KEYS if getattr(model, key) == AUTO), coverage=q,
        documents=_spread(docs, q, doc), questions=_spread(questions, q, question), answers=_spread(answers, q, answer),
    )


def fit_answers(tokenizer, qa: Sequence[QAExample], answer_max_len: int,
                training: bool) -> tuple[list[QAExample], list[tuple[QAExample, str]]]:
    """(rows whose answer fits, [(row, reason)] for the others)."""
    kept, set_aside = [], []
    for example in qa:
        needed = _needed(tokenizer, example, training)
        if needed > answer_max_len:
            set_aside.append((example, f"answer needs {needed} tokens (end-of-answer token included), "
                                       f"model.answer_max_len is {answer_max_len}"))
        else:
            kept.append(example)
    return kept, set_aside
