"""Local-Ray fixtures: one Ray instance for the whole session (starting one takes seconds)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def local_ray():
    import ray

    from clara_ray.cli import start_ray

    start_ray(address="local")  # never a head the user started on this machine
    yield ray
    ray.shutdown()
