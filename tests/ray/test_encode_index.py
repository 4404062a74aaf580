import json

import numpy as np
import pytest

from clara_ray.encode import EncodeSettings, encode_corpus
from clara_ray.index.actor import start_index_actor
from clara_ray.index.versions import IndexSettings
from clara_ray.memory_shards import read_memory_shards
from clara_ray.modeling.checkpoint import save_model
from tests.tiny_model import make_model

pytestmark = pytest.mark.ray


def test_encode_then_index_every_document_finds_itself_first(local_ray, tmp_path):
    model, tokenizer = make_model(num_memory_tokens=2)
    model_dir = save_model(model, tokenizer, tmp_path / "model", backbone_ref="tiny", save_backbone=True)
    lines = [json.dumps({"id": f"doc-{i}", "text": f"Entity number {i} lives in town {i * 7 % 13} and plays {i % 5}."})
             for i in range(60)]
    lines.append(json.dumps({"id": "long", "text": " ".join(["word"] * 200)}))
    lines.insert(3, json.dumps({"id": "x"}))  # no text: quarantined
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")

    summary = encode_corpus(
        tmp_path / "corpus.jsonl", model_dir, tmp_path / "memory",
        EncodeSettings(doc_max_len=64, batch_size=16, min_actors=1, max_actors=2, rows_per_shard=20),
    )
    assert summary.num_input_rows == 62 == summary.num_encoded + summary.num_quarantined
    assert summary.quarantined_by_kind == {"missing field": 1}
    assert summary.num_truncated == 1
    assert summary.num_shards >= 2

    shards = read_memory_shards(tmp_path / "memory")
    assert sorted(shards.doc_ids) == sorted([f"doc-{i}" for i in range(60)] + ["long"])  # each exactly once
    assert shards.memory.shape == (61, 2, 32)
    quarantined = [json.loads(line) for path in (tmp_path / "memory" / "quarantine").glob("*.json")
                   for line in path.read_text().splitlines()]
    assert [(row["row_number"], row["reason_kind"]) for row in quarantined] == [(4, "missing field")]

    index = start_index_actor(str(tmp_path / "memory"), "test-index", settings=IndexSettings(num_cpus_per_shard=0))
    found = local_ray.get(index.search.remote(shards.keys, 3))
    assert list(found.doc_ids[:, 0]) == shards.doc_ids
    assert np.array_equal(found.memory[:, 0], shards.memory)
    local_ray.kill(index)
