"""The user path: any causal LM directory that from_pretrained loads can be the backbone."""

import json

import torch

from clara_ray.config import load_config
from clara_ray.data.trap import generate_trap_corpus
from clara_ray.modeling.backbone import build_tiny, train_tokenizer
from clara_ray.modeling.checkpoint import load_model
from clara_ray.modeling.clara import Role
from clara_ray.modeling.text import tokenize_texts
from clara_ray.modeling.initial import build_initial_model


def test_backbone_from_a_pretrained_directory_is_referenced_not_copied(tmp_path):
    corpus = generate_trap_corpus(num_entities=10, seed=1)
    tokenizer = train_tokenizer([d.text for d in corpus.documents], vocab_size=300)
    backbone = build_tiny(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                          max_positions=128, seed=0)
    backbone.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")

    config = load_config(None, [f"model.backbone={tmp_path / 'hf'}", "model.train_backbone_in_stage1=false"])
    initial = build_initial_model(config, corpus.documents, corpus.train_qa, tmp_path / "init")
    model_dir, config = initial.model_dir, initial.config

    manifest = json.loads((model_dir / "clara.json").read_text())
    assert manifest["backbone"] == str(tmp_path / "hf")
    assert not (model_dir / "backbone").exists()
    model, loaded_tokenizer, _ = load_model(model_dir)
    tokens = tokenize_texts(loaded_tokenizer, [corpus.documents[0].text], 32)
    memory, _ = model.encode(Role.COMPRESSOR, tokens.ids, tokens.mask)
    assert memory.shape == (1, config.model.num_memory_tokens, 32)
    assert torch.isfinite(memory).all()
