import itertools
import random

import numpy as np
import pytest

from clara_ray.data.formats import QAExample
from clara_ray.training.batches import answer_pool, stage1_examples
from clara_ray.training.examples import QuestionBatch, draws, epoch_slices
from clara_ray.training.tables import (
    DocumentTable,
    read_answer_pool,
    read_examples,
    read_table,
    questions_from_rows,
    write_documents,
    write_examples,
    write_questions,
)


@pytest.mark.parametrize("num_items,batch_size,world,seed", [(2160, 16, 2, 0), (100, 3, 2, 5), (37, 4, 3, 1), (9, 9, 1, 2)])
def test_the_draw_plan_gives_each_rank_what_epoch_slices_gives_it(num_items, batch_size, world, seed):
    steps = 3 * num_items // (batch_size * world) + 2  # several epochs, the last one begun
    plan = draws(np.arange(steps * batch_size * world), num_items, batch_size, world, seed)
    assert plan["step"].tolist() == [s for s in range(1, steps + 1) for _ in range(batch_size * world)]
    for rank in range(world):
        expected = list(itertools.islice(epoch_slices(num_items, batch_size, rank, world, seed), steps))
        assert plan["item"][plan["rank"] == rank].reshape(steps, batch_size).tolist() == expected
    # Any slice of positions is computed alone the same way (Ray Data tasks each take one block).
    tail = draws(np.arange(batch_size * world, 2 * batch_size * world), num_items, batch_size, world, seed)
    assert tail["item"].tolist() == plan["item"][batch_size * world : 2 * batch_size * world].tolist()


def test_too_few_examples_for_one_step_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot fill one micro-batch of 16 on 2 workers"):
        draws(np.arange(4), 20, 16, 2, 0)


def test_examples_documents_and_questions_round_trip_through_their_files(tmp_path):
    documents = {f"d{i}": f"document number {i}" for i in range(30)}
    qa = [QAExample("q1", "about d3?", ["x"], ["d3"]), QAExample("q2", "about d9?", ["y"], ["d9"])]
    examples = stage1_examples(documents, qa, neighbours=[["d7", "d8"], ["d1"]], rivals=[["d20", "d9"], []])
    # d9 answers q2, so q1's rivals state a "y"; d20 answers no question.
    assert (examples[-2].rivals, examples[-2].rival_answers) == ((20, 9), ("y",))
    write_documents(tmp_path / "documents.arrow", documents)
    write_examples(tmp_path / "examples.arrow", examples)
    assert read_examples(tmp_path / "examples.arrow") == examples
    assert read_answer_pool(tmp_path / "examples.arrow") == answer_pool(examples) == ["x", "y"]
    table = DocumentTable(tmp_path / "documents.arrow")
    assert len(table) == 30 and [table[e.document] for e in examples[-2:]] == [documents["d3"], documents["d9"]]
    assert not list(tmp_path.glob("*.partial"))

    questions = QuestionBatch.from_qa(qa)
    write_questions(tmp_path / "questions.arrow", questions)
    assert questions_from_rows(read_table(tmp_path / "questions.arrow").to_pylist()) == questions
    no_gold = QuestionBatch(["a"], ["who?"], ["me"])
    write_questions(tmp_path / "no_gold.arrow", no_gold)
    assert questions_from_rows(read_table(tmp_path / "no_gold.arrow").to_pylist()) == no_gold


def test_a_step_reads_the_same_texts_from_the_table_as_from_a_list(tmp_path):
    from clara_ray.training.batches import _distractors

    documents = {f"d{i}": f"document number {i}" for i in range(30)}
    example = stage1_examples(documents, [QAExample("q", "about d3?", ["x"], ["d3"])], neighbours=[["d7", "d8"]])[-1]
    write_documents(tmp_path / "documents.arrow", documents)
    table, texts = DocumentTable(tmp_path / "documents.arrow"), list(documents.values())
    a, b = random.Random(4), random.Random(4)
    for _ in range(20):
        assert [table[i] for i in _distractors(example, len(table), 4, 0.5, a)] == [
            texts[i] for i in _distractors(example, len(texts), 4, 0.5, b)]


@pytest.mark.parametrize("steps,batch_size,world,per_block", [(60, 4, 2, 25), (7, 3, 3, 2), (5, 2, 1, 25)])
def test_plan_blocks_hold_one_ranks_steps_in_order_and_cover_every_draw_once(steps, batch_size, world, per_block):
    from clara_ray.training.data import block_positions

    blocks = block_positions(steps, batch_size, world, per_block)
    assert sorted(np.concatenate(blocks).tolist()) == list(range(steps * batch_size * world))
    for i, block in enumerate(blocks):
        plan = draws(block, 1000, batch_size, world, 0)
        assert set(plan["rank"].tolist()) == {i % world}  # dealt in turn, block i goes to rank i % world
        assert plan["step"].tolist() == sorted(plan["step"].tolist())
        assert np.all(np.bincount(plan["step"])[plan["step"]] == batch_size)  # whole micro-batches


def test_what_the_trainers_controller_unpickles_needs_no_model_code():
    """Ray Train's controller unpickles a stage's loop config (settings, the index
    actors' handles) and draw plan, and Ray Data's tasks the plan's function: importing
    their modules must not pull in torch, transformers, peft or deepspeed (~10 s a
    process on 2 cores, paid again by every stage)."""
    import subprocess
    import sys

    heavy = ("torch", "transformers", "peft", "deepspeed")
    modules = "clara_ray.training.data, clara_ray.training.settings, clara_ray.index.actor"
    probe = f"import sys, {modules}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
