import numpy as np
import pytest

from clara_ray.data.formats import Document, QuarantinedRow
from clara_ray.encode import encode_documents
from clara_ray.index.actor import start_index_actor
from clara_ray.memory_shards import read_memory_shards
from clara_ray.modeling.checkpoint import save_model
from tests.tiny_model import make_model

pytestmark = pytest.mark.ray


def test_encode_then_index_every_document_finds_itself_first(local_ray, tmp_path):
    model, tokenizer = make_model(num_memory_tokens=2)
    model_dir = save_model(model, tokenizer, tmp_path / "model", backbone_ref="tiny", save_backbone=True)
    documents = [Document(f"doc-{i}", f"Entity number {i} lives in town {i * 7 % 13} and plays {i % 5}.")
                 for i in range(60)]
    documents.append(Document("long", " ".join(["word"] * 200)))
    quarantined = [QuarantinedRow(3, "missing field 'text'", '{"id": "x"}')]

    summary = encode_documents(
        documents, quarantined, model_dir, tmp_path / "memory", doc_max_len=16, batch_size=16,
        min_actors=1, max_actors=2, num_cpus_per_actor=1, num_gpus_per_actor=0,
    )
    assert summary.num_input_documents == 62 == summary.num_encoded + summary.num_quarantined
    assert summary.num_truncated >= 1

    shards = read_memory_shards(tmp_path / "memory")
    assert sorted(shards.doc_ids) == sorted(d.id for d in documents)  # each exactly once
    assert shards.memory.shape == (61, 2, 32)
    assert (tmp_path / "memory" / "quarantine.jsonl").read_text().count("\n") == 1

    index = start_index_actor(str(tmp_path / "memory"), "Flat", num_cpus=0, name="test-index")
    found = local_ray.get(index.search.remote(shards.keys, 3))
    assert list(found.doc_ids[:, 0]) == shards.doc_ids
    assert np.array_equal(found.memory[:, 0], shards.memory)
    local_ray.kill(index)
