"""Counterfactual worlds for stage 3 (clara_ray/training/worlds.py)."""

import pytest

from clara_ray.data.trap import generate_trap_corpus
from clara_ray.config import WorldSwap
from clara_ray.training.worlds import CounterfactualWorlds, World, answer_kinds, question_subjects


def test_a_world_swaps_whole_values_everywhere_the_same_way():
    world = World({"Oslo": "Lima", "New York": "Rome", "York": "Kyiv", "Lima": "Oslo"})
    assert world.text("Ann grew up in Oslo; Bo in New York, Cy in York.") == \
        "Ann grew up in Lima; Bo in Rome, Cy in Kyiv."
    assert world.text("Oslofjord and Yorkshire stay") == "Oslofjord and Yorkshire stay"  # whole words only
    assert world.text("Lima and Oslo") == "Oslo and Lima"  # one pass: a swapped value is not swapped again
    assert world.texts(["Oslo", "no value"]) == ["Lima", "no value"]


def _asked(people):
    """Two wordings per relation, a name of its own per person."""
    questions, answers = [], []
    for name, city, job in people:
        questions += [f"Which city was {name} born in?", f"Where did {name} grow up?",
                      f"What does {name} do for a living?", f"Which job does {name} have?"]
        answers += [city, city, job, job]
    return questions, answers


def test_answers_are_grouped_by_the_wordings_of_their_questions_not_by_names():
    people = [("Ann Berg", "Oslo", "baker"), ("Bo Lund", "Lima", "smith"), ("Cy Dahl", "Oslo", "nurse"),
              ("Di Holm", "Rome", "baker"), ("Ed Falk", "Kyiv", "judge"), ("Fa Gren", "Lima", "nurse"),
              ("Gu Hed", "Rome", "smith"), ("Hy Ivar", "Oslo", "judge")]
    # Each name is in 4 of the 32 questions (under min_share), each wording in 8.
    assert answer_kinds(*_asked(people), min_share=0.2) == [
        ["Kyiv", "Lima", "Oslo", "Rome"], ["baker", "judge", "nurse", "smith"]]
    # A question whose wording nobody else uses leaves its answer alone.
    questions, answers = _asked(people)
    assert ["unique"] in answer_kinds(questions + ["Zzz qqq?"], answers + ["unique"], min_share=0.2)


@pytest.mark.parametrize("family", ["bundled", "wide", "near_miss"])
def test_the_trap_corpora_have_one_kind_per_relation(family):
    """At the demo's 160 people; a few values only people with a common name syllable
    hold stay alone (their wordings include the syllable)."""
    corpus = generate_trap_corpus(160, 0.5, 0, family)
    kinds = answer_kinds([q.question for q in corpus.train_qa], [q.answers[0] for q in corpus.train_qa])
    relations = {"bundled": 3, "wide": 5, "near_miss": 2}[family]
    kinds_of_relation = [kind for kind in kinds if len(kind) > 1]
    assert len(kinds_of_relation) == relations and all(len(kind) >= 20 for kind in kinds_of_relation)
    assert sum(map(len, kinds)) == len({q.answers[0] for q in corpus.train_qa})


def test_worlds_permute_within_kinds_per_step_and_rank_reproducibly():
    kinds = [["Kyiv", "Lima", "Oslo", "Rome"], ["baker", "nurse", "smith"], ["alone"]]
    worlds = CounterfactualWorlds(kinds, rate=1.0, seed=3, rank=0)
    world = worlds.draw(7)
    for kind in kinds:
        assert sorted(world.mapping.get(v, v) for v in kind) == kind
    assert "alone" not in world.mapping
    assert CounterfactualWorlds(kinds, 1.0, 3, 0).draw(7).mapping == world.mapping  # a resumed run draws the same
    assert len({tuple(sorted(worlds.draw(step).mapping.items())) for step in range(1, 30)}) > 20
    assert CounterfactualWorlds(kinds, 1.0, 3, 1).draw(7).mapping != world.mapping  # ranks differ


def test_the_rate_is_the_share_of_steps_in_a_counterfactual_world():
    assert all(CounterfactualWorlds([["a", "b"]], 0.0, 0).draw(step) is None for step in range(1, 50))
    share = sum(CounterfactualWorlds([["a", "b"]], 0.3, 0).draw(step) is not None for step in range(1, 2001)) / 2000
    assert 0.25 < share < 0.35
    assert CounterfactualWorlds([["only"], ["alone"]], 1.0, 0).draw(1) is None  # nothing to swap with


def test_no_world_before_the_start_step():
    worlds = CounterfactualWorlds([["a", "b"]], 1.0, 0, start_step=10)
    assert all(worlds.draw(step) is None for step in range(1, 11))
    assert all(worlds.draw(step) is not None for step in range(11, 20))


def test_fixed_worlds_are_shared_by_ranks_and_drawn_again():
    kinds = [["Kyiv", "Lima", "Oslo", "Rome"], ["baker", "nurse", "smith"]]
    ranks = [CounterfactualWorlds(kinds, 1.0, seed=5, rank=r, num_worlds=3) for r in (0, 1)]
    assert [w.mapping for w in ranks[0].fixed] == [w.mapping for w in ranks[1].fixed]
    drawn = [ranks[0].draw(step) for step in range(1, 40)]
    assert {id(w) for w in drawn} == {id(w) for w in ranks[0].fixed}  # the same objects, with their memory


def test_the_subject_of_a_question_is_its_run_of_capitalised_words():
    questions = ["Which city was Ann Berg born in?", "What does Ann Berg do?", "Which city was Bo born in?",
                 "Which city was Cy Dahl born in?", "Did Ann meet Bo?", "which city was born in?",
                 "Eve Falk was born where?"]
    # "Which" opens many questions; "Eve" opens one (rare): a name at the start counts.
    assert question_subjects(questions, min_share=0.2) == ["Ann Berg", "Bo", "Cy Dahl", "Eve Falk"]


def test_ordinary_words_and_single_letters_are_no_subjects():
    # Real questions (CLaRa's pretrain sample gave "The", "A", "I", "May" as subjects): a world
    # would swap such a word in every document that has it.
    questions = ["What did Ann Berg play in The film?", "Which of the films was in May?", "When is the may fair?",
                 "What is vitamin C for?", "Who wrote The Long Road?", "Where did Bo go?"]
    assert question_subjects(questions, min_share=0.1) == ["Ann Berg", "Bo", "The Long Road"]


@pytest.mark.parametrize("family", ["bundled", "wide", "near_miss"])
def test_name_worlds_permute_the_training_people_everywhere_and_leave_the_others(family):
    corpus = generate_trap_corpus(160, 0.5, 0, family)
    questions = [q.question for q in corpus.train_qa]
    subjects = question_subjects(questions)
    assert len(subjects) == 80 and all(len(s.split()) == 2 for s in subjects)  # the 80 training people
    worlds = CounterfactualWorlds.of_questions(questions, [q.answers[0] for q in corpus.train_qa], 1.0, seed=0,
                                               num_worlds=4, swap=WorldSwap.NAMES)
    world = worlds.draw(1)
    assert sorted(world.mapping) == subjects and sorted(world.mapping.values()) == subjects
    assert sum(a != b for a, b in world.mapping.items()) > 70
    documents = {d.id: d.text for d in corpus.documents}
    for qa in corpus.train_qa[:20]:
        subject = next(s for s in subjects if s in qa.question)
        renamed = world.mapping[subject]
        assert world.text(qa.question) == qa.question.replace(subject, renamed)
        assert world.text(documents[qa.gold_doc_ids[0]]) == documents[qa.gold_doc_ids[0]].replace(subject, renamed)
    for qa in corpus.test_qa:  # people no training question asks about keep their documents
        assert world.text(documents[qa.gold_doc_ids[0]]) == documents[qa.gold_doc_ids[0]]


def test_worlds_train_after_the_real_schedule_which_runs_as_without_them():
    from clara_ray.config import load_config
    from clara_ray.training.engine import learning_rate_ratio
    from clara_ray.training.settings import Stage3Settings

    real = Stage3Settings.from_config(load_config(None, ["stage3.steps=400", "stage3.counterfactual_rate=0"]))
    worlds = Stage3Settings.from_config(load_config(None, [
        "stage3.steps=400", "stage3.counterfactual_rate=1.0", "stage3.counterfactual_swap=names",
        "stage3.world_steps_fraction=0.5", "stage3.counterfactual_learning_rate_ratio=0.5"]))
    assert (real.steps, real.schedule_steps) == (400, 400) and (worlds.steps, worlds.schedule_steps) == (600, 400)
    for attribute in ("hold_gains_steps", "anchor_start_step", "distillation_start_step"):
        assert getattr(worlds, attribute) == getattr(real, attribute)
    assert [worlds.temperature_at(s) for s in range(1, 401)] == [real.temperature_at(s) for s in range(1, 401)]
    assert [learning_rate_ratio(u, worlds.optimiser) for u in range(1, 401)] == \
        [learning_rate_ratio(u, real.optimiser) for u in range(1, 401)]
    # After it: the last temperature, a second cosine from half the rate down to the floor.
    assert {worlds.temperature_at(s) for s in range(400, 601)} == {real.temperature}
    after = [learning_rate_ratio(u, worlds.optimiser) for u in range(401, 601)]
    assert 0.49 < after[0] <= 0.5 and after[-1] < 1e-3 and after == sorted(after, reverse=True)
    drawn = CounterfactualWorlds([["a", "b"]], worlds.counterfactual_rate, 0, start_step=worlds.schedule_steps)
    assert [drawn.draw(s) is not None for s in (1, 400, 401, 600)] == [False, False, True, True]
    assert real.steps == 400  # no world steps without a rate
