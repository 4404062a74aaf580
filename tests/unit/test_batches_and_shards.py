import random

import numpy as np
import pytest
import torch

from clara_ray.data.formats import QAExample
from clara_ray.index.shard import IndexShard
from clara_ray.memory_shards import memory_table, read_memory_shards, write_manifest
from clara_ray.config import ReconstructionOrder
from clara_ray.training.batches import reconstruction_target, stage1_batch, stage1_examples
from clara_ray.training.settings import Lengths
from clara_ray.training.examples import Stage1Example
from tests.tiny_model import TEXTS, make_model


def test_stage1_examples_cover_every_document_and_gold_qa():
    documents = {"a": "doc a", "b": "doc b"}
    qa = [QAExample("q1", "about a?", ["x"], ["a"]), QAExample("q2", "no gold?", ["y"], ["zz"])]
    examples = stage1_examples(documents, qa)
    assert [e.document for e in examples] == [0, 1, 0]  # rows of the documents, in their order
    assert examples[2].question == "about a?" and examples[2].answer == "x"


def test_stage1_batch_places_gold_document_among_context():
    _, tokenizer = make_model()
    examples = [Stage1Example(0), Stage1Example(3, "Which job?", "baker")]
    batch = stage1_batch(examples, TEXTS, num_context_docs=3, num_memory_tokens=2, tokenizer=tokenizer,
                         lengths=Lengths(doc=64, question=16, answer=6, reconstruction=30), rng=random.Random(0))
    # 1 document for the reconstruction, 3 for the QA example.
    assert batch["doc_ids"].shape[0] == 4
    assert batch["doc_group"].tolist() == [0, 1, 1, 1]
    assert batch["doc_slot"].tolist() == [0, 0, 1, 2]
    assert batch["memory_mask"].tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    gold_rows = [i for i in range(1, 4) if tokenizer.decode(batch["doc_ids"][i], skip_special_tokens=True).strip() == TEXTS[3]]
    assert gold_rows, "the gold document must be one of the QA example's context documents"


def _shards(tmp_path, count=50, n_mem=2, hidden=8, files=2, seed=0):
    rng = np.random.default_rng(seed)
    memory = rng.normal(size=(count, n_mem, hidden)).astype(np.float32)
    ids = [f"d{i}" for i in range(count)]
    import pyarrow.parquet as pq

    for part, rows in enumerate(np.array_split(np.arange(count), files)):
        table = memory_table([ids[i] for i in rows], memory[rows], num_tokens=[5] * len(rows),
                             truncated=[i % 10 == 0 for i in rows])
        pq.write_table(table, tmp_path / f"part-{part}.parquet")
    write_manifest(tmp_path, model_fingerprint="abc", num_memory_tokens=n_mem, hidden_size=hidden,
                   memory_dtype="float16", key_kind="flat_memory", key_dim=n_mem * hidden,
                   num_input_documents=count, num_quarantined=0, quarantine_file="quarantine.jsonl")
    return ids, memory


def test_memory_shards_round_trip(tmp_path):
    ids, memory = _shards(tmp_path)
    shards = read_memory_shards(tmp_path)
    assert shards.doc_ids == ids
    assert shards.manifest["num_encoded"] == 50 and shards.manifest["num_truncated"] == 5
    assert [s["rows"] for s in shards.manifest["shards"]] == [25, 25]
    assert np.allclose(shards.memory, memory.astype(np.float16))
    assert np.allclose(np.linalg.norm(shards.keys, axis=1), 1.0, atol=1e-5)


def test_index_shard_own_key_ranks_first_and_returns_memory(tmp_path):
    ids, _ = _shards(tmp_path)
    shards = read_memory_shards(tmp_path)
    index = IndexShard.build(shards.doc_ids, shards.memory, "Flat", keys=shards.keys)
    found = index.search(shards.keys * 3.0, num_candidates=4)  # scale must not matter
    assert list(found.doc_ids[:, 0]) == ids
    assert np.allclose(found.scores[:, 0], 1.0, atol=1e-4)
    assert found.memory.shape == (50, 4, 2, 8)
    assert np.array_equal(found.memory[:, 0], shards.memory)
    with pytest.raises(ValueError, match="num_candidates"):
        index.search(shards.keys[:1], num_candidates=51)


def test_reversed_reconstruction_and_counterfactual_answers():
    from clara_ray.config import ReconstructionOrder
    from clara_ray.training.batches import counterfactual, reconstruction_target

    assert reconstruction_target("Ann grew up in Marlow.", ReconstructionOrder.REVERSED) == " Marlow. in up grew Ann"
    assert reconstruction_target("Ann grew up in Marlow.", ReconstructionOrder.FORWARD) == " Ann grew up in Marlow."
    document, answer = counterfactual("Ann grew up in Marlow.", "Marlow", ["Tessin"], random.Random(0))
    assert (document, answer) == ("Ann grew up in Tessin.", "Tessin")
    # An answer the document does not contain verbatim leaves the example as it is.
    assert counterfactual("Ann is a baker.", "Marlow", ["Tessin"], random.Random(0)) == ("Ann is a baker.", "Marlow")
    # Only whole words are answers: the "harp" in "sharp" is neither swapped nor a clash.
    assert counterfactual("Ann has a sharp wit and plays the lute.", "lute", ["harp"], random.Random(0)) == (
        "Ann has a sharp wit and plays the harp.", "harp")
    assert counterfactual("Ann plays the flute.", "lute", ["harp"], random.Random(0)) == ("Ann plays the flute.", "lute")


def test_hard_distractors_come_from_neighbours_without_gold():
    from clara_ray.training.batches import _distractors

    documents = {f"d{i}": f"doc {i}" for i in range(20)}
    qa = [QAExample("q1", "about d3?", ["x"], ["d3"])]
    # The gold document is among the lexical neighbours; it must not become a distractor.
    examples = stage1_examples(documents, qa, neighbours=[["d3", "d7", "d8", "d9"]])
    assert examples[-1].neighbours == (7, 8, 9)
    rng = random.Random(0)
    for _ in range(50):
        chosen = _distractors(examples[-1], len(documents), 4, 0.75, rng)
        assert len(chosen) == len(set(chosen)) == 4
        assert 3 not in chosen
        assert sum(c in examples[-1].neighbours for c in chosen) >= 3
    # hard_fraction 0: random distractors only, still never the gold document.
    for _ in range(50):
        assert 3 not in _distractors(examples[-1], len(documents), 4, 0.0, rng)
    with pytest.raises(ValueError, match="more than 4 documents"):
        _distractors(examples[-1], 2, 4, 0.0, rng)


def test_qa_context_size_varies_between_min_and_top_k():
    _, tokenizer = make_model()
    examples = [Stage1Example(3, "Which job?", "baker")] * 40
    batch = stage1_batch(examples, TEXTS, num_context_docs=3, num_memory_tokens=2, tokenizer=tokenizer,
                         lengths=Lengths(doc=64, question=16, answer=6, reconstruction=30), rng=random.Random(0),
                         min_context_docs=1)
    sizes = batch["memory_mask"].sum(1) // 2
    assert set(sizes.tolist()) == {1, 2, 3}
    assert batch["doc_ids"].shape[0] == int(sizes.sum())
    with pytest.raises(ValueError, match="min_context_docs"):
        stage1_batch(examples, TEXTS, 3, 2, tokenizer, Lengths(64, 16, 6, 30), random.Random(0), min_context_docs=4)


def test_a_question_given_as_memory_is_its_examples_last_memory_and_leaves_the_prompt():
    _, tokenizer = make_model()
    examples = [Stage1Example(0), Stage1Example(3, "Which job does Radjor Galdun do?", "baker")] * 20
    lengths = Lengths(doc=64, question=64, answer=6, reconstruction=30)
    batch = stage1_batch(examples, TEXTS, 3, 2, tokenizer, lengths, random.Random(0), min_context_docs=1,
                         question_memory_rate=0.5)
    texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in batch["doc_ids"]]
    prompts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in batch["prompt_ids"]]
    last = {int(g): i for i, g in enumerate(batch["doc_group"])}  # each example's last document row
    in_memory = [j for j in range(1, len(examples), 2) if texts[last[j]] == examples[j].question]
    assert 0 < len(in_memory) < 20  # about half of the QA examples
    for j in range(1, len(examples), 2):
        asked = examples[j].question in prompts[j]
        assert asked != (j in in_memory)  # the question is in memory or in the prompt, never both
        assert batch["memory_mask"][j].sum() // 2 == (batch["doc_group"] == j).sum()
    assert all(texts[last[j]] == TEXTS[0] for j in range(0, len(examples), 2))  # reconstructions unchanged


def test_counterfactual_answers_from_rivals_are_values_of_the_asked_kind():
    """counterfactual_of_kind=1: Radjor's job question (gold 3, 'baker') whose rivals answer
    'weaver' is trained to answer 'weaver' from a document that says so; with the whole pool
    a city may come instead, and at 0.5 both. An example without rival answers still draws
    from the pool."""
    _, tokenizer = make_model()
    lengths = Lengths(doc=64, question=64, answer=6, reconstruction=30)
    pool = ["Marlow", "Ostrel", "baker", "weaver"]

    def read(examples, kind):
        batch = stage1_batch(examples, TEXTS[:4], 1, 2, tokenizer, lengths, random.Random(0), counterfactual_rate=1.0,
                             answer_pool=pool, counterfactual_of_kind=kind)
        docs = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in batch["doc_ids"]]
        return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in batch["target_ids"]], docs

    of_kind = [Stage1Example(3, "Which job does Radjor Galdun do?", "baker", rival_answers=("weaver",))] * 30
    targets, docs = read(of_kind, 1.0)
    assert set(targets) == {"weaver"} and all(d.startswith("Radjor Galdun works as a weaver") for d in docs)

    def weavers(share):  # of 120 examples; from the whole pool 'weaver' is one of 3 answers
        targets = read(of_kind * 4, share)[0]
        assert {"Marlow", "Ostrel"} & set(targets)
        return targets.count("weaver") / len(targets)

    assert weavers(0.0) < 0.5 < weavers(0.5) < 0.9  # expected 1/3 and 1/2 + 1/6
    without = [Stage1Example(3, "Which job does Radjor Galdun do?", "baker")] * 30
    assert {"Marlow", "Ostrel"} & set(read(without, 1.0)[0])


def test_an_unanswerable_example_reads_a_rival_in_place_of_its_gold_document():
    """Document 0 states 'Marlow' about Zorvan; asked about Radjor (gold 3), with document
    0 as its rival: the example reads document 0, its stated value swapped for another
    answer, never the gold document, and its target is UNANSWERABLE."""
    from clara_ray.modeling.text import UNANSWERABLE

    _, tokenizer = make_model()
    examples = [Stage1Example(3, "Which job does Radjor Galdun do?", "baker", rivals=(0,))] * 40
    lengths = Lengths(doc=64, question=64, answer=6, reconstruction=30)
    batch = stage1_batch(examples, TEXTS[:4], 1, 2, tokenizer, lengths, random.Random(0), counterfactual_rate=1.0,
                         answer_pool=["Marlow", "Ostrel", "baker"], hard_fraction=1.0, unanswerable_rate=0.5,
                         rivals_as_distractors=False)
    texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in batch["doc_ids"]]
    targets = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in batch["target_ids"]]
    unanswerable = [j for j, target in enumerate(targets) if target == UNANSWERABLE]
    assert 0 < len(unanswerable) < 40  # about half
    for j in range(len(examples)):
        (read,) = [texts[i] for i in range(len(texts)) if batch["doc_group"][i] == j]  # one document each
        if j in unanswerable:  # the rival, its stated value swapped too, in place of the gold document
            assert read.startswith("Zorvan Kellit grew up in") and "Marlow" not in read
        else:
            assert read.startswith("Radjor Galdun works as a") and targets[j] != UNANSWERABLE


def test_an_unanswerable_example_from_neighbours_reads_one_that_does_not_contain_its_answer():
    """unanswerable_from=neighbours: asked about Radjor (gold 3, 'baker') with neighbours 0
    (Zorvan, no 'baker') and 4 (names Radjor and 'baker'): an unanswerable example reads
    document 0, never 4 (it holds the answer) nor the gold one; an example whose only
    neighbour holds its answer always stays answerable."""
    from clara_ray.config import UnanswerableFrom
    from clara_ray.modeling.text import UNANSWERABLE

    _, tokenizer = make_model()
    texts = TEXTS[:4] + ["Radjor Galdun once met a baker."]
    lengths = Lengths(doc=64, question=64, answer=6, reconstruction=30)

    def read_and_targets(neighbours):
        examples = [Stage1Example(3, "Which job does Radjor Galdun do?", "baker", neighbours=neighbours)] * 40
        batch = stage1_batch(examples, texts, 1, 2, tokenizer, lengths, random.Random(0), answer_pool=["baker"],
                             hard_fraction=1.0, unanswerable_rate=0.5,
                             unanswerable_from=UnanswerableFrom.NEIGHBOURS)
        read = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in batch["doc_ids"]]
        targets = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in batch["target_ids"]]
        return read, targets  # one document per example (num_context_docs 1)

    read, targets = read_and_targets((0, 4))
    unanswerable = [j for j, target in enumerate(targets) if target == UNANSWERABLE]
    assert 0 < len(unanswerable) < 40  # about half
    for j, text in enumerate(read):
        if j in unanswerable:
            assert text.startswith("Zorvan Kellit grew up in")
        else:
            assert text.startswith("Radjor Galdun works as a") and targets[j] != UNANSWERABLE
    read, targets = read_and_targets((4,))
    assert UNANSWERABLE not in targets and all(text.startswith("Radjor Galdun works as a") for text in read)


def test_an_unanswerable_example_from_both_pools_reads_a_rival_or_a_neighbour_without_its_answer():
    """unanswerable_from=both, asked about Radjor (gold 3, 'baker') with rival 2 (Quipel's
    cello) and neighbours 0 (Zorvan, no 'baker') and 4 (names 'baker'): unanswerable
    examples read the rival and the neighbour 0, both, and never document 4 or the gold one."""
    from clara_ray.config import UnanswerableFrom
    from clara_ray.modeling.text import UNANSWERABLE

    _, tokenizer = make_model()
    texts = TEXTS[:4] + ["Radjor Galdun once met a baker."]
    examples = [Stage1Example(3, "Which job does Radjor Galdun do?", "baker", neighbours=(0, 4), rivals=(2,))] * 60
    batch = stage1_batch(examples, texts, 1, 2, tokenizer, Lengths(doc=64, question=64, answer=6, reconstruction=30),
                         random.Random(0), answer_pool=["baker"], hard_fraction=1.0, unanswerable_rate=0.5,
                         unanswerable_from=UnanswerableFrom.BOTH, rivals_as_distractors=False)
    read = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in batch["doc_ids"]]
    targets = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in batch["target_ids"]]
    stand_ins = {read[j][:6] for j, target in enumerate(targets) if target == UNANSWERABLE}
    assert stand_ins == {"Quipel", "Zorvan"}
    assert all(read[j].startswith("Radjor Galdun works as a") for j, t in enumerate(targets) if t != UNANSWERABLE)


def test_qa_reads_its_gold_document_alone_first_then_among_rivals_then_among_neighbours():
    """stage1.single_document_fraction 0.2, rival_steps_fraction 0.3 of 10 steps: steps 1-2
    read one document per QA example, steps 3-5 draw their distractor from the neighbour
    and the rival, later steps from the neighbour only."""
    from clara_ray.config import load_config
    from clara_ray.training.batches import memory_qa_batch
    from clara_ray.training.settings import Stage1Settings

    _, tokenizer = make_model()
    settings = Stage1Settings.from_config(load_config(None, [
        "stage1.steps=10", "stage1.single_document_fraction=0.2", "stage1.rival_steps_fraction=0.3",
        "stage1.min_context_docs=2", "stage1.max_context_docs=2", "stage1.hard_distractor_fraction=1.0"]))
    assert (settings.single_document_steps, settings.rival_steps) == (2, 3)
    examples = [Stage1Example(3, "Which job does Radjor Galdun do?", "baker", neighbours=(1,), rivals=(0,))] * 8
    lengths = Lengths(doc=64, question=64, answer=6, reconstruction=30)

    def read(step):
        batch = memory_qa_batch(examples, TEXTS[:4], settings, step, lengths, tokenizer, 2, random.Random(step), [])
        texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in batch["doc_ids"]]
        return {t for t in texts if not t.startswith("Radjor")}, len(texts)

    assert read(1) == (set(), 8) and read(2) == (set(), 8)  # the gold document alone
    rivals_phase = [read(step) for step in (3, 4, 5)]
    assert all(n == 16 for _, n in rivals_phase)  # two documents each, drawn from the neighbour and the rival
    assert set().union(*(texts for texts, _ in rivals_phase)) == {TEXTS[0], TEXTS[1]}
    for step in (6, 10):
        assert read(step) == ({TEXTS[1]}, 16)  # the neighbour only


def test_salient_reconstruction_weighs_the_words_few_documents_hold_more():
    """idf weighting: a reconstruction's name and value tokens outweigh the words most
    documents share; each target's weights average 1; QA targets and padding keep 1 and 0."""
    from clara_ray.training.batches import word_weights

    corpus = [f"{name} was born in {city}. Rain fell steadily that spring." for name, city in
              [("Zorvan Kellit", "Marlow"), ("Quipel Silhir", "Ostrel"), ("Radjor Galdun", "Tessin"),
               ("Fenmar Dunbri", "Ravelle")]]
    weights = word_weights(corpus)
    assert weights["zorvan"] == weights["marlow"] > weights["rain"] == weights["born"] == 0.0
    _, tokenizer = make_model()
    examples = [Stage1Example(0), Stage1Example(1, "Where was Quipel Silhir born?", "Ostrel")]
    lengths = Lengths(doc=64, question=32, answer=6, reconstruction=40)
    batch = stage1_batch(examples, corpus, 1, 2, tokenizer, lengths, random.Random(0),
                         reconstruction_word_weights=weights)
    weight, mask = batch["target_weight"], batch["target_mask"]
    assert torch.equal(weight[1], mask[1].float())  # the QA example
    real = weight[0][mask[0] == 1]
    assert abs(real.mean().item() - 1) < 1e-5 and (weight[0][mask[0] == 0] == 0).all()
    text = reconstruction_target(corpus[0], ReconstructionOrder.FORWARD)
    offsets = tokenizer([text], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"][0]
    of_word = lambda word: [real[i].item() for i, (a, b) in enumerate(offsets) if a < text.index(word) + len(word)
                            and text.index(word) < b and text[a:b].strip()]
    assert min(of_word("Marlow")) > 2 * max(of_word("Rain")) and min(of_word("Kellit")) > 2 * max(of_word("spring"))
    assert "target_weight" not in stage1_batch(examples, corpus, 1, 2, tokenizer, lengths, random.Random(0))
