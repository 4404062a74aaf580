"""Training examples reach Ray Train workers through Ray Data.

The driver writes a stage's examples once (``tables.py``) and hands the trainer
a *draw plan*: a Ray Dataset with one row per example draw of the whole stage,
step by step, rank by rank (``examples.draws``: one seeded shuffle per epoch, the
same order the one-process runs use), each row carrying its example's columns
(read from the memory-mapped examples file by the Ray Data task that makes the
row). Ray Train splits the plan across workers (``get_dataset_shard``); with
``preserve_order`` each block holds one rank's micro-batches of a run of
`STEPS_PER_BLOCK` steps, and blocks are dealt to the workers in turn, so worker
r receives exactly rank r's draws — which every batch checks. Nothing example- or corpus-sized travels in
``train_loop_config``; the documents an example needs are read by row from the
memory-mapped document table (``tables.DocumentTable``).

A restarted worker group gets the plan from the start and skips the draws of
the steps its checkpoint already holds.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.train import DataConfig

from clara_ray.training.examples import draws
from clara_ray.training.tables import read_table

PLAN = "train"  # the dataset's name in TorchTrainer(datasets=...)
# Steps of one rank in a block: few blocks (a Ray task and a coordinator round trip
# each; one block per step cost ~0.3 s a step on 2 cores), small ones (a few KB).
STEPS_PER_BLOCK = 25


@functools.lru_cache(maxsize=4)
def _table(path: str) -> pa.Table:
    return read_table(path)


def _draw_rows(batch: dict[str, np.ndarray], table_path: str, num_items: int, batch_size: int, world: int,
               seed: int) -> pa.Table:
    plan = draws(batch["data"], num_items, batch_size, world, seed)
    rows = _table(table_path).take(pa.array(plan["item"]))
    return rows.append_column("step", pa.array(plan["step"])).append_column("rank", pa.array(plan["rank"]))


def block_positions(steps: int, batch_size: int, world: int, steps_per_block: int = STEPS_PER_BLOCK) -> list[np.ndarray]:
    """Draw positions (see ``examples.draws``) block by block: for each run of
    `steps_per_block` steps, rank 0's draws of those steps, then rank 1's, ..."""
    blocks = []
    for first in range(0, steps, steps_per_block):
        step_index = np.arange(first, min(first + steps_per_block, steps), dtype=np.int64)
        for rank in range(world):
            starts = step_index * batch_size * world + rank * batch_size
            blocks.append((starts[:, None] + np.arange(batch_size, dtype=np.int64)).ravel())
    return blocks


def draw_plan(table_path: str, steps: int, batch_size: int, world: int, seed: int) -> ray.data.Dataset:
    """The stage's draws of the examples in `table_path` as a Ray Dataset of blocks
    of one rank's micro-batches (step, rank, example columns; see module doc)."""
    num_items = _table(str(table_path)).num_rows
    draws(np.zeros(1, dtype=np.int64), num_items, batch_size, world, seed)  # too few examples: say so here
    # Draw positions made here: a read task would need a CPU, and while training
    # holds every CPU of a small cluster it would never start.
    plan = ray.data.from_numpy(block_positions(steps, batch_size, world)).map_batches(
        _draw_rows,
        batch_size=None,  # one block in, the same block out
        batch_format="numpy",
        fn_kwargs={"table_path": str(table_path), "num_items": num_items, "batch_size": batch_size,
                   "world": world, "seed": seed},
        # A few arrays per block: no CPU reserved, so the plan never waits for the CPUs
        # training holds; and so, no resource bound either: at most two tasks at a time.
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=2),
    )
    plan.context.enable_progress_bars = False  # the training loops print their own progress
    return plan


def data_config() -> DataConfig:
    """Blocks leave in order and are dealt to the workers in turn (see module doc)."""
    from ray.data import ExecutionOptions

    return DataConfig(execution_options=ExecutionOptions(preserve_order=True), enable_shard_locality=False)


def rank_batches(batch_size: int, rank: int, start_step: int = 1) -> Iterator[tuple[int, list[dict]]]:
    """(step, rows) of this worker's shard of the plan from `start_step` on (earlier
    steps are read and skipped)."""
    shard = ray.train.get_dataset_shard(PLAN)
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=2):
        steps, ranks = batch.column("step").to_numpy(), batch.column("rank").to_numpy()
        step = int(steps[0])
        if len(steps) != batch_size or (steps != step).any() or (ranks != rank).any():
            raise RuntimeError(
                f"worker {rank} received draws of steps {sorted(set(steps.tolist()))} of ranks "
                f"{sorted(set(ranks.tolist()))}: the draw plan's blocks were not dealt in order"
            )
        if step >= start_step:
            yield step, batch.drop_columns(["step", "rank"]).to_pylist()
