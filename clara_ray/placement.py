"""Where a run's actors go on a cluster of several nodes.

Three pools of actors share a run's cluster: the training workers of a stage (a
Ray Train placement group), the compressor actors that encode the corpus, and the
index's shard actors. Each pool can reserve custom resources besides its CPUs and
GPUs, the way a cluster marks its node types (``ray start --resources
'{"encode_node": 8}'``; ``resources:`` of a node type in ``cluster/``), and can be
spread over the nodes instead of placed where Ray finds room first:

    train.placement_strategy: strict_spread   # one worker per node
    encode.resources_per_actor: {encode_node: 1}
    index.scheduling: spread                   # shard actors on different nodes

This module turns those settings into Ray's options; ``clara_ray.config`` checks them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

# Ray's own resources; each pool sets them through its num_cpus / num_gpus fields.
BUILT_IN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


class PlacementStrategy(str, enum.Enum):
    """Ray Train's placement-group strategy for a stage's workers."""

    PACK = "pack"                    # as few nodes as fit the workers (Ray Train's default)
    SPREAD = "spread"                # over as many nodes as have room
    STRICT_PACK = "strict_pack"      # all on one node, or wait
    STRICT_SPREAD = "strict_spread"  # each on its own node, or wait


class Scheduling(str, enum.Enum):
    """How Ray picks the node of each actor in a pool (encoders, index shards)."""

    DEFAULT = "default"  # Ray's hybrid policy: the nodes with room, fullest first
    SPREAD = "spread"    # round-robin over the nodes with room


def actor_options(resources: Mapping[str, float], scheduling: Scheduling | str) -> dict:
    """`.options(...)` (or Ray Data ``ray_remote_args``) for a pool's custom
    resources and scheduling; empty for the defaults."""
    options: dict = {}
    if resources:
        options["resources"] = dict(resources)
    if Scheduling(scheduling) is Scheduling.SPREAD:
        options["scheduling_strategy"] = "SPREAD"
    return options


def train_placement(strategy: PlacementStrategy | str) -> str:
    """The ``ScalingConfig.placement_strategy`` string."""
    return PlacementStrategy(strategy).value.upper()
