"""The Ray-free step functions and candidate sources, on the tiny test model."""

import dataclasses
import random

import numpy as np
import pytest
import torch

from clara_ray.config import load_config
from clara_ray.modeling.clara import Objective, Role, memory_separation
from clara_ray.modeling.text import tokenize_texts
from clara_ray.training.batches import stage1_batch, stage3_batch
from clara_ray.training.settings import Lengths
from clara_ray.training.examples import Stage1Example
from clara_ray.training.candidates import ExactSearch, FixedCandidates
from clara_ray.training.engine import ParameterAnchor, TorchUpdater
from clara_ray.training.batches import prepare_stage2_examples, stage1_batches
from clara_ray.training.settings import Stage1Settings, Stage2Settings, Stage3Settings
from clara_ray.training.steps import stage1_step, stage2_step, stage3_step
from clara_ray.training.examples import QuestionBatch
from tests.tiny_model import TEXTS, make_model

LENGTHS = Lengths(doc=16, question=16, answer=8, reconstruction=16)


def _memory(model, tokenizer, texts):
    tokens = tokenize_texts(tokenizer, texts, LENGTHS.doc)
    with torch.no_grad():
        return model.encode(Role.COMPRESSOR, tokens.ids, tokens.mask)[0].numpy()


def test_exact_search_ranks_by_cosine_of_flattened_memory():
    rng = np.random.default_rng(0)
    memory = rng.normal(size=(6, 2, 4)).astype(np.float16)
    source = ExactSearch([f"d{i}" for i in range(6)], memory)
    queries = memory[[4, 1]].reshape(2, -1).astype(np.float32) * 3  # scale does not matter to a cosine
    found = source.candidates(queries, 3)
    assert list(found.doc_ids[:, 0]) == ["d4", "d1"]
    assert found.memory.shape == (2, 3, 2, 4) and (np.diff(found.scores, axis=1) <= 0).all()
    keys = memory.reshape(6, -1).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    expected = np.sort(keys @ keys[4])[::-1][:3]
    assert np.allclose(found.scores[0], expected, atol=1e-5)
    with pytest.raises(ValueError, match="num_candidates"):
        source.candidates(queries, 7)


def test_fixed_candidates_keep_each_question_to_its_own_list():
    memory = np.eye(4, dtype=np.float16).reshape(4, 1, 4)
    source = FixedCandidates({"q1": ["d0", "d2", "d3"], "q2": ["d3", "d1", "d0"], "q3": ["d1"]},
                             ["d0", "d1", "d2", "d3"], memory)
    found = source.candidates(np.array([[0, 0, 0, 1.0], [0, 1.0, 0, 0]], np.float32), 3, ["q1", "q2"])
    assert found.doc_ids.tolist() == [["d3", "d0", "d2"], ["d1", "d3", "d0"]]  # its own list, by score
    assert source.candidates(np.zeros((1, 4), np.float32), 2, ["q1"]).doc_ids.tolist() == [["d0", "d2"]]  # the first L
    with pytest.raises(ValueError, match="fewer than 2"):
        source.candidates(np.zeros((1, 4), np.float32), 2, ["q3"])
    with pytest.raises(ValueError, match="not in the corpus"):
        FixedCandidates({"q": ["nope"]}, ["d0"], memory[:1])


def _changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def test_stage1_step_trains_compressor_and_generator_only():
    model, tokenizer = make_model()
    model.set_trainable([Role.COMPRESSOR, Role.GENERATOR], backbone=False)
    settings = dataclasses.replace(Stage1Settings.from_config(load_config(None, ["stage1.steps=10"])), rival_steps=0)
    updater = TorchUpdater(model, settings.optimiser)
    examples = [Stage1Example(0), Stage1Example(1, "Which city?", "Marlow", (2,))]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):  # the schedule's first two updates run at rate 0
        batch = stage1_batch(examples, TEXTS, 2, model.num_memory_tokens, tokenizer, LENGTHS, random.Random(0))
        metrics = stage1_step(updater, batch, settings)
    assert all(np.isfinite(v) for v in metrics.values())
    changed = _changed(model, before)
    roles = set(model.role_parameters(Role.COMPRESSOR)) | set(model.role_parameters(Role.GENERATOR))
    assert changed and changed <= roles


def test_stage1_loss_is_the_token_mean_and_each_kind_is_reported_apart():
    model, tokenizer = make_model()
    model.eval()
    qa, reconstruction = Stage1Example(1, "Which city?", "Marlow", (2,)), Stage1Example(0)

    def losses(examples):
        batch = stage1_batch(examples, TEXTS, 2, model.num_memory_tokens, tokenizer, LENGTHS, random.Random(0))
        with torch.no_grad():
            return model(Objective.COMPRESSOR_PRETRAINING, **batch, mse_weight=0.0), batch["target_mask"].sum()

    (alone_qa, qa_tokens), (alone_reconstruction, reconstruction_tokens) = losses([qa]), losses([reconstruction])
    mixed, _ = losses([qa, reconstruction])
    # Each kind's loss is its own examples' mean, whatever the other kind's tokens and padding ...
    torch.testing.assert_close(mixed["qa_loss"], alone_qa["generation_loss"])
    torch.testing.assert_close(mixed["reconstruction_loss"], alone_reconstruction["generation_loss"])
    # ... and the trained loss one mean over every target token, each kind weighing by its token count.
    expected = (qa_tokens * alone_qa["generation_loss"] + reconstruction_tokens * alone_reconstruction["generation_loss"]
                ) / (qa_tokens + reconstruction_tokens)
    torch.testing.assert_close(mixed["generation_loss"], expected)
    assert reconstruction_tokens > qa_tokens


def test_a_qa_loss_share_weighs_the_two_kinds_means_and_leaves_a_one_kind_batch_alone():
    model, tokenizer = make_model()
    model.eval()
    qa, reconstruction = Stage1Example(1, "Which city?", "Marlow", (2,)), Stage1Example(0)

    def losses(examples, share):
        batch = stage1_batch(examples, TEXTS, 2, model.num_memory_tokens, tokenizer, LENGTHS, random.Random(0))
        with torch.no_grad():
            return model(Objective.COMPRESSOR_PRETRAINING, **batch, mse_weight=0.0, qa_loss_share=share)

    mixed = losses([qa, reconstruction], 0.75)
    torch.testing.assert_close(mixed["generation_loss"], 0.75 * mixed["qa_loss"] + 0.25 * mixed["reconstruction_loss"])
    torch.testing.assert_close(mixed["loss"], mixed["generation_loss"])
    pooled = losses([qa, reconstruction], None)
    assert not torch.isclose(pooled["generation_loss"], mixed["generation_loss"])
    for alone in ([qa], [reconstruction]):
        torch.testing.assert_close(losses(alone, 0.75)["generation_loss"], losses(alone, None)["generation_loss"])


def test_stage1_token_weights_make_each_loss_a_weighted_mean():
    model, tokenizer = make_model()
    model.eval()
    batch = stage1_batch([Stage1Example(1, "Which city?", "Marlow", (2,)), Stage1Example(0)], TEXTS, 2,
                         model.num_memory_tokens, tokenizer, LENGTHS, random.Random(0))
    with torch.no_grad():
        plain = model(Objective.COMPRESSOR_PRETRAINING, **batch, mse_weight=0.0)
        ones = model(Objective.COMPRESSOR_PRETRAINING, **batch, mse_weight=0.0,
                     target_weight=batch["target_mask"].float())
        first = torch.zeros(batch["target_mask"].shape)
        first[1, 0] = 1.0  # only the reconstruction's first token counts there
        only = model(Objective.COMPRESSOR_PRETRAINING, **batch, mse_weight=0.0, target_weight=first + (
            batch["target_mask"] * batch["is_qa"][:, None]).float())
        logits, labels = model._target_logits(*_grouped_memory(model, batch), batch["prompt_ids"],
                                              batch["prompt_mask"], batch["target_ids"], batch["target_mask"],
                                              batch["memory_mask"])
    for key in ("generation_loss", "qa_loss", "reconstruction_loss"):
        torch.testing.assert_close(ones[key], plain[key])
    torch.testing.assert_close(only["qa_loss"], plain["qa_loss"])
    torch.testing.assert_close(only["reconstruction_loss"],
                               torch.nn.functional.cross_entropy(logits[1, :1], labels[1, :1]))


def test_memory_separation_is_the_log_mean_exp_over_pairs_of_different_documents():
    memory = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]], [[1.0, 0.0]]])  # (4, 1, 2)
    doc_ids = torch.tensor([[5, 6, 0], [7, 0, 0], [8, 9, 9], [5, 6, 0]])
    doc_mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])  # rows 0 and 3 are one document
    cos = 2 ** -0.5
    pairs = [0.0, cos, 0.0, cos, cos, cos]  # ordered pairs (0,1) (0,2) (1,0) (1,2) (2,0) (2,1) ...
    pairs += [0.0, cos, 0.0, cos]  # ... (1,3) (2,3) (3,1) (3,2): never (0,3) or (3,0)
    expected = torch.logsumexp(torch.tensor(pairs) / 0.5, 0) - np.log(len(pairs))
    torch.testing.assert_close(memory_separation(memory, doc_ids, doc_mask, 0.5), expected)
    assert memory_separation(memory[[0, 3]], doc_ids[[0, 3]], doc_mask[[0, 3]], 0.5).item() == 0.0


def test_separation_weight_pushes_the_memories_of_different_documents_apart():
    examples = [Stage1Example(i) for i in range(6)]  # reconstruction only: six different documents

    def separation_after(weight):
        torch.manual_seed(0)
        model, tokenizer = make_model()
        model.set_trainable([Role.COMPRESSOR, Role.GENERATOR], backbone=False)
        settings = dataclasses.replace(Stage1Settings.from_config(load_config(None, ["stage1.steps=20"])),
                                       rival_steps=0, separation_weight=weight)
        updater = TorchUpdater(model, settings.optimiser)
        for _ in range(12):
            batch = stage1_batch(examples, TEXTS, 1, model.num_memory_tokens, tokenizer, LENGTHS, random.Random(0))
            metrics = stage1_step(updater, batch, settings)
        with torch.no_grad():
            out = model(Objective.COMPRESSOR_PRETRAINING, **batch, mse_weight=0.0)
        assert np.isfinite(metrics["separation_loss"])
        return out["separation_loss"].item()

    assert separation_after(1.0) < separation_after(0.0) - 0.5  # 6.5 against 8.9


def test_word_dropout_blanks_only_reconstruction_inputs_and_the_labels_stay_whole():
    model, tokenizer = make_model()
    model.eval()
    examples = [Stage1Example(1, "Which city?", "Marlow", (2,)), Stage1Example(0), Stage1Example(3)]
    batch = stage1_batch(examples, TEXTS, 2, model.num_memory_tokens, tokenizer, LENGTHS, random.Random(0),
                         reconstruction_word_dropout=0.5)
    plain = stage1_batch(examples, TEXTS, 2, model.num_memory_tokens, tokenizer, LENGTHS, random.Random(0))
    torch.testing.assert_close(batch["target_ids"], plain["target_ids"])
    blanked = batch["target_input_ids"] != batch["target_ids"]
    assert not blanked[0].any()  # the QA answer is shown whole
    assert (batch["target_input_ids"][blanked] == tokenizer.pad_token_id).all()
    assert not (blanked & (batch["target_mask"] == 0)).any()
    share = blanked[1:].sum() / batch["target_mask"][1:].sum()
    assert 0.3 < share < 0.7
    with torch.no_grad():
        shown = model(Objective.COMPRESSOR_PRETRAINING, **plain, mse_weight=0.0, target_input_ids=plain["target_ids"])
        default = model(Objective.COMPRESSOR_PRETRAINING, **plain, mse_weight=0.0)
        dropped = model(Objective.COMPRESSOR_PRETRAINING, **batch, mse_weight=0.0)
    torch.testing.assert_close(shown["generation_loss"], default["generation_loss"])
    torch.testing.assert_close(dropped["qa_loss"], default["qa_loss"])  # the answer's inputs are untouched
    assert dropped["reconstruction_loss"] != default["reconstruction_loss"]


def _grouped_memory(model, batch):
    """The generator's memory input of a stage-1 batch, as the model groups it."""
    memory, _ = model.encode(Role.COMPRESSOR, batch["doc_ids"], batch["doc_mask"])
    width = batch["memory_mask"].shape[1] // model.num_memory_tokens
    grouped = memory.new_zeros(len(batch["is_qa"]), width, model.num_memory_tokens, memory.shape[-1])
    grouped = grouped.index_put((batch["doc_group"], batch["doc_slot"]), memory)
    return (grouped.flatten(1, 2),)


def test_stage3_step_trains_only_the_query_reasoner_from_any_candidate_source():
    model, tokenizer = make_model()
    model.set_trainable([Role.QUERY_REASONER], backbone=False)
    config = load_config(None, ["stage3.steps=10", "stage3.num_candidates=4", "stage3.retrieval_gain_start_fraction=0.9"])
    settings = Stage3Settings.from_config(config)
    updater = TorchUpdater(model, settings.optimiser)
    doc_ids = [f"d{i}" for i in range(len(TEXTS))]
    memory = _memory(model, tokenizer, TEXTS)
    batch = QuestionBatch(["q0", "q1"], ["Which city was Zorvan Kellit born in?", "What does Quipel Silhir own?"],
                          ["Marlow", "cello"], [("d0",), ("d2",)])
    sources = [ExactSearch(doc_ids, memory), FixedCandidates({"q0": doc_ids[:4], "q1": doc_ids[2:]}, doc_ids, memory)]
    anchor = ParameterAnchor(model, settings.anchor_weight, lower_weight=settings.lower_anchor_weight,
                             free_top_layers=settings.anchor_free_top_layers)
    gain = model.retrieval_gain[Role.QUERY_REASONER.value].weight
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(1, 5):
        metrics = stage3_step(updater, tokenizer, batch, sources[step % 2], settings, LENGTHS, step, anchor)
        assert np.isfinite(metrics["loss"]) and 0 <= metrics["train_recall_at_1"] <= 1
        assert {"seconds_query", "seconds_search", "seconds_forward", "seconds_backward"} <= set(metrics)
        assert metrics["lower_anchor_distance"] >= 0  # the default pull of the lower layers
    changed = _changed(model, before)
    assert changed and changed <= set(model.role_parameters(Role.QUERY_REASONER))
    assert torch.equal(gain, before["retrieval_gain.query_reasoner.weight"])  # held for 90% of the steps


def test_stage3_step_with_a_trainable_compressor_reencodes_candidates_with_gradient():
    model, tokenizer = make_model()
    model.set_trainable([Role.QUERY_REASONER, Role.COMPRESSOR], backbone=False)
    config = load_config(None, ["stage3.steps=10", "stage3.num_candidates=4", "stage3.compressor=trainable"])
    settings = Stage3Settings.from_config(config)
    assert settings.trainable_compressor
    updater = TorchUpdater(model, settings.optimiser)
    doc_ids = [f"d{i}" for i in range(len(TEXTS))]
    texts = dict(zip(doc_ids, TEXTS))
    asked = []

    def documents(ids):
        asked.append(list(ids))
        return [texts[i] for i in ids]

    # Stored memories that say nothing: only the re-encoded ones can give the loss a gradient to the compressor.
    source = ExactSearch(doc_ids, np.zeros_like(_memory(model, tokenizer, TEXTS)) + 1)
    batch = QuestionBatch(["q0", "q1"], ["Which city was Zorvan Kellit born in?", "What does Quipel Silhir own?"],
                          ["Marlow", "cello"], [("d0",), ("d2",)])
    anchor = ParameterAnchor(model, 0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(1, 4):
        metrics = stage3_step(updater, tokenizer, batch, source, settings, LENGTHS, step, anchor, documents)
        assert np.isfinite(metrics["loss"])
    # Each step compressed the batch's distinct candidates once: 2 questions x 4 candidates of 6 documents.
    assert metrics["candidates_encoded"] == len(asked[-1]) == len(set(asked[-1])) <= 6
    changed = _changed(model, before)
    compressor = set(model.role_parameters(Role.COMPRESSOR))
    assert changed & compressor and changed <= compressor | set(model.role_parameters(Role.QUERY_REASONER))
    with pytest.raises(ValueError, match="needs `documents`"):
        stage3_step(updater, tokenizer, batch, source, settings, LENGTHS, 4, anchor)


def test_the_fresh_candidate_memories_are_what_the_index_stores_before_training():
    model, tokenizer = make_model()
    tokens = tokenize_texts(tokenizer, TEXTS, LENGTHS.doc, pad_to_max_length=True)
    with torch.no_grad():
        stored = model.encode(Role.COMPRESSOR, tokens.ids, tokens.mask)[0]
        rows = torch.tensor([[3, 0, 5], [1, 1, 2]])
        fresh = model.encode(Role.COMPRESSOR, tokens.ids[[0, 1, 2, 3, 5]], tokens.mask[[0, 1, 2, 3, 5]])[0]
        gathered = fresh[torch.tensor([[3, 0, 4], [1, 1, 2]])]
    assert torch.allclose(gathered, stored[rows], atol=1e-5)


@pytest.mark.parametrize("train_compressor", [False, True])
def test_stage2_step_reads_k_given_documents_and_trains_what_is_configured(train_compressor):
    from types import SimpleNamespace

    model, tokenizer = make_model()
    roles = [Role.GENERATOR] + ([Role.COMPRESSOR] if train_compressor else [])
    model.set_trainable(roles, backbone=False)
    config = load_config(None, ["stage2.steps=4", "stage2.num_documents=3", "stage2.micro_batch_size_per_worker=2",
                                f"stage2.train_compressor={str(train_compressor).lower()}"])
    settings = Stage2Settings.from_config(config)
    documents = {f"d{i}": text for i, text in enumerate(TEXTS)}
    qa = [SimpleNamespace(question="Which city was Zorvan Kellit born in?", answers=["Marlow"], gold_doc_ids=["d0"]),
          SimpleNamespace(question="What does Quipel Silhir own?", answers=["cello"], gold_doc_ids=["d2"])]
    examples = prepare_stage2_examples(documents, qa, settings.num_documents)
    assert all(e.question is not None and len(e.neighbours) == 2 for e in examples)  # QA only, k - 1 retrieved
    updater = TorchUpdater(model, settings.optimiser)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step, batch in stage1_batches(examples, TEXTS, settings, LENGTHS, tokenizer, model.num_memory_tokens, 0,
                                      random.Random(0)):
        assert batch["memory_mask"].sum(1).tolist() == [3 * model.num_memory_tokens] * 2  # exactly k documents each
        metrics = stage2_step(updater, batch, settings)
        assert np.isfinite(metrics["loss"])
    changed = _changed(model, before)
    allowed = {n for role in roles for n in model.role_parameters(role)}
    assert changed and changed <= allowed
    assert any(n in changed for n in model.role_parameters(Role.COMPRESSOR)) == train_compressor


def test_stage3_step_in_a_counterfactual_world_reads_rewritten_candidates_and_answers():
    """Question, candidate texts and target rewritten alike; the frozen compressor
    encodes the rewritten candidates without gradient and only the query reasoner trains."""
    from clara_ray.training.worlds import CounterfactualWorlds

    model, tokenizer = make_model()
    model.set_trainable([Role.QUERY_REASONER], backbone=False)
    settings = Stage3Settings.from_config(load_config(None, [
        "stage3.steps=10", "stage3.num_candidates=4", "stage3.counterfactual_rate=1.0"]))
    assert settings.counterfactual_rate == 1.0 and not settings.trainable_compressor
    updater = TorchUpdater(model, settings.optimiser)
    doc_ids = [f"d{i}" for i in range(len(TEXTS))]
    texts = dict(zip(doc_ids, TEXTS))
    source = ExactSearch(doc_ids, _memory(model, tokenizer, TEXTS))
    batch = QuestionBatch(["q0", "q1"], ["Which city was Zorvan Kellit born in?", "What does Quipel Silhir own?"],
                          ["Marlow", "cello"], [("d0",), ("d2",)])
    worlds = CounterfactualWorlds([["Marlow", "cello", "baker"]], 1.0, seed=0)
    world = worlds.draw(1)
    assert world.mapping["Marlow"] != "Marlow"
    seen = {}
    forward = updater.forward

    def recording_forward(objective, **inputs):
        seen.update(inputs)
        return forward(objective, **inputs)

    updater.forward = recording_forward
    found = []
    search = source.candidates
    source.candidates = lambda *args: found.append(search(*args)) or found[-1]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = stage3_step(updater, tokenizer, batch, source, settings, LENGTHS, 1, ParameterAnchor(model, 0.0),
                          lambda ids: [texts[i] for i in ids], worlds)
    assert np.isfinite(metrics["loss"]) and metrics["counterfactual"] == 1.0
    # The target and the question are the rewritten ones.
    expected = stage3_batch(world.texts(batch.questions), world.texts(batch.answers), tokenizer, LENGTHS)
    assert torch.equal(seen["target_ids"], expected["target_ids"])
    assert torch.equal(seen["question_ids"], expected["question_ids"])
    # A candidate the world rewrites is read as the compressor's encoding of its new
    # text; one it leaves alone (no value in it) as stored.
    rewritten, stored = _memory(model, tokenizer, world.texts(TEXTS)), source.memory.astype(np.float32)
    memory, rows = seen["candidate_memory"].numpy(), [int(d[1:]) for d in found[0].doc_ids.ravel()]
    changed = [world.text(TEXTS[i]) != TEXTS[i] for i in rows]
    assert memory.shape[:2] == (2, 4) and any(changed) and not all(changed)
    assert metrics["candidates_encoded"] == len({i for i, c in zip(rows, changed) if c})
    for m, i, c in zip(memory.reshape(8, *memory.shape[2:]), rows, changed):
        assert np.abs(m - (rewritten[i] if c else stored[i])).max() <= (1e-5 if c else 0)
    assert all(np.abs(rewritten[i] - stored[i]).max() > 1e-3 for i in rows if world.text(TEXTS[i]) != TEXTS[i]
               and i != 4)  # document 4's Marlow is cut at 16 tokens
    for step in (2, 3):  # the schedule's first two updates run at rate 0
        stage3_step(updater, tokenizer, batch, source, settings, LENGTHS, step, ParameterAnchor(model, 0.0),
                    lambda ids: [texts[i] for i in ids], worlds)
    # One of a fixed set of worlds, drawn again with the same candidates, compresses nothing again.
    fixed = CounterfactualWorlds([["Marlow", "cello", "baker"]], 1.0, seed=4, num_worlds=1)
    assert fixed.fixed[0].mapping["Marlow"] == "baker"
    model.eval()  # no dropout: the same candidates both times
    first, again = (stage3_step(updater, tokenizer, batch, source, settings, LENGTHS, 1, ParameterAnchor(model, 0.0),
                                lambda ids: [texts[i] for i in ids], fixed) for _ in range(2))
    assert first["candidates_encoded"] > 0 and again["candidates_encoded"] == 0
    assert fixed.fixed[0].memory
    trained = _changed(model, before)
    assert trained and trained <= set(model.role_parameters(Role.QUERY_REASONER))
    with pytest.raises(ValueError, match="needs `documents`"):
        stage3_step(updater, tokenizer, batch, source, settings, LENGTHS, 4, ParameterAnchor(model, 0.0), None, worlds)


def _name_world_step_parts(num_candidates: int):
    """A stage-3 step's parts for one question about Zorvan Kellit in a name world:
    model, tokenizer, settings, updater, texts by id, exact search over TEXTS, batch."""
    model, tokenizer = make_model()
    model.set_trainable([Role.QUERY_REASONER], backbone=False)
    settings = Stage3Settings.from_config(load_config(None, [
        "stage3.steps=10", f"stage3.num_candidates={num_candidates}", "stage3.counterfactual_rate=1.0",
        "stage3.counterfactual_swap=names"]))
    updater = TorchUpdater(model, settings.optimiser)
    doc_ids = [f"d{i}" for i in range(len(TEXTS))]
    source = ExactSearch(doc_ids, _memory(model, tokenizer, TEXTS))
    batch = QuestionBatch(["q0"], ["Which city was Zorvan Kellit born in?"], ["Marlow"], [("d0",)])
    return model, tokenizer, settings, updater, dict(zip(doc_ids, TEXTS)), source, batch


def test_in_a_name_world_the_real_question_proposes_the_candidates_and_the_renamed_one_scores_them():
    """The index holds the real world: the renamed question would find the real documents
    of the person whose name it now carries, not those of the person it asks about."""
    from clara_ray.training.worlds import World

    model, tokenizer, settings, updater, texts, source, batch = _name_world_step_parts(4)
    world = World({"Zorvan Kellit": "Radjor Galdun", "Radjor Galdun": "Zorvan Kellit"})

    class OneWorld:
        def draw(self, step):
            return world

    queries, seen = [], {}
    search, forward = source.candidates, updater.forward
    source.candidates = lambda query, *args: queries.append(query) or search(query, *args)
    updater.forward = lambda objective, **inputs: seen.update(inputs) or forward(objective, **inputs)

    def encoded(questions):
        tokens = stage3_batch(questions, ["Marlow"], tokenizer, LENGTHS)
        with torch.no_grad():
            return model.encode(Role.QUERY_REASONER, tokens["question_ids"], tokens["question_mask"])[0]

    real, renamed = encoded(batch.questions), encoded(world.texts(batch.questions))  # before the step trains
    stage3_step(updater, tokenizer, batch, source, settings, LENGTHS, 1, ParameterAnchor(model, 0.0),
                lambda ids: [texts[i] for i in ids], OneWorld())
    assert np.allclose(queries[0], real.flatten(1).numpy(), atol=1e-6)
    assert not np.allclose(queries[0], renamed.flatten(1).numpy(), atol=1e-3)
    expected = stage3_batch(["Which city was Radjor Galdun born in?"], ["Marlow"], tokenizer, LENGTHS)
    assert torch.equal(seen["question_ids"], expected["question_ids"])


def test_a_world_compresses_again_only_the_candidates_that_hold_a_name_the_batch_puts_in_play():
    """Zorvan Kellit's question, renamed Radjor Galdun, must find the one document that
    now says Radjor Galdun: every document with either name is rewritten. Quipel Silhir's
    document, whose name the world swaps too, reads the same to this question either
    way; it is read as stored, not compressed again."""
    from clara_ray.training.worlds import World

    model, tokenizer, settings, updater, texts, source, batch = _name_world_step_parts(len(TEXTS))
    world = World({"Zorvan Kellit": "Radjor Galdun", "Radjor Galdun": "Zorvan Kellit",
                   "Quipel Silhir": "Ilsa Moor", "Ilsa Moor": "Quipel Silhir"})
    assert world.in_play([*batch.questions, *batch.answers]) == {"Zorvan Kellit", "Radjor Galdun"}

    class OneWorld:
        def draw(self, step):
            return world

    seen, found = {}, []
    search, forward = source.candidates, updater.forward
    source.candidates = lambda *args: found.append(search(*args)) or found[-1]
    updater.forward = lambda objective, **inputs: seen.update(inputs) or forward(objective, **inputs)
    metrics = stage3_step(updater, tokenizer, batch, source, settings, LENGTHS, 1, ParameterAnchor(model, 0.0),
                          lambda ids: [texts[i] for i in ids], OneWorld())
    assert metrics["candidates_encoded"] == 4  # documents 0, 1, 3 and 4; not 2 (Quipel Silhir) nor 5
    assert set(world.memory) == {"d0", "d1", "d3", "d4"}
    rows = [int(d[1:]) for d in found[0].doc_ids.ravel()]
    memory = seen["candidate_memory"].numpy()[0]
    rewritten, stored = _memory(model, tokenizer, world.texts(TEXTS)), source.memory.astype(np.float32)
    for m, i in zip(memory, rows):
        assert np.abs(m - (rewritten[i] if i in (0, 1, 3, 4) else stored[i])).max() <= (1e-5 if i in (0, 1, 3, 4) else 0)
