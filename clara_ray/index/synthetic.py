"""Clustered synthetic vectors for index tests and benchmarks (uniform random vectors
make every ANN index look bad and every exact one look good: real embeddings cluster).

A Gaussian mixture: `num_centres` random centres, each point a centre plus
isotropic noise of `noise` times the centre's scale, L2-normalised. With noise
0.7 two points of one cluster have cosine about 0.67, points of different
clusters about 0; a point's nearest neighbours are in its own cluster but not
trivially so. Memory vectors: every memory token of a document is drawn around
its own token centre of the document's cluster, so pooling the tokens loses
information that the flattened memory keeps.
"""

from __future__ import annotations

import numpy as np


def clustered_vectors(count: int, dim: int, num_centres: int, noise: float = 0.7, seed: int = 0,
                      centres_seed: int | None = None, chunk: int = 65536) -> np.ndarray:
    """(count, dim) float32 unit rows. Same `centres_seed` = same mixture (queries vs database)."""
    centres = np.random.default_rng(seed if centres_seed is None else centres_seed).standard_normal(
        (num_centres, dim), dtype=np.float32)  # (C, dim)
    rng = np.random.default_rng([seed, 1])
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, chunk):  # chunked: 1M x 768 fits, its temporaries need not
        stop = min(start + chunk, count)
        block = centres[rng.integers(0, num_centres, stop - start)]
        block += noise * rng.standard_normal(block.shape, dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:stop] = block
    return out


def clustered_memory(count: int, num_memory_tokens: int, hidden: int, num_centres: int, noise: float = 0.7,
                     seed: int = 0, centres_seed: int | None = None) -> np.ndarray:
    """(count, n_mem, hidden) float16 memory vectors from one mixture over the flattened memory."""
    flat = clustered_vectors(count, num_memory_tokens * hidden, num_centres, noise, seed, centres_seed)
    # Scale like hidden states (norm ~ sqrt(hidden) per token), stored in fp16 like real memory.
    return (flat.reshape(count, num_memory_tokens, hidden) * np.sqrt(num_memory_tokens * hidden)).astype(np.float16)
