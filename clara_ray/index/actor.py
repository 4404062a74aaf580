"""The index served by a Ray actor: load memory shards, answer candidate searches.

Training workers find the actor by name and call `search` every step; the
reply carries the candidates' memory vectors, so workers never read shards.
"""

from __future__ import annotations

import ray

from clara_ray.index.shard import IndexShard, SearchResult
from clara_ray.memory_shards import read_memory_shards

INDEX_ACTOR_NAME = "clara-index"


class IndexServer:
    def __init__(self, shard_dir: str, factory: str):
        shards = read_memory_shards(shard_dir)
        self.manifest = shards.manifest
        self.shard = IndexShard(shards.doc_ids, shards.keys, shards.memory, factory=factory)

    def search(self, queries, num_candidates: int) -> SearchResult:
        return self.shard.search(queries, num_candidates)

    def info(self) -> dict:
        return {
            "num_documents": len(self.shard),
            "key_dim": self.shard.key_dim,
            "model_fingerprint": self.manifest["model_fingerprint"],
        }


def start_index_actor(shard_dir: str, factory: str, num_cpus: float, name: str = INDEX_ACTOR_NAME):
    """Start (or replace) the named index actor and wait until it has loaded."""
    try:
        ray.kill(ray.get_actor(name))
    except ValueError:
        pass
    actor = ray.remote(IndexServer).options(name=name, num_cpus=num_cpus, max_restarts=2).remote(shard_dir, factory)
    ray.get(actor.info.remote())
    return actor
