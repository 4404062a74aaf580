"""Session fixtures: one local Ray instance (starting one takes seconds) and one small
finished run that several modules read (a whole pipeline takes minutes on 2 cores)."""

from __future__ import annotations

import time

import pytest

# A smaller model, corpus and training than jobs/configs/tiny.yaml (which takes ~10 min):
# ~3.5 min on 2 busy cores. Stage 3 has only begun to take off by its last step: measured
# test Recall@1 0.117 (7 of 60 questions; chance is 1/360), train Recall@1 0.26.
SMALL_RUN = [
    "data.trap.num_entities=40", "model.tiny.hidden_size=128", "model.tiny.num_layers=2",
    "model.tiny.num_heads=4", "model.tiny.intermediate_size=256",
    "stage1.steps=800", "stage1.report_every=100", "stage3.steps=300", "stage3.report_every=100", "stage3.attempts=1",
    "stage3.micro_batch_size_per_worker=16", "stage3.counterfactual_rate=0",  # measured without worlds
    "stage3.initial_temperature=0.1",  # as measured (the preset's 0.3 was not run at this size)
    "train.num_workers=1", "eval.baselines=[]", "encode.max_actors=1",
]


@pytest.fixture(scope="session")
def local_ray():
    import ray

    from clara_ray.cli import start_ray

    start_ray(address="local")  # never a head the user started on this machine
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def finished_run(local_ray, tmp_path_factory):
    """SMALL_RUN's whole pipeline, once per session: test_ask asks it, test_sweep sweeps
    stage 3 from its stage 1 and encoded corpus. Its summary (run_pipeline's)."""
    from clara_ray.config import load_config
    from clara_ray.pipeline import run_pipeline

    started = time.perf_counter()
    config = load_config(None, [f"run.output_dir={tmp_path_factory.mktemp('runs')}", "run.name=small", *SMALL_RUN])
    summary = run_pipeline(config, log=lambda message: None)
    print(f"[small run] the run took {time.perf_counter() - started:.0f}s: {summary['results']}")
    return summary
