"""Counterfactual worlds for stage 3 (clara_ray/training/worlds.py)."""

from clara_ray.training.worlds import CounterfactualWorlds, World


def test_a_world_swaps_whole_values_everywhere_the_same_way():
    world = World({"Oslo": "Lima", "New York": "Rome", "York": "Kyiv", "Lima": "Oslo"})
    assert world.text("Ann grew up in Oslo; Bo in New York, Cy in York.") == \
        "Ann grew up in Lima; Bo in Rome, Cy in Kyiv."
    assert world.text("Oslofjord and Yorkshire stay") == "Oslofjord and Yorkshire stay"  # whole words only
    assert world.text("Lima and Oslo") == "Oslo and Lima"  # one pass: a swapped value is not swapped again
    assert world.texts(["Oslo", "no value"]) == ["Lima", "no value"]


def test_worlds_are_a_permutation_drawn_per_step_and_rank_reproducibly():
    pool = ["Oslo", "Lima", "Rome", "Kyiv", "cello", "baker", "Oslo", " ", ""]
    worlds = CounterfactualWorlds(pool, rate=1.0, seed=3, rank=0)
    world = worlds.draw(7)
    assert sorted(world.mapping) == sorted(world.mapping.values()) == ["Kyiv", "Lima", "Oslo", "Rome", "baker", "cello"]
    assert CounterfactualWorlds(pool, 1.0, 3, 0).draw(7).mapping == world.mapping  # a resumed run draws the same
    drawn = {tuple(sorted(worlds.draw(step).mapping.items())) for step in range(1, 30)}
    assert len(drawn) > 20  # a new world most steps
    assert CounterfactualWorlds(pool, 1.0, 3, 1).draw(7).mapping != world.mapping  # ranks differ


def test_the_rate_is_the_share_of_steps_in_a_counterfactual_world():
    assert all(CounterfactualWorlds(["a", "b"], 0.0, 0).draw(step) is None for step in range(1, 50))
    share = sum(CounterfactualWorlds(["a", "b"], 0.3, 0).draw(step) is not None for step in range(1, 2001)) / 2000
    assert 0.25 < share < 0.35
    assert CounterfactualWorlds(["only"], 1.0, 0).draw(1) is None  # nothing to swap with


def test_no_world_before_the_start_step():
    worlds = CounterfactualWorlds(["a", "b"], 1.0, 0, start_step=10)
    assert all(worlds.draw(step) is None for step in range(1, 11))
    assert all(worlds.draw(step) is not None for step in range(11, 20))
