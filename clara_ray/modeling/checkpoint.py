"""Save and load a CLaRa model as files a user can inspect.

Layout of a model directory:
    clara.json              backbone reference, memory tokens, LoRA settings, fingerprint
    tokenizer/              tokenizer files (save_pretrained)
    backbone/               config + safetensors of the base LM — only when the base
                            was built here or trained (tiny preset); a frozen
                            pretrained base is referenced by path / hub id instead
    adapters.safetensors    LoRA weights of the three roles + memory-token embeddings
                            + the query reasoner's retrieval gains

The fingerprint is a hash of the compressor's weights (base + compressor
adapter + memory tokens): memory shards record it, so shards encoded by another
compressor are never mixed into one index.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from clara_ray.modeling.backbone import load_backbone
from clara_ray.modeling.clara import ClaraModel, LoraSettings, Role

MANIFEST = "clara.json"
ADAPTERS = "adapters.safetensors"


# Buffers saved beside the adapters: the memory standardisation (ClaraModel.standardize_memory).
STANDARDIZATION = ("memory_center", "memory_scale")


def _state(model: ClaraModel, names) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {n: tensors[n].detach().to("cpu").contiguous() for n in sorted(names)}


def adapter_names(model: ClaraModel) -> set[str]:
    """What `save_model` writes to adapters.safetensors: every adapter tensor and the standardisation."""
    return {n for n, _ in model.named_parameters()
            if "lora_" in n or n.startswith(("memory_tokens.", "retrieval_gain."))} | set(STANDARDIZATION)


def compressor_fingerprint(model: ClaraModel, backbone_ref: str | None = None) -> str:
    """Hash of the compressor's weights. With `backbone_ref` (a frozen pretrained
    base, referenced rather than saved) the reference stands in for the base
    weights, so a 7B base is not hashed at every save."""
    digest = hashlib.sha256()
    params = dict(model.role_parameters(Role.COMPRESSOR))
    params.update({n: b for n, b in model.named_buffers() if n in STANDARDIZATION})
    if backbone_ref is None:
        params.update(model.backbone_parameters())
    else:
        digest.update(backbone_ref.encode())
    for name in sorted(params):
        digest.update(name.encode())
        digest.update(params[name].detach().to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_model(model: ClaraModel, tokenizer, directory: str | Path, backbone_ref: str, save_backbone: bool) -> Path:
    """Write the model; clara.json comes last (and goes first when overwriting),
    so a directory with it is always a whole model."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    tokenizer.save_pretrained(directory / "tokenizer")
    if save_backbone:
        base = model.lm.get_base_model()
        # Write the plain base weights (LoRA layers excluded) with the base config.
        state = {
            n.removeprefix("lm.base_model.model.").replace(".base_layer.", "."): p.detach().cpu().contiguous()
            for n, p in model.backbone_parameters().items()
        }
        (directory / "backbone").mkdir(exist_ok=True)
        base.config.save_pretrained(directory / "backbone")
        save_file(state, str(directory / "backbone" / "model.safetensors"))
    save_file(_state(model, adapter_names(model)), str(directory / ADAPTERS))
    lora = model.lm.peft_config[Role.COMPRESSOR.value]
    manifest = {
        "backbone": "backbone" if save_backbone else backbone_ref,
        "num_memory_tokens": model.num_memory_tokens,
        "hidden_size": model.hidden_size,
        "lora": {
            "r": lora.r,
            "alpha": lora.lora_alpha,
            "dropout": lora.lora_dropout,
            "target_modules": sorted(lora.target_modules),
        },
        "compressor_fingerprint": compressor_fingerprint(model, None if save_backbone else backbone_ref),
    }
    partial = directory / f"{MANIFEST}.partial"
    partial.write_text(json.dumps(manifest, indent=2))
    partial.replace(directory / MANIFEST)
    return directory


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32):
    """(ClaraModel, tokenizer, manifest) from a directory written by `save_model`."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"{directory} is not a clara_ray model directory (no {MANIFEST}; a save that was interrupted leaves none)"
        )
    manifest = json.loads(manifest_path.read_text())
    backbone_ref = manifest["backbone"]
    if backbone_ref == "backbone":  # saved here (built or trained in this run)
        backbone = AutoModelForCausalLM.from_pretrained(str(directory / "backbone"), dtype=dtype)
    else:  # referenced: a directory, hub id, GGUF file or bundled name (modeling/backbone.py)
        backbone = load_backbone(backbone_ref, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(directory / "tokenizer"))
    lora = LoraSettings(
        r=manifest["lora"]["r"],
        alpha=manifest["lora"]["alpha"],
        dropout=manifest["lora"]["dropout"],
        target_modules=tuple(manifest["lora"]["target_modules"]),
    )
    model = ClaraModel(backbone, manifest["num_memory_tokens"], lora)
    adapters = load_file(str(directory / ADAPTERS))
    # Retrieval gains and the standardisation came later: a model directory without
    # them loads with gain 1 and unstandardised memory.
    missing = {n for n in adapter_names(model) - set(adapters)
               if not n.startswith("retrieval_gain.") and n not in STANDARDIZATION}
    if missing:
        raise ValueError(f"{directory / ADAPTERS} lacks {len(missing)} adapter tensors, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(adapters, strict=False)
    return model, tokenizer, manifest
