"""The sharded index on local Ray: exact merge, a shard actor killed mid-search,
refreshes that succeed or crash while searches keep coming."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from clara_ray.index.actor import IndexSearchError, start_index_actor
from clara_ray.index.shard import IndexShard
from clara_ray.index.synthetic import clustered_memory
from clara_ray.index.versions import BUILDING_SUFFIX, IndexSettings, current_version, list_versions
from tests.index_data import write_memory_shards

pytestmark = pytest.mark.ray

N_MEM, HIDDEN, COUNT = 2, 32, 3000


def _settings(**changes) -> IndexSettings:
    return IndexSettings(**{"factory": "Flat", "num_shards": 4, "num_cpus_per_shard": 0.25, **changes})


def _queries(count=48, seed=7):
    return clustered_memory(count, N_MEM, HIDDEN, num_centres=40, seed=seed, centres_seed=0).reshape(count, -1).astype(
        np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    ids, memory = write_memory_shards(root / "memory", count=COUNT, n_mem=N_MEM, hidden=HIDDEN, files=5)
    single = IndexShard.build(ids, memory, "Flat")  # one Flat index over everything: the reference
    return root, ids, memory, single


def _assert_same(found, expected):
    assert found.doc_ids.shape == expected.doc_ids.shape
    assert found.doc_ids.tolist() == expected.doc_ids.tolist()
    assert np.array_equal(found.scores, expected.scores)
    assert np.array_equal(found.memory, expected.memory)


def test_sharded_flat_equals_one_flat_index(local_ray, corpus, tmp_path):
    root, _, _, single = corpus
    router = start_index_actor(str(root / "memory"), settings=_settings(num_shards=5), index_root=str(tmp_path),
                               name="test-sharded-exact")
    assert local_ray.get(router.info.remote())["num_shards"] == 5
    queries = _queries()
    expected = single.search(queries, 10)
    assert (np.diff(expected.scores, axis=1) < 0).all(), "ties in the reference: the comparison would be ambiguous"
    _assert_same(local_ray.get(router.search.remote(queries, 10)), expected)
    # L = 700 > 600 rows per shard: every shard returns all it has. Among 700 float32 scores a
    # few exact ties occur; tied documents may come in either order, so compare those as sets.
    expected = single.search(queries, 700)
    found = local_ray.get(router.search.remote(queries, 700))
    assert np.array_equal(found.scores, expected.scores)
    tied = (np.diff(expected.scores, axis=1) == 0).any(axis=1)  # (B,)
    assert tied.sum() <= len(queries) // 4
    assert found.doc_ids[~tied].tolist() == expected.doc_ids[~tied].tolist()
    assert [set(row) for row in found.doc_ids[tied]] == [set(row) for row in expected.doc_ids[tied]]
    assert np.array_equal(found.memory[~tied], expected.memory[~tied])
    with pytest.raises(ValueError, match="num_candidates"):
        local_ray.get(router.search.remote(queries, COUNT + 1))
    local_ray.kill(router)


def test_shard_actor_killed_mid_search_restarts_and_searches_stay_complete(local_ray, corpus, tmp_path):
    root, _, _, single = corpus
    router = start_index_actor(str(root / "memory"), settings=_settings(max_restarts=3, search_attempts=3),
                               index_root=str(tmp_path), name="test-sharded-kill")
    shards = local_ray.get(router.shard_actors.remote())
    pids = [info["pid"] for info in local_ray.get([shard.info.remote() for shard in shards])]
    queries = _queries(count=256)
    expected = single.search(queries, 64)
    for victim, kill in ((1, lambda: local_ray.kill(shards[1], no_restart=False)),
                         (3, lambda: os.kill(pids[3], signal.SIGKILL))):
        pending = [router.search.remote(queries, 64) for _ in range(8)]  # searches in flight ...
        time.sleep(0.05)
        ready, _ = local_ray.wait(pending, num_returns=len(pending), timeout=0)
        assert len(ready) < len(pending), "every search had finished before the kill: nothing was mid-search"
        kill()  # ... when a shard actor dies
        for found in local_ray.get(pending, timeout=120):
            _assert_same(found, expected)
        new_pid = local_ray.get(shards[victim].info.remote())["pid"]
        assert new_pid != pids[victim], "the shard actor was not restarted"
    _assert_same(local_ray.get(router.search.remote(queries, 64)), expected)
    local_ray.kill(router)


def test_search_raises_rather_than_return_a_partial_result(local_ray, corpus, tmp_path):
    root, *_ = corpus
    router = start_index_actor(str(root / "memory"), settings=_settings(max_restarts=0, search_attempts=2),
                               index_root=str(tmp_path), name="test-sharded-partial")
    shards = local_ray.get(router.shard_actors.remote())
    local_ray.kill(shards[2], no_restart=True)  # gone for good: 3 of 4 shards could still answer
    with pytest.raises(IndexSearchError, match="lost a shard"):
        local_ray.get(router.search.remote(_queries(), 10))
    local_ray.kill(router)


def test_refresh_while_searching_then_crashing_refresh_keeps_serving(local_ray, corpus, tmp_path):
    root, _, _, single = corpus
    settings = _settings(num_shards=2, keep_versions=2)
    router = start_index_actor(str(root / "memory"), settings=settings, index_root=str(tmp_path / "index"),
                               name="test-sharded-refresh")
    new_ids, new_memory = write_memory_shards(tmp_path / "memory-step10", count=1200, n_mem=N_MEM, hidden=HIDDEN,
                                              seed=3)
    refreshed = IndexShard.build(new_ids, new_memory, "Flat")
    queries = _queries()
    old_answer, new_answer = single.search(queries, 20), refreshed.search(queries, 20)

    def search_until(done):
        answers = []
        while not done():
            answers.append(local_ray.get(router.search.remote(queries, 20)))
        return answers

    # A refresh while searches keep coming: every answer is wholly the old or wholly the new version's.
    refresh = router.refresh.remote(str(tmp_path / "memory-step10"), 10)
    with ThreadPoolExecutor(1) as pool:
        answers = pool.submit(search_until, lambda: local_ray.wait([refresh], timeout=0)[0] != []).result(timeout=300)
    assert local_ray.get(refresh)["version"] == "v10"
    assert len(answers) >= 1
    for found in answers:
        same_as_old = found.doc_ids.tolist() == old_answer.doc_ids.tolist()
        assert same_as_old or found.doc_ids.tolist() == new_answer.doc_ids.tolist()
    _assert_same(local_ray.get(router.search.remote(queries, 20)), new_answer)
    assert local_ray.get(router.info.remote())["version"] == "v10"

    # A refresh whose build crashes midway (its last memory shard is unreadable): v10 keeps serving.
    write_memory_shards(tmp_path / "memory-step20", count=300, n_mem=N_MEM, hidden=HIDDEN, files=3, seed=4)
    (tmp_path / "memory-step20" / "part-00002.parquet").write_bytes(b"truncated by a crash")
    failing = router.refresh.remote(str(tmp_path / "memory-step20"), 20)
    with ThreadPoolExecutor(1) as pool:
        answers = pool.submit(search_until, lambda: local_ray.wait([failing], timeout=0)[0] != []).result(timeout=300)
    with pytest.raises(Exception, match="(?i)parquet"):
        local_ray.get(failing)
    for found in answers + [local_ray.get(router.search.remote(queries, 20))]:
        _assert_same(found, new_answer)
    assert local_ray.get(router.info.remote())["version"] == "v10"
    assert current_version(tmp_path / "index").name == "v10"
    assert (tmp_path / "index" / f"v20{BUILDING_SUFFIX}").exists()  # the crashed build's remains, never served

    # One more good refresh: the last two versions stay on disk.
    write_memory_shards(tmp_path / "memory-step30", count=300, n_mem=N_MEM, hidden=HIDDEN, seed=5)
    assert local_ray.get(router.refresh.remote(str(tmp_path / "memory-step30"), 30))["version"] == "v30"
    assert [v.name for v in list_versions(tmp_path / "index")] == ["v10", "v30"]
    assert not (tmp_path / "index" / f"v20{BUILDING_SUFFIX}").exists()
    local_ray.kill(router)
