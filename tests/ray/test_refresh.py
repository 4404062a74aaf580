"""Stage 3 with a trainable compressor: the index is refreshed in the background while
training runs, and a refresh whose encode is killed midway costs nothing but itself.
(The whole pipeline with a trainable compressor runs in tests/ray/test_pipeline.py.)"""

import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from clara_ray.config import load_config
from clara_ray.data.corpus_rows import CorpusFormat
from clara_ray.data.trap import generate_trap_corpus, write_trap_corpus
from clara_ray.encode import encode_corpus
from clara_ray.index.actor import IndexActorCandidates, index_actor_name, start_index_actor
from clara_ray.index.refresh import RefreshPlan, refresh_scheduler_name, start_refresh_scheduler
from clara_ray.index.refresh_encoder import RefreshEncoder
from clara_ray.index.versions import IndexSettings
from clara_ray.memory_shards import read_memory_shards
from clara_ray.modeling.initial import build_initial_model
from clara_ray.modeling.text import document_input
from clara_ray.pipeline import _final_refresh, encode_settings
from clara_ray.training.stages import run_stage3, write_training_data

pytestmark = pytest.mark.ray

STAGE3 = [
    "model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=128", "model.tiny.vocab_size=500", "stage1.micro_batch_size_per_worker=4",
    "stage3.top_k=2", "stage3.num_candidates=8", "stage3.micro_batch_size_per_worker=4", "stage3.steps=24",
    "stage3.report_every=4", "stage3.checkpoint_every=12", "stage3.compressor=trainable", "stage3.refresh_every=4",
    "train.num_workers=2", "encode.max_actors=1", "encode.batch_size=32",
    "stage3.counterfactual_rate=0",  # no world steps: the refresh schedule below counts stage3.steps
]


@dataclass(frozen=True)
class Prepared:
    config: object
    corpus: object
    corpus_path: Path
    initial: object
    data: object
    memory_dir: Path


@pytest.fixture(scope="module")
def prepared(local_ray, tmp_path_factory) -> Prepared:
    """A small trap corpus, an initial (untrained) model, its training data and its encoding."""
    work = tmp_path_factory.mktemp("refresh")
    corpus = generate_trap_corpus(num_entities=12, seed=3)
    paths = write_trap_corpus(work / "data", corpus)
    initial = build_initial_model(load_config(None, STAGE3), corpus.documents, corpus.train_qa, work / "init")
    config = initial.config
    data = write_training_data(config, {d.id: document_input(d.text, d.title) for d in corpus.documents},
                               corpus.train_qa, work)
    encode_corpus(str(paths["corpus"]), initial.model_dir, work / "memory", encode_settings(config),
                  CorpusFormat.JSONL, log=lambda line: None)
    return Prepared(config, corpus, paths["corpus"], initial, data, work / "memory")


def _index_and_plan(prepared: Prepared, run_dir: Path):
    """This test's own index (its versions under run_dir/index) and refresh plan."""
    config = prepared.config
    index = start_index_actor(str(prepared.memory_dir), index_actor_name(run_dir),
                              settings=IndexSettings.from_config(config.index), index_root=str(run_dir / "index"))
    plan = RefreshPlan(str(prepared.memory_dir), str(prepared.data.documents), encode_settings(config),
                       str(run_dir / "refresh"), config.stage3.num_candidates)
    return index, plan


def test_a_refresh_killed_midway_leaves_the_old_version_serving_and_training_never_waits(prepared, local_ray, tmp_path):
    """The first refresh's encode (step 4) stops midway and hangs until the test kills it:
    training must run all 24 steps meanwhile on the initial version (every later request
    skipped, since one is in flight), then the kill fails that refresh, and the final one
    (from the stage-3 model) swaps in. Nothing here depends on when the kill lands."""
    marker = tmp_path / "encoder-pid"

    class EncoderHangingOnce(RefreshEncoder):
        def encode_shard(self, model_dir, source_file, output_file):
            if not marker.exists():  # the first refresh: the snapshot loaded, nothing written yet
                self._load(model_dir)
                marker.write_text(str(os.getpid()))
                threading.Event().wait()
            return super().encode_shard(model_dir, source_file, output_file)

    config, corpus, initial, data = prepared.config, prepared.corpus, prepared.initial, prepared.data
    index, plan = _index_and_plan(prepared, tmp_path)
    scheduler = start_refresh_scheduler(index, plan, refresh_scheduler_name(tmp_path), encoder_class=EncoderHangingOnce)
    try:
        stage3 = run_stage3(config, data, initial.model_dir, IndexActorCandidates(index), tmp_path,
                            refresh=(scheduler, plan))
        # All 24 steps ran while the step-4 refresh hung: no step waited for it.
        assert [h["step"] for h in stage3.history] == [4, 8, 12, 16, 20, 24]
        status = local_ray.get(scheduler.status.remote())
        assert status["running"] == 4 and status["skipped"] == [8, 12, 16, 20] and status["events"] == []
        assert [h["index_version_step"] for h in stage3.history] == [0] * 6  # the old version served throughout
        assert [h["index_staleness"] for h in stage3.history] == [4, 8, 12, 16, 20, 24]
        assert [h["refreshes_skipped"] for h in stage3.history] == [0, 1, 2, 3, 4, 4]
        assert all(h["candidates_encoded"] > 0 for h in stage3.history)

        deadline = time.monotonic() + 300  # the hung encoder reaches its hang in its own time
        while not marker.exists():
            assert time.monotonic() < deadline, "the first refresh's encoder never got midway"
            time.sleep(0.2)
        os.kill(int(marker.read_text()), signal.SIGKILL)

        status = _final_refresh(config, index, scheduler, stage3.model_dir, log=print)
    finally:
        local_ray.kill(scheduler)
        local_ray.kill(index)
    first, final = status["events"]
    assert (first["step"], first["outcome"]) == (4, "failed") and first["error"]
    assert (final["step"], final["outcome"], final["version"]) == (24, "swapped", "v24")
    assert (tmp_path / "index" / "CURRENT").read_text().strip() == "v24"
    fingerprint = json.loads((stage3.model_dir / "clara.json").read_text())["compressor_fingerprint"]
    shards = read_memory_shards(tmp_path / "refresh" / "memory-v24")
    assert shards.manifest["model_fingerprint"] == fingerprint != json.loads(
        (Path(initial.model_dir) / "clara.json").read_text())["compressor_fingerprint"]
    assert set(shards.doc_ids) == {d.id for d in corpus.documents}
    # The failed refresh's half-written shards and its snapshot are gone; v0's memory stays (its version is kept).
    assert sorted(p.name for p in (tmp_path / "refresh").iterdir()) == ["memory-v24", "snapshots"]
    assert list((tmp_path / "refresh" / "snapshots").iterdir()) == []


def test_a_refresh_runs_on_the_one_cpu_training_leaves_free(prepared, local_ray, tmp_path):
    """Training holds every CPU but one (the demo: 2 workers + an index shard of 4): the
    refresh's encoder actor takes that one, and nothing else of the refresh waits for a
    CPU (the Ray Data job refreshes once ran waited forever there for its parsing)."""
    index, plan = _index_and_plan(prepared, tmp_path)
    scheduler = start_refresh_scheduler(index, plan, refresh_scheduler_name(tmp_path))
    initial = prepared.initial

    @local_ray.remote
    class Training:
        def ready(self):
            return True

    busy = local_ray.available_resources()["CPU"] - 1
    training = Training.options(num_cpus=busy).remote()
    try:
        local_ray.get(training.ready.remote())
        assert local_ray.available_resources().get("CPU", 0) == 1
        local_ray.get(scheduler.request_final.remote(7, str(initial.model_dir)))
        status = local_ray.get(scheduler.drain.remote(240))
    finally:
        for actor in (training, scheduler, index):
            local_ray.kill(actor)
    assert [(e["step"], e["outcome"]) for e in status["events"]] == [(7, "swapped")], status


def test_refresh_encoders_swap_in_new_adapters_and_match_a_fresh_encoding(prepared, local_ray, tmp_path):
    """The second refresh only swaps the adapters into the loaded model: its memory must
    be what the Ray Data encode job writes with that model loaded from scratch, and its
    counts those of the source encoding."""
    import numpy as np
    import torch

    from clara_ray.index.refresh_encoder import RefreshEncoders
    from clara_ray.modeling.checkpoint import load_model, save_model
    from clara_ray.modeling.clara import Role

    model, tokenizer, manifest = load_model(prepared.initial.model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.role_parameters(Role.COMPRESSOR).values():
            parameter.add_(0.05 * torch.randn_like(parameter))
    changed = save_model(model, tokenizer, tmp_path / "changed", manifest["backbone"], save_backbone=True)
    encoders = RefreshEncoders(str(prepared.memory_dir), str(prepared.data.documents),
                               encode_settings(prepared.config))
    try:
        encoders.encode(str(prepared.initial.model_dir), tmp_path / "first")
        refreshed = encoders.encode(str(changed), tmp_path / "second")
    finally:
        encoders.close()
    encode_corpus(str(prepared.corpus_path), changed, tmp_path / "fresh", encode_settings(prepared.config),
                  CorpusFormat.JSONL, log=lambda line: None)

    source, first = read_memory_shards(prepared.memory_dir), read_memory_shards(tmp_path / "first")
    second, fresh = read_memory_shards(tmp_path / "second"), read_memory_shards(tmp_path / "fresh")
    assert first.doc_ids == second.doc_ids == source.doc_ids
    np.testing.assert_allclose(first.memory.astype(np.float32), source.memory.astype(np.float32), atol=2e-3)
    by_id = dict(zip(fresh.doc_ids, fresh.memory.astype(np.float32)))
    np.testing.assert_allclose(second.memory.astype(np.float32), np.stack([by_id[d] for d in second.doc_ids]),
                               atol=2e-3)
    assert not np.allclose(second.memory.astype(np.float32), source.memory.astype(np.float32), atol=2e-3)
    assert refreshed["model_fingerprint"] == json.loads((changed / "clara.json").read_text())["compressor_fingerprint"]
    for count in ("num_input_documents", "num_encoded", "num_quarantined", "quarantined_by_kind"):
        assert refreshed[count] == source.manifest[count], count
