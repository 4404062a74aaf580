import numpy as np
import pyarrow as pa
import pytest
import torch

from clara_ray.encode import CompressorActor
from clara_ray.modeling.checkpoint import save_model
from tests.tiny_model import TEXTS, make_model

WORDS = " ".join(TEXTS).split()


def _corpus(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 20)))) for _ in range(count)]


def _rows(texts: list[str], start: int, stop: int) -> pa.Table:
    rows = range(start, stop)
    return pa.table({"doc_id": [f"d{i}" for i in rows], "title": [None] * len(rows),
                     "text": [texts[i] for i in rows], "row_key": [str(i) for i in rows]})


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()  # the actor sets its process's thread count
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tokenizer = make_model()
    return str(save_model(model, tokenizer, tmp_path_factory.mktemp("m"), backbone_ref="tiny", save_backbone=True))


def _keys(actor: CompressorActor, texts: list[str], cuts: list[int]) -> np.ndarray:
    """The float32 index keys (the fp16 memory rounds most last-bit differences away)."""
    tables = [actor(_rows(texts, a, b)) for a, b in zip(cuts, cuts[1:])]
    return np.concatenate([np.asarray(t.column("key").to_pylist(), dtype=np.float32) for t in tables])


def test_a_documents_memory_is_the_same_bits_whatever_batch_it_is_encoded_in(model_dir):
    texts = _corpus(40)
    actor = CompressorActor(model_dir, doc_max_len=24)  # pads every batch to doc_max_len by default
    whole = _keys(actor, texts, [0, 40])
    assert np.array_equal(whole.view(np.uint32), _keys(actor, texts, [0, 7, 8, 31, 40]).view(np.uint32))
    assert np.array_equal(whole.view(np.uint32), _keys(actor, texts[::-1], [0, 40])[::-1].view(np.uint32))


def test_padding_to_each_batchs_longest_document_keeps_the_values_within_rounding(model_dir):
    texts = _corpus(40)
    fixed = CompressorActor(model_dir, doc_max_len=24)
    ragged = CompressorActor(model_dir, doc_max_len=24, pad_to_doc_max_len=False)
    np.testing.assert_allclose(_keys(ragged, texts, [0, 7, 8, 31, 40]), _keys(fixed, texts, [0, 40]),
                               rtol=1e-4, atol=1e-6)
