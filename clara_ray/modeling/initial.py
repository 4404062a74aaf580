"""The untrained model a run starts from (models/init), Ray-free.

    init_dir = build_initial_model(config, documents, train_qa, run_dir / "models" / "init", test_qa)

The tiny preset trains its tokenizer on the corpus and training questions and
builds a small Llama from a config; any other `model.backbone` is loaded with
``from_pretrained``. Either way the three LoRA roles start fresh.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clara_ray.config import Config, ConfigError
from clara_ray.data.formats import Document, QAExample
from clara_ray.modeling.backbone import build_tiny, load_pretrained, train_tokenizer
from clara_ray.modeling.checkpoint import save_model
from clara_ray.modeling.clara import ClaraModel, LoraSettings
from clara_ray.modeling.text import RECONSTRUCTION_PROMPT, answer_target, document_input, question_prompt


def check_answer_lengths(tokenizer, train_qa: list[QAExample], test_qa: list[QAExample], answer_max_len: int) -> None:
    """Answers (+ EOS) must fit `model.answer_max_len` tokens: a longer training
    answer would be cut, and a longer test answer could never be generated whole."""
    def tokens(answer: str) -> int:
        return len(tokenizer(answer_target(answer), add_special_tokens=False)["input_ids"]) + 1

    needed = [tokens(qa.answers[0]) for qa in train_qa] + [min(tokens(a) for a in qa.answers) for qa in test_qa]
    too_long = [n for n in needed if n > answer_max_len]
    if too_long:
        raise ConfigError(
            f"model.answer_max_len: {len(too_long)} of {len(needed)} answers need more than "
            f"{answer_max_len} tokens with this tokenizer (longest {max(too_long)}, end-of-answer "
            f"token included); raise model.answer_max_len to at least {max(too_long)}"
        )


def build_initial_model(
    config: Config, documents: list[Document], train_qa: list[QAExample], directory: Path,
    test_qa: list[QAExample] = (),
) -> Path:
    """models/init: the tiny model (tokenizer trained on the corpus and training
    questions) or a pretrained base loaded with from_pretrained, with fresh adapters.
    Fails before any training when an answer does not fit `model.answer_max_len`."""
    model_config = config.model
    lora = LoraSettings(
        model_config.lora.r, model_config.lora.alpha, model_config.lora.dropout, tuple(model_config.lora.target_modules)
    )
    if model_config.is_tiny:
        texts = [document_input(d.text, d.title) for d in documents] + [question_prompt(q.question) for q in train_qa]
        texts.append(RECONSTRUCTION_PROMPT)
        tokenizer = train_tokenizer(texts, model_config.tiny.vocab_size)
        check_answer_lengths(tokenizer, train_qa, test_qa, model_config.answer_max_len)
        tiny = model_config.tiny
        backbone = build_tiny(
            tokenizer, tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.intermediate_size,
            max_positions=4 * (model_config.doc_max_len + model_config.question_max_len + model_config.reconstruction_max_len)
            + max(config.stage3.top_k, config.stage1.max_context_docs) * model_config.num_memory_tokens,
            seed=config.run.seed,
        )
        torch.manual_seed(config.run.seed)
        model = ClaraModel(backbone, model_config.num_memory_tokens, lora)
        return save_model(model, tokenizer, directory, backbone_ref="tiny", save_backbone=True)
    backbone, tokenizer = load_pretrained(model_config.backbone, getattr(torch, model_config.dtype.value))
    check_answer_lengths(tokenizer, train_qa, test_qa, model_config.answer_max_len)
    model = ClaraModel(backbone, model_config.num_memory_tokens, lora)
    return save_model(model, tokenizer, directory, backbone_ref=model_config.backbone, save_backbone=False)
