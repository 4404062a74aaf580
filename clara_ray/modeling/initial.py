"""The untrained model a run starts from (models/init), Ray-free.

    initial = build_initial_model(config, documents, train_qa, run_dir / "models" / "init", test_qa)
    config, train_qa, test_qa = initial.config, initial.train_qa, initial.test_qa

The tiny preset trains its tokenizer on the corpus and training questions and
builds a small Llama from a config; any other `model.backbone` is loaded with
``from_pretrained``. Either way the three LoRA roles start fresh. With the
tokenizer in hand, the token lengths left ``auto`` are picked from the data
(clara_ray/data/lengths.py) and QA rows whose answers do not fit are set aside
(or kept and cut, ``data.on_long_answer``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from clara_ray.config import Config, LongAnswerPolicy
from clara_ray.data.formats import Document, QAExample
from clara_ray.data.lengths import LengthReport, choose_lengths, fit_answers
from clara_ray.modeling.backbone import BackboneError, build_tiny, load_pretrained, stored_reference, train_tokenizer
from clara_ray.modeling.checkpoint import save_model
from clara_ray.modeling.clara import ClaraModel, LoraSettings
from clara_ray.modeling.text import Prompts, document_input, tokenize_texts, with_system_turn

# Documents whose memory sets the memory standardisation (ClaraModel.standardize_memory):
# enough for the shared component (it is ~50x the per-document spread), few enough
# that a 7B base on a driver without a GPU gets through them in minutes.
STANDARDIZATION_SAMPLE = 32


@dataclass(frozen=True)
class InitialModel:
    model_dir: Path
    config: Config  # with the token lengths picked from the data
    lengths: LengthReport
    train_qa: list[QAExample]  # the rows that go on (answers that fit, or all when cut by policy)
    test_qa: list[QAExample]
    long_answers: dict[str, list[tuple[QAExample, str]]]  # "train_qa" / "test_qa" -> (row, reason) set aside


def build_initial_model(
    config: Config, documents: list[Document], train_qa: list[QAExample], directory: Path,
    test_qa: list[QAExample] = (),
) -> InitialModel:
    """models/init: the tiny model (tokenizer trained on the corpus and training
    questions) or a pretrained base loaded with from_pretrained, with fresh adapters,
    built with the lengths `choose_lengths` gives for this data."""
    model_config = config.model
    lora = LoraSettings(
        model_config.lora.r, model_config.lora.alpha, model_config.lora.dropout, tuple(model_config.lora.target_modules)
    )
    if model_config.is_tiny:
        plain = Prompts()  # the tiny tokenizer has no chat template
        texts = [document_input(d.text, d.title) for d in documents] + [plain.question(q.question) for q in train_qa]
        texts.append(plain.reconstruction())
        if config.stage1.question_memory_rate > 0:
            texts.append(plain.question_in_memory())
        tokenizer, backbone = train_tokenizer(texts, model_config.tiny.vocab_size), None
    else:
        backbone, tokenizer = load_pretrained(model_config.backbone, getattr(torch, model_config.dtype.value))
        if model_config.system_prompt is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise BackboneError(f"model.system_prompt: {model_config.backbone}'s tokenizer has no chat template "
                                    "to put a system turn in; leave it null")
            tokenizer.chat_template = with_system_turn(tokenizer.chat_template, model_config.system_prompt)
    lengths = choose_lengths(model_config, tokenizer, documents, train_qa, test_qa)
    config = config.with_lengths(lengths.lengths)
    model_config = config.model
    kept, long_answers = {}, {}
    for name, qa in (("train_qa", train_qa), ("test_qa", test_qa)):
        if config.data.on_long_answer == LongAnswerPolicy.TRUNCATE:
            kept[name], long_answers[name] = list(qa), []
        else:
            kept[name], long_answers[name] = fit_answers(tokenizer, qa, model_config.answer_max_len,
                                                         training=name == "train_qa")

    if backbone is None:
        tiny = model_config.tiny
        backbone = build_tiny(
            tokenizer, tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.intermediate_size,
            max_positions=4 * (model_config.doc_max_len + model_config.question_max_len + model_config.reconstruction_max_len)
            + max(config.stage3.top_k, config.stage1.max_context_docs) * model_config.num_memory_tokens,
            seed=config.run.seed,
        )
        torch.manual_seed(config.run.seed)
        model = ClaraModel(backbone, model_config.num_memory_tokens, lora)
    else:
        model = ClaraModel(backbone, model_config.num_memory_tokens, lora)
    if model_config.standardizes_memory:
        sample = random.Random(config.run.seed).sample(documents, min(STANDARDIZATION_SAMPLE, len(documents)))
        tokens = tokenize_texts(tokenizer, [document_input(d.text, d.title) for d in sample], model_config.doc_max_len,
                                pad_to_max_length=True)
        model.standardize_memory(tokens.ids, tokens.mask)
    if model_config.is_tiny:
        model_dir = save_model(model, tokenizer, directory, backbone_ref="tiny", save_backbone=True)
    else:
        model_dir = save_model(model, tokenizer, directory, backbone_ref=stored_reference(model_config.backbone),
                               save_backbone=False)
    return InitialModel(model_dir, config, lengths, kept["train_qa"], kept["test_qa"], long_answers)
