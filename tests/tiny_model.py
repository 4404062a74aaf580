"""A very small CLaRa model for tests: tokenizer trained on a few sentences, 2 layers."""

from __future__ import annotations

import torch

from clara_ray.modeling.backbone import build_tiny, train_tokenizer
from clara_ray.modeling.clara import ClaraModel, LoraSettings

TEXTS = [
    "Zorvan Kellit grew up in Marlow, the family hometown.",
    "Which city was Zorvan Kellit born in? Records were lost.",
    "Quipel Silhir owns an old cello and carries it everywhere.",
    "Radjor Galdun works as a baker in the old town.",
    "Question: Which city was Radjor Galdun born in?\nAnswer: Marlow",
    "Repeat the document:",
]

LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj", "o_proj"))


def make_model(num_memory_tokens: int = 2, seed: int = 0):
    tokenizer = train_tokenizer(TEXTS * 4, vocab_size=300)
    backbone = build_tiny(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                          max_positions=256, seed=seed)
    torch.manual_seed(seed)
    model = ClaraModel(backbone, num_memory_tokens, LORA)
    # Non-zero LoRA B matrices, so that the three roles really compute different things.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return model, tokenizer
