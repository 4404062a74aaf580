"""The tiny pipeline on a Ray cluster of two nodes (two raylets on this machine, each
with its own resources), its three actor pools spread over both by the run's placement
settings, and the placement read back from Ray's State API rather than assumed.

Each node carries a marker resource (node_a, node_b) and one slot each for an encoder
and a shard actor, the way a cluster's node types carry custom resources; the run asks
for one slot per encoder and shard actor, and for one training worker per node
(strict_spread), so each pool must use both nodes. Storage is the test's directory,
which both nodes see. The result is then checked as on one node: the memory the
encoders wrote on both nodes is what this process's compressor writes, and the
evaluation served by shard actors on both nodes ranks as the run's index read here.
"""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clara_ray.ask import Clara
from clara_ray.data.formats import read_qa
from clara_ray.encode import CompressorActor
from clara_ray.eval.evaluate import query_reasoner_rankings
from clara_ray.eval.metrics import recall_at_k
from clara_ray.memory_shards import MANIFEST
from clara_ray.training.tables import DOCUMENTS, DocumentTable

pytestmark = pytest.mark.ray

POOLS = {
    "training workers": "RayTrainWorker",
    "encoder actors": "MapWorker(MapBatches(CompressorActor))",
    "index shards": "ShardServer",
}

_DRIVER = """
import glob, json, socket, sys
import numpy as np
import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
from clara_ray.cli import WORKER_ENV
from clara_ray.config import load_config
from clara_ray.index.actor import IndexActorCandidates, start_index_actor
from clara_ray.index.versions import IndexSettings
from clara_ray.pipeline import run_pipeline

POOLS = json.loads(sys.argv[1])
result_path, probe_path, overrides = sys.argv[2], sys.argv[3], sys.argv[4:]
with socket.socket() as s:  # the dashboard (State API) off the port of any other Ray here
    s.bind(("127.0.0.1", 0))
    dashboard_port = s.getsockname()[1]
slots = {"encoder_slot": 1, "shard_slot": 1}
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 4, "resources": {"node_a": 1, **slots}, "include_dashboard": True, "dashboard_port": dashboard_port})
cluster.add_node(num_cpus=4, resources={"node_b": 1, **slots})
try:
    ray.init(address=cluster.address, runtime_env={"env_vars": WORKER_ENV})
    cluster.wait_for_nodes()
    config = load_config(None, overrides)
    summary = run_pipeline(config, log=print)
    # The finished run's index served again, each document's own key searched on its shards.
    run_dir = summary["run_dir"]
    keys = np.concatenate([np.stack(pq.read_table(path, columns=["key"]).column("key").to_numpy(zero_copy_only=False))
                           for path in sorted(glob.glob(f"{run_dir}/memory/*.parquet"))])
    router = start_index_actor(f"{run_dir}/memory", "two-node-probe", settings=IndexSettings.from_config(config.index))
    found = IndexActorCandidates(router).candidates(keys, 8)
    np.savez(probe_path, keys=keys, doc_ids=found.doc_ids.astype(str), scores=found.scores, memory=found.memory)
    ray.kill(router)
    node_names = {node["NodeID"]: "node_a" if "node_a" in node["Resources"] else "node_b" for node in ray.nodes()}
    placement = {pool: [] for pool in POOLS}
    for actor in list_actors(detail=True, limit=10000, raise_on_missing_output=False):
        for pool, class_name in POOLS.items():
            if actor.class_name == class_name:
                placement[pool].append(node_names.get(actor.node_id, f"unknown node {actor.node_id}"))
    with open(result_path, "w") as out:
        json.dump({"summary": summary, "placement": placement, "driver_node": node_names[ray.get_runtime_context().get_node_id()]}, out)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def _overrides(output_dir) -> list[str]:
    return [
        f"run.output_dir={output_dir}", "run.name=two_nodes", "data.trap.num_entities=12",
        "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
        "model.tiny.intermediate_size=64", "model.tiny.vocab_size=300",
        "stage1.steps=4", "stage1.report_every=2", "stage1.micro_batch_size_per_worker=4",
        "stage3.steps=4", "stage3.report_every=2", "stage3.micro_batch_size_per_worker=4", "stage3.attempts=1",
        "stage3.top_k=2", "stage3.num_candidates=8", "eval.baselines=[bm25]",
        # the placement under test
        "train.num_workers=2", "train.placement_strategy=strict_spread",
        # both encoders up before the first batch: one alone may otherwise encode all 108
        "encode.min_actors=2", "encode.max_actors=2", "encode.wait_for_min_actors_s=600",
        "encode.batch_size=16", "encode.resources_per_actor={encoder_slot: 1}",
        "index.num_shards=2", "index.resources_per_shard={shard_slot: 1}",
    ]


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("two_nodes")
    result, probe, log = directory / "result.json", directory / "probe.npz", directory / "driver.log"
    with open(log, "wb") as out:
        driver = subprocess.run(
            [sys.executable, "-c", _DRIVER, json.dumps(POOLS), str(result), str(probe), *_overrides(directory)],
            cwd=Path(__file__).parents[2], stdout=out, stderr=subprocess.STDOUT, timeout=1200,
        )
    assert driver.returncode == 0, log.read_text(errors="replace")[-4000:]
    return {**json.loads(result.read_text()), "probe": dict(np.load(probe))}


def test_each_pool_ran_on_both_nodes(two_node_run, capsys):
    placement = two_node_run["placement"]
    with capsys.disabled():  # the placement checked, in the suite's output
        print(f"\n[two nodes] the driver ran on {two_node_run['driver_node']}; actors per node, from Ray's State API:")
        for pool, nodes in placement.items():
            print(f"[two nodes]   {pool}: {dict(sorted(Counter(nodes).items()))}")
    # Stages 1 and 3 start two workers each, one per node (strict_spread); the two encoders
    # and the two shard actors of each index the run and the probe start take one node's slot each.
    assert sorted(placement["training workers"]) == ["node_a"] * 2 + ["node_b"] * 2
    assert sorted(placement["encoder actors"]) == ["node_a", "node_b"]
    shards = Counter(placement["index shards"])
    assert set(shards) == {"node_a", "node_b"} and shards["node_a"] == shards["node_b"], shards


def test_the_memory_written_on_both_nodes_is_the_compressors(two_node_run):
    run_dir = Path(two_node_run["summary"]["run_dir"])
    memory_dir = run_dir / "memory"
    written = pa.concat_tables([pq.read_table(path) for path in sorted(memory_dir.glob("*.parquet"))])
    manifest = json.loads((memory_dir / MANIFEST).read_text())
    assert manifest["num_encoded"] == written.num_rows == two_node_run["summary"]["data"]["num_encoded"]
    assert sorted(doc_ids_of(written)) == sorted(set(doc_ids_of(written)))  # each document once

    doc_ids, row_keys = written.column("doc_id").to_pylist(), written.column("row_key").to_pylist()
    compressor = CompressorActor(str(run_dir / "models" / "stage1"), two_node_run["summary"]["doc_max_len"])
    here = compressor.encode_texts(doc_ids, DocumentTable(str(run_dir / "data" / DOCUMENTS)).texts_of(doc_ids), row_keys)
    np.testing.assert_allclose(_matrix(here, "memory"), _matrix(written, "memory"), atol=2e-3)


def doc_ids_of(table):
    return table.column("doc_id").to_pylist()


def _matrix(table, column):
    return np.stack(table.column(column).to_numpy(zero_copy_only=False)).astype(np.float32)


def test_shards_on_both_nodes_search_as_the_index_read_here(two_node_run):
    probe = two_node_run["probe"]
    here = Clara.load(two_node_run["summary"]["run_dir"]).index.search(probe["keys"], 8)
    assert here.doc_ids.astype(str).tolist() == probe["doc_ids"].tolist()
    np.testing.assert_allclose(here.scores, probe["scores"], rtol=1e-6)
    np.testing.assert_array_equal(here.memory, probe["memory"])
    assert (probe["scores"][:, 0] > 0.999).all()  # each document's own key finds it first


def test_the_evaluation_over_shards_on_both_nodes_ranks_as_the_index_here(two_node_run):
    summary = two_node_run["summary"]
    clara = Clara.load(summary["run_dir"])
    set_aside = {row["id"] for row in
                 json.loads(Path(summary["run_dir"], "steps", "init.json").read_text())["long_answers"]["test_qa"]}
    questions = [q for q in read_qa(Path(summary["run_dir"], "data", "test_qa.jsonl")).records if q.id not in set_aside]
    config = clara.config
    rankings = query_reasoner_rankings(
        clara.model, clara.tokenizer, [q.question for q in questions], clara.index.search,
        max(config.stage3.num_candidates, 5), config.model.question_max_len, config.eval.batch_size,
    )
    evaluated = summary["results"]["query reasoner after stage 3"]
    gold = [q.gold_doc_ids for q in questions]
    assert [recall_at_k(rankings, gold, k) for k in (1, 5)] == [evaluated["recall@1"], evaluated["recall@5"]]
