"""Tokenization into the padded tensors the model takes, and the prompt formats.

Documents, questions and prompts are left-padded (their last token is real, so
memory tokens and generation continue right after it); targets are right-padded
and end with EOS. Padding position never matters to the model (masked, and
position ids skip it), but keeping one convention keeps shapes predictable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

RECONSTRUCTION_INSTRUCTION = "Repeat the document:"


# The target of a stage-1 QA example whose documents do not answer it (another
# document in place of the gold one: stage1.unanswerable_rate).
UNANSWERABLE = "unknown"


def document_input(text: str, title: str | None) -> str:
    """What the compressor reads for a document: "title\ntext", or the text alone.
    Training and corpus encoding must agree on it."""
    return f"{title}\n{text}" if title else text


def with_system_turn(chat_template: str, system: str) -> str:
    """`chat_template` with `system` as the system turn of every conversation that
    has none of its own, in place of whatever default the template writes
    (`system` "" gives an empty one). It works on any template that reads the
    `messages` variable: the wrapper rebinds that variable before the template runs.
    """
    literal = json.dumps(system)  # a valid Jinja string literal
    return (
        "{% if not messages or messages[0]['role'] != 'system' %}"
        f"{{% set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
        "{% endif %}" + chat_template
    )


class Prompts:
    """How the generator's prompts and targets are written for one tokenizer.

    The generator reads [memory | prompt] and is trained to continue with the
    target. A tokenizer with a chat template (an instruct model's) gets each prompt
    as one user turn through that template, generation prompt included, and
    answers without a leading space (the assistant turn starts on a new line); the
    target's EOS is the tokenizer's, which for such models ends the turn. Without
    one (the tiny preset's tokenizer, base models), plain "Question: ...\nAnswer:".
    Training, length picking and evaluation all write prompts through this class,
    so they agree for any model.
    """

    def __init__(self, tokenizer=None):
        """`tokenizer` None: the plain format (e.g. before the tiny tokenizer exists)."""
        self._chat = tokenizer if getattr(tokenizer, "chat_template", None) else None

    @property
    def chat(self) -> bool:
        return self._chat is not None

    def _user_turn(self, content: str) -> str:
        # Exactly the template's text (its default system turn included, if it has one):
        # the generator reads it after the memory vectors.
        return self._chat.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                              add_generation_prompt=True)

    def question(self, question: str) -> str:
        if self.chat:
            return self._user_turn(f"Question: {question}")
        return f"Question: {question}\nAnswer:"

    def question_in_memory(self) -> str:
        """The prompt of a QA example whose question is its last memory (stage 1)."""
        instruction = "Answer the question given last."
        return self._user_turn(instruction) if self.chat else f"{instruction}\nAnswer:"

    def reconstruction(self) -> str:
        return self._user_turn(RECONSTRUCTION_INSTRUCTION) if self.chat else RECONSTRUCTION_INSTRUCTION

    def answer(self, answer: str) -> str:
        return answer.strip() if self.chat else f" {answer.strip()}"


@dataclass(frozen=True)
class Tokenized:
    ids: torch.Tensor  # (B, T) long
    mask: torch.Tensor  # (B, T) long, 1 = real token
    num_truncated: int  # texts cut at max_length
    lengths: tuple[int, ...] = ()  # token counts before cutting


def _pad(rows: list[list[int]], pad_id: int, left: bool, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows)) if width is None else width
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def tokenize_texts(tokenizer, texts: list[str], max_length: int, pad_to_max_length: bool = False) -> Tokenized:
    """Left-padded token ids, cut to the first `max_length` tokens; padded to the
    batch's longest text, or to `max_length` (the same shapes whatever the batch)."""
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    truncated = sum(len(r) > max_length for r in rows)
    ids, mask = _pad([r[:max_length] for r in rows], tokenizer.pad_token_id, left=True,
                     width=max_length if pad_to_max_length else None)
    return Tokenized(ids, mask, truncated, tuple(len(r) for r in rows))


def tokenize_targets(tokenizer, texts: list[str], max_length: int) -> Tokenized:
    """Right-padded target ids ending with EOS (EOS kept even when cut)."""
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    truncated = sum(len(r) + 1 > max_length for r in rows)
    rows = [r[: max_length - 1] + [tokenizer.eos_token_id] for r in rows]
    ids, mask = _pad(rows, tokenizer.pad_token_id, left=False)
    return Tokenized(ids, mask, truncated)


def decode_answers(tokenizer, generated: torch.Tensor) -> list[str]:
    """Generated ids (B, N) -> strings, cut at the first EOS."""
    answers = []
    for row in generated.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers
