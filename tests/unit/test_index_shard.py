"""One FAISS shard and index versions on disk, without Ray: factories, key kinds,
memory-mapped memory, the GPU/CPU choice, build / swap / crash / keep-last-two."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pytest

from clara_ray.index.device import IndexDevice, faiss_gpu_count, resolve_device
from clara_ray.index.keys import KeyKind, memory_keys, query_keys
from clara_ray.index.shard import IndexShard, SearchParams, check_factory
from clara_ray.index.synthetic import clustered_memory
from clara_ray.index.versions import (
    BUILDING_SUFFIX,
    CURRENT,
    IndexSettings,
    build_version,
    current_version,
    find_version,
    list_versions,
    prune_versions,
    publish,
    read_version_manifest,
    refresh,
)
from tests.index_data import exact_top, write_memory_shards

N_MEM, HIDDEN = 2, 16


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    # Tiny indexes: OpenMP threads only spin against whatever else runs on the box.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def _corpus_and_queries(count=600, num_queries=40):
    memory = clustered_memory(count, N_MEM, HIDDEN, num_centres=40, seed=0)
    # Queries from the same mixture (same centres), but not database points.
    queries = clustered_memory(num_queries, N_MEM, HIDDEN, num_centres=40, seed=1, centres_seed=0)
    return [f"d{i}" for i in range(count)], memory, queries.reshape(num_queries, -1).astype(np.float32)


def _recall(found_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found_rows, exact_rows)]))


def test_flat_shard_is_exact_clara_score_and_returns_memory():
    ids, memory, queries = _corpus_and_queries()
    shard = IndexShard.build(ids, memory, "Flat")
    found = shard.search(queries * 5.0, 10)  # query scale must not matter
    rows, scores = exact_top(memory, queries, 10)
    assert found.doc_ids.tolist() == [[ids[r] for r in row] for row in rows]
    assert np.allclose(found.scores, scores, atol=1e-5)
    assert found.memory.shape == (40, 10, N_MEM, HIDDEN) and found.memory.dtype == np.float16
    assert np.array_equal(found.memory, memory[rows])
    with pytest.raises(ValueError, match="num_candidates"):
        shard.search(queries, 601)
    with pytest.raises(ValueError, match="flattened query memory"):
        shard.search(queries[:, :HIDDEN], 3)


@pytest.mark.parametrize(
    ("factory", "params", "min_recall"),
    [
        ("IVF16,Flat", SearchParams(nprobe=16), 1.0),  # every list visited: exact
        ("IVF16,Flat", SearchParams(nprobe=4), 0.8),
        ("IVF16,PQ8x4fs,RFlat", SearchParams(nprobe=8, refine_k_factor=8), 0.9),
        ("PQ8x4", SearchParams(), 0.5),
        ("HNSW16", SearchParams(ef_search=64), 0.9),
    ],
)
def test_factories_find_the_exact_top10(factory, params, min_recall):
    ids, memory, queries = _corpus_and_queries()
    shard = IndexShard.build(ids, memory, factory, params=params)
    exact_rows, _ = exact_top(memory, queries, 10)
    _, rows = shard.search_rows(queries, 10)
    assert _recall(rows, exact_rows) >= min_recall
    assert shard.factory == factory


def test_hnsw_returns_l_candidates_even_when_ef_search_is_smaller():
    ids, memory, queries = _corpus_and_queries()
    shard = IndexShard.build(ids, memory, "HNSW16", params=SearchParams(ef_search=16))
    scores, rows = shard.search_rows(queries, 200)  # a graph search keeping 16 would return -1 rows
    assert rows.shape == (40, 200) and (rows >= 0).all()
    assert (np.diff(scores, axis=1) <= 0).all()


def test_ivf_with_too_few_lists_visited_refuses_to_return_short_lists():
    ids, memory, queries = _corpus_and_queries()
    shard = IndexShard.build(ids, memory, "IVF64,Flat", params=SearchParams(nprobe=1))
    with pytest.raises(RuntimeError, match="raise index.nprobe"):
        shard.search_rows(queries, 300)  # one list of ~10 documents cannot hold 300


def test_bad_factory_fails_before_building_with_the_dimension():
    with pytest.raises(ValueError, match=r"index.factory='PQ5' is not a FAISS index over 32-dim keys"):
        check_factory("PQ5", 32)
    with pytest.raises(ValueError, match="index.factory"):
        check_factory("NoSuchIndex", 32)


def test_key_kinds_by_hand():
    memory = np.array([[[3.0, 0.0], [0.0, 4.0]]], dtype=np.float16)  # (1, 2, 2)
    assert np.allclose(memory_keys(memory, KeyKind.FLAT_MEMORY), [[0.6, 0.0, 0.0, 0.8]])
    assert np.allclose(memory_keys(memory, KeyKind.MEAN_POOLED), [[0.6, 0.8]])  # mean (1.5, 2) normalised
    assert np.allclose(query_keys(np.array([[3.0, 0, 0, 4]]), KeyKind.MEAN_POOLED, 2, 2), [[0.6, 0.8]])


def test_pooled_key_candidates_rescored_exactly_recover_the_exact_top5():
    ids, memory, queries = _corpus_and_queries()
    shard = IndexShard.build(ids, memory, "Flat", key_kind=KeyKind.MEAN_POOLED)
    assert shard.key_dim == HIDDEN
    found = shard.search(queries, 60)  # L = 60 candidates on the pooled key
    # The trainer's exact re-score: cosine of flattened memory, over the L candidates only.
    cand = found.memory.reshape(40, 60, -1).astype(np.float64)
    cand /= np.linalg.norm(cand, axis=2, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    exact_scores = np.einsum("bd,bld->bl", q, cand)  # (B, L)
    rescored = np.take_along_axis(found.doc_ids, np.argsort(-exact_scores, axis=1)[:, :5], axis=1)
    exact_rows, _ = exact_top(memory, queries, 5)
    pooled_only = found.doc_ids[:, :5]
    truth = [[ids[r] for r in row] for row in exact_rows]
    def hit(top):
        return np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top, truth)])

    assert hit(rescored) >= 0.95
    assert hit(rescored) > hit(pooled_only)  # pooling alone ranks worse; re-scoring repairs it


def test_saved_shard_is_memory_mapped_and_answers_the_same(tmp_path):
    ids, memory, queries = _corpus_and_queries()
    built = IndexShard.build(ids, memory, "IVF16,Flat", params=SearchParams(nprobe=16))
    built.save(tmp_path / "shard")
    loaded = IndexShard.load(tmp_path / "shard", params=SearchParams(nprobe=16))
    assert isinstance(loaded.memory, np.memmap) and loaded.memory.mode == "r"
    assert Path(loaded.memory.filename) == (tmp_path / "shard" / "memory.npy").resolve()
    before, after = built.search(queries, 7), loaded.search(queries, 7)
    assert np.array_equal(before.doc_ids, after.doc_ids) and np.array_equal(before.memory, after.memory)
    assert np.array_equal(before.scores, after.scores)
    (tmp_path / "shard" / "index.faiss").unlink()
    with pytest.raises(FileNotFoundError, match="index.faiss"):
        IndexShard.load(tmp_path / "shard")


def test_gpu_used_only_when_faiss_has_one_and_config_allows():
    cpu_wheel = SimpleNamespace()  # no StandardGpuResources
    gpu_wheel_no_device = SimpleNamespace(StandardGpuResources=object, get_num_gpus=lambda: 0)
    gpu_wheel = SimpleNamespace(StandardGpuResources=object, get_num_gpus=lambda: 2)
    assert resolve_device(IndexDevice.AUTO, cpu_wheel) is IndexDevice.CPU
    assert resolve_device(IndexDevice.AUTO, gpu_wheel_no_device) is IndexDevice.CPU
    assert resolve_device(IndexDevice.AUTO, gpu_wheel) is IndexDevice.GPU
    assert resolve_device(IndexDevice.CPU, gpu_wheel) is IndexDevice.CPU
    with pytest.raises(RuntimeError, match="index.device=auto"):
        resolve_device(IndexDevice.GPU, cpu_wheel)
    # This machine's faiss: AUTO picks whatever it really has.
    ids, memory, _ = _corpus_and_queries(count=50)
    expected = IndexDevice.GPU if faiss_gpu_count(faiss) > 0 else IndexDevice.CPU
    assert IndexShard.build(ids, memory, "Flat", device=IndexDevice.AUTO).device is expected


# ----------------------------------------------------------------------------- versions


def _settings(**changes) -> IndexSettings:
    return IndexSettings(**{"factory": "Flat", "num_shards": 3, **changes})


def test_version_build_splits_rows_into_shards_in_order(tmp_path):
    ids, memory = write_memory_shards(tmp_path / "memory", count=100, files=3)
    version = build_version(tmp_path / "memory", tmp_path / "index", 7, _settings())
    assert version == tmp_path / "index" / "v7"
    manifest = read_version_manifest(version)
    assert [(s["first_row"], s["rows"]) for s in manifest["shards"]] == [(0, 33), (33, 33), (66, 34)]
    assert (manifest["step"], manifest["num_documents"], manifest["key_dim"]) == (7, 100, N_MEM * HIDDEN)
    assert manifest["source"]["model_fingerprint"] == "fp0"
    for spec in manifest["shards"]:
        shard = IndexShard.load(version / spec["dir"])
        rows = slice(spec["first_row"], spec["first_row"] + spec["rows"])
        assert list(shard.doc_ids) == ids[rows]
        assert np.array_equal(shard.memory, memory[rows])
    assert current_version(tmp_path / "index") is None  # built, not published
    publish(version)
    assert current_version(tmp_path / "index") == version
    assert (tmp_path / "index" / CURRENT).read_text() == "v7\n"
    assert find_version(tmp_path / "index", tmp_path / "memory", _settings()) == version
    assert find_version(tmp_path / "index", tmp_path / "memory", _settings(factory="HNSW8")) is None
    with pytest.raises(FileExistsError, match="new step"):
        build_version(tmp_path / "memory", tmp_path / "index", 7, _settings())


def test_pooled_version_builds_keys_from_memory(tmp_path):
    write_memory_shards(tmp_path / "memory", count=60)
    version = build_version(tmp_path / "memory", tmp_path / "index", 0,
                            _settings(key_kind=KeyKind.MEAN_POOLED, num_shards=2))
    assert read_version_manifest(version)["key_dim"] == HIDDEN
    assert IndexShard.load(version / "shard-00001").key_kind is KeyKind.MEAN_POOLED


def test_failed_build_leaves_the_current_version_live(tmp_path):
    write_memory_shards(tmp_path / "memory", count=90, files=3)
    live = refresh(tmp_path / "memory", tmp_path / "index", 0, _settings())
    write_memory_shards(tmp_path / "memory2", count=90, files=3, seed=1)
    (tmp_path / "memory2" / "part-00002.parquet").write_bytes(b"not parquet")  # the last shard cannot be read
    built = []
    with pytest.raises(Exception, match="(?i)parquet"):
        build_version(tmp_path / "memory2", tmp_path / "index", 100, _settings(), on_shard_built=built.append)
    assert built == [0, 1]  # it crashed midway, after two shards were on disk
    assert current_version(tmp_path / "index") == live
    assert list_versions(tmp_path / "index") == [live]
    assert (tmp_path / "index" / f"v100{BUILDING_SUFFIX}" / "shard-00001" / "index.faiss").exists()
    # The next build clears the remains and succeeds.
    write_memory_shards(tmp_path / "memory3", count=90, seed=2)
    refresh(tmp_path / "memory3", tmp_path / "index", 100, _settings())
    assert not (tmp_path / "index" / f"v100{BUILDING_SUFFIX}").exists()
    assert current_version(tmp_path / "index").name == "v100"


def test_killed_build_leaves_the_current_version_live(tmp_path):
    write_memory_shards(tmp_path / "memory", count=90)
    live = refresh(tmp_path / "memory", tmp_path / "index", 0, _settings())
    # A hard kill (no exception handler, no cleanup) after the first of three shards.
    script = textwrap.dedent(f"""
        import os, signal
        from clara_ray.index.versions import IndexSettings, build_version
        def die(i):
            if i == 0:
                os.kill(os.getpid(), signal.SIGKILL)
        build_version({str(tmp_path / "memory")!r}, {str(tmp_path / "index")!r}, 5,
                      IndexSettings(factory="Flat", num_shards=3), on_shard_built=die)
    """)
    process = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2], capture_output=True, check=False)
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()
    assert current_version(tmp_path / "index") == live
    assert [v.name for v in list_versions(tmp_path / "index")] == ["v0"]
    partial = tmp_path / "index" / f"v5{BUILDING_SUFFIX}"
    assert (partial / "shard-00000").exists() and not (partial / "shard-00001").exists()
    shard = IndexShard.load(live / "shard-00000")  # the live version still loads and answers
    assert len(shard.search(np.asarray(shard.memory[:2], np.float32).reshape(2, -1), 1).doc_ids) == 2


def test_refresh_keeps_the_last_two_versions_and_the_live_one(tmp_path):
    write_memory_shards(tmp_path / "memory", count=30)
    for step in (0, 10, 20, 30):
        refresh(tmp_path / "memory", tmp_path / "index", step, _settings(keep_versions=2))
    assert [v.name for v in list_versions(tmp_path / "index")] == ["v20", "v30"]
    assert current_version(tmp_path / "index").name == "v30"
    # Rolled back to an older version: it stays, even though it is not among the newest two.
    build_version(tmp_path / "memory", tmp_path / "index", 40, _settings())
    publish(tmp_path / "index" / "v20")
    prune_versions(tmp_path / "index", keep=1)
    assert [v.name for v in list_versions(tmp_path / "index")] == ["v20", "v40"]
    with pytest.raises(FileNotFoundError, match="not a finished index version"):
        publish(tmp_path / "index" / "v30")
    assert os.listdir(tmp_path / "index").count(CURRENT) == 1
