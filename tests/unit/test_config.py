"""The config tree: shipped presets load, overrides apply, bad settings fail with the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from clara_ray.config import (
    Baseline,
    Config,
    ConfigError,
    DType,
    epochs_of,
    config_from_dict,
    load_config,
)
from clara_ray.data.formats import BadRowPolicy
from clara_ray.placement import actor_options, train_placement
from clara_ray.training.settings import Stage1Settings
from clara_ray.training.tables import read_table

CONFIG_DIR = Path(__file__).resolve().parents[2] / "jobs" / "configs"
PRESETS = sorted(CONFIG_DIR.glob("*.yaml"))


def test_presets_exist():
    names = {path.name for path in PRESETS}
    assert {"tiny.yaml", "mistral7b_gpu.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda path: path.name)
def test_every_preset_loads_and_round_trips(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.model.doc_max_len == "auto" or config.model.doc_max_len % config.model.compression_rate == 0
    assert config_from_dict(config.to_dict()) == config


def test_defaults_equal_tiny_preset():
    assert load_config(None) == load_config(CONFIG_DIR / "tiny.yaml") == Config()


def test_defaults():
    config = load_config(None)
    assert config.model.backbone == "tiny" and config.model.is_tiny
    assert config.model.dtype is DType.FLOAT32
    assert config.model.doc_max_len == config.model.answer_max_len == "auto"  # picked from the data
    with pytest.raises(ConfigError, match="known once the data has been read"):
        config.model.num_memory_tokens
    assert config.with_lengths({"doc_max_len": 32}).model.num_memory_tokens == 2
    assert config.data.on_bad_row is BadRowPolicy.QUARANTINE
    assert config.data.uses_trap_corpus
    assert config.eval.baselines == (Baseline.BM25, Baseline.MINILM)
    assert config.stage1.learning_rate == pytest.approx(1e-3)


def test_mistral_preset():
    config = load_config(CONFIG_DIR / "mistral7b_gpu.yaml")
    assert config.model.backbone == "mistralai/Mistral-7B-Instruct-v0.2"
    assert not config.model.is_tiny
    assert config.model.dtype is DType.BFLOAT16
    assert config.model.num_memory_tokens == 8
    assert config.stage3.learning_rate == pytest.approx(5e-6)
    assert (config.train.use_gpu, config.train.zero_stage) == (True, 3)
    assert (config.index.factory, config.index.num_shards) == ("IVF4096,PQ64", 4)


def test_index_settings():
    from clara_ray.index.device import IndexDevice
    from clara_ray.index.keys import KeyKind
    from clara_ray.index.versions import IndexSettings

    config = load_config(None, ["index.key_kind=mean_pooled", "index.factory=HNSW32", "index.device=gpu",
                                "index.num_gpus_per_shard=0.5", "index.ef_search=64"])
    assert config.index.key_kind is KeyKind.MEAN_POOLED and config.index.device is IndexDevice.GPU
    settings = IndexSettings.from_config(config.index)
    assert (settings.factory, settings.key_kind, settings.num_gpus_per_shard) == ("HNSW32", KeyKind.MEAN_POOLED, 0.5)
    assert settings.search.ef_search == 64 and settings.keep_versions == 2


def test_placement_settings_become_ray_options():
    from clara_ray.index.versions import IndexSettings
    from clara_ray.pipeline import encode_settings

    config = load_config(None, ["train.placement_strategy=strict_spread", "train.resources_per_worker={train_node: 1}",
                                "encode.resources_per_actor={encode_node: 0.5}", "encode.scheduling=spread",
                                "index.scheduling=spread"])
    assert train_placement(config.train.placement_strategy) == "STRICT_SPREAD"
    assert config.train.resources_per_worker == {"train_node": 1.0}
    assert encode_settings(config).placement == {"resources": {"encode_node": 0.5}, "scheduling_strategy": "SPREAD"}
    index = IndexSettings.from_config(config.index)
    assert actor_options(index.resources_per_shard, index.scheduling) == {"scheduling_strategy": "SPREAD"}
    assert encode_settings(Config()).placement == {}  # Ray's defaults unless asked


def test_overrides():
    config = load_config(
        None,
        [
            "stage3.temperature=1e-3",
            "model.lora.target_modules=[q_proj,v_proj]",
            "train.use_gpu=true",
            "data.on_bad_row=fail",
            "model.dtype=bfloat16",
            "run.name=sweep-01",
            "model.lora={r: 8, alpha: 16}",
        ],
    )
    assert config.stage3.temperature == pytest.approx(1e-3)
    assert config.model.lora.target_modules == ("q_proj", "v_proj")
    assert (config.model.lora.r, config.model.lora.alpha) == (8, 16)
    assert config.train.use_gpu is True
    assert config.data.on_bad_row is BadRowPolicy.FAIL
    assert config.model.dtype is DType.BFLOAT16
    assert config.run.name == "sweep-01"


def test_override_applies_on_top_of_file(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("stage3:\n  top_k: 3\n  learning_rate: 2e-5\n")
    config = load_config(path, ["stage3.top_k=4"])
    assert config.stage3.top_k == 4
    assert config.stage3.learning_rate == pytest.approx(2e-5)
    assert config.stage3.num_candidates == Config().stage3.num_candidates


def test_user_data_paths_all_given():
    overrides = ["data.corpus=c.jsonl", "data.train_qa=train.jsonl", "data.test_qa=test.jsonl"]
    config = load_config(None, overrides)
    assert config.data.corpus == Path("c.jsonl")
    assert not config.data.uses_trap_corpus


def _error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    return str(caught.value)


def test_unknown_top_level_key_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage4:\n  steps: 1\n")
    message = _error(path)
    assert "stage4: unknown key" in message
    assert "stage3" in message  # lists the valid keys


def test_unknown_nested_key_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  lora:\n    rank: 8\n")
    message = _error(path)
    assert "model.lora.rank: unknown key" in message
    assert "r, alpha, dropout, target_modules" in message


def test_unknown_key_in_override():
    message = _error(None, ["stage3.temprature=0.1"])
    assert "stage3.temprature" in message and "temperature" in message
    assert "valid keys at the top level" in _error(None, ["stages.top_k=1"])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["stage3.temperature=-1"], "stage3.temperature: must be > 0 (got -1)"),
        (["model.doc_max_len=30"], "model.doc_max_len: must be divisible by compression_rate"),
        (["stage3.num_candidates=1"], "stage3.num_candidates: must be greater than top_k"),
        (["stage3.top_k=0"], "stage3.top_k: must be >= 1"),
        (["train.zero_stage=4"], "train.zero_stage: must be <= 3 (got 4)"),
        (["model.dtype=fp8"], "model.dtype: must be one of"),
        (["data.on_bad_row=skip"], "data.on_bad_row: must be one of"),
        (["data.corpus=c.jsonl"], "missing: train_qa, test_qa"),
        (["data.corpus=c.jsonl", "data.train_qa=t.jsonl"], "missing: test_qa"),
        (["model.tiny.num_heads=3"], "model.tiny.hidden_size: must be divisible by num_heads"),
        (["encode.min_actors=3"], "encode.max_actors: must be >= min_actors"),
        (["run.name=my run"], "run.name: must match"),
        (["eval.baselines=[bm25, colbert]"], "eval.baselines[1]: must be one of"),
        (["stage1.steps=many"], "stage1.steps:"),
        (["stage3.steps=2 apples"], "stage3.steps: must be a number of steps > 0 or '<n> epochs' (got '2 apples')"),
        (["model.question_max_len=-1"], "model.question_max_len: must be a number of tokens > 0 or auto (got -1)"),
        (["model.lora.target_modules=[]"], "model.lora.target_modules:"),
        (["stage1.min_context_docs=6"], "stage1.min_context_docs: must be at most max_context_docs (got 6 > 5)"),
        (["stage1.hard_distractor_fraction=1.5"], "stage1.hard_distractor_fraction: must be <= 1"),
        (["index.key_kind=max_pooled"], "index.key_kind: must be one of"),
        (["index.device=tpu"], "index.device: must be one of"),
        (["index.device=cpu", "index.num_gpus_per_shard=1"], "index.num_gpus_per_shard: must be 0 when device is cpu"),
        (["index.device=gpu"], "index.num_gpus_per_shard: must be > 0 when device is gpu"),
        (["index.num_shards=0"], "index.num_shards: must be >= 1"),
        (["index.refine_k_factor=0.5"], "index.refine_k_factor: must be >= 1"),
        # the tiny model's key is 2 memory tokens x 256 = 512 dims: PQ96 does not divide it
        (["model.doc_max_len=32", "index.factory=IVF64,PQ96"], "index.factory: index.factory='IVF64,PQ96' is not a FAISS index over 512-dim"),
        (["model.doc_max_len=32", "index.factory=Bogus"], "index.factory:"),
        (["train.zero_stage=3"], "stage3.anchor_weight: needs train.zero_stage 0, 1 or 2"),
        (["train.zero_stage=3", "stage3.anchor_weight=0"], "stage3.lower_anchor_weight: needs train.zero_stage 0, 1"),
        (["train.placement_strategy=scatter"], "train.placement_strategy: must be one of"),
        (["train.resources_per_worker={CPU: 2}"], "train.resources_per_worker: names Ray's own resource CPU"),
        (["encode.resources_per_actor={GPU: 1}"], "encode.resources_per_actor: names Ray's own resource GPU"),
        (["index.resources_per_shard={big_memory: 0}"], "index.resources_per_shard.big_memory: must be > 0"),
        (["index.scheduling=pack"], "index.scheduling: must be one of"),
    ],
)
def test_invalid_values(overrides, expected):
    assert expected in _error(None, overrides)


def test_lengths_picked_from_the_data_are_checked_like_given_ones():
    config = load_config(None, ["index.factory=IVF64,PQ96"])  # doc_max_len auto: key width unknown yet
    with pytest.raises(ConfigError, match="is not a FAISS index over 512-dim"):
        config.with_lengths({"doc_max_len": 32})
    assert config.with_lengths({"doc_max_len": 48}).model.num_memory_tokens == 3  # 768 dims: PQ96 divides it


def test_steps_in_epochs():
    config = load_config(None, ["stage1.steps=2 epochs", "stage3.steps=0.5epoch", "stage2.steps=7"])
    assert (epochs_of(config.stage1.steps), epochs_of(config.stage3.steps), epochs_of(config.stage2.steps)) == (2.0, 0.5, None)
    with pytest.raises(ConfigError, match="give more than 0 epochs"):
        epochs_of(load_config(None, ["stage3.steps=0 epochs"]).stage3.steps)
    with pytest.raises(ConfigError, match="stage1.steps is '2 epochs': epochs become a step count"):
        Stage1Settings.from_config(config)
    resolved = config.with_steps({"stage1": 30, "stage3": 4})
    assert (resolved.stage1.steps, resolved.stage3.steps) == (30, 4)
    assert Stage1Settings.from_config(resolved).steps == 30


def test_every_problem_is_reported():
    message = _error(None, ["stage3.temperature=0", "train.zero_stage=9"])
    assert "stage3.temperature" in message and "train.zero_stage" in message


@pytest.mark.parametrize(
    "override", ["stage3", "stage3.temperature.value=1", "no_equals_sign", "=1"]
)
def test_malformed_overrides(override):
    _error(None, [override])


def test_file_problems(tmp_path):
    assert "not found" in _error(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("stage3: [unclosed\n")
    assert "not valid YAML" in _error(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    assert "must be a mapping" in _error(listed)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError):
        config_from_dict({"train": {"num_workers": 0}})


def test_to_yaml_round_trip(tmp_path):
    config = load_config(
        CONFIG_DIR / "mistral7b_gpu.yaml",
        ["stage3.temperature=1e-7", "data.on_bad_row=fail", "eval.baselines=[minilm]"],
    )
    path = tmp_path / "saved.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config


def test_config_is_frozen():
    config = Config()
    with pytest.raises(ValueError):
        config.stage3.top_k = 2  # type: ignore[misc]


def test_steps_for_data_turns_epochs_into_steps(tmp_path):
    from clara_ray.data.trap import generate_trap_corpus
    from clara_ray.training.stages import steps_for_data, write_training_data

    corpus = generate_trap_corpus(num_entities=12, seed=3)  # 108 documents, 54 training questions
    config = load_config(None, ["stage1.steps=2 epochs", "stage1.micro_batch_size_per_worker=4",
                                "stage3.steps=1.5 epochs", "stage3.micro_batch_size_per_worker=4",
                                "stage3.validation_fraction=0.2"])
    data = write_training_data(config, {d.id: d.text for d in corpus.documents}, corpus.train_qa, tmp_path)
    steps = steps_for_data(config, data)
    # stage 1: one QA example per training question and one reconstruction example per document
    assert steps["stage1"] == (41, "2 epochs of 162 stage-1 examples, 8 per step")  # ceil(2 x 162 / 8)
    count = len(corpus.train_qa) - len(read_table(data.stage3_validation))
    assert steps["stage3"] == (-(-3 * count // 16), f"1.5 epochs of {count} training questions, 8 per step")
    assert set(steps) == {"stage1", "stage3"}  # stage 2 is off
    assert steps_for_data(load_config(None, ["stage1.steps=800", "stage3.steps=400"]), data) == {}  # numbers stay


def test_default_step_counts_are_the_tuned_800_and_400_steps_on_the_bundled_corpus():
    from clara_ray.config import steps_for_counts
    from clara_ray.data.trap import generate_trap_corpus

    corpus = generate_trap_corpus()
    counts = {"stage1": len(corpus.documents) + len(corpus.train_qa), "stage3": len(corpus.train_qa)}
    assert counts == {"stage1": 2160, "stage3": 720}
    steps = steps_for_counts(load_config(None, []), counts)
    assert {stage: count for stage, (count, _) in steps.items()} == {"stage1": 800, "stage3": 400}
    # twice the data, twice the steps
    doubled = steps_for_counts(load_config(None, []), {stage: 2 * n for stage, n in counts.items()})
    assert {stage: count for stage, (count, _) in doubled.items()} == {"stage1": 1600, "stage3": 800}


def test_refresh_needs_a_trainable_compressor():
    with pytest.raises(ConfigError, match="stage3.refresh_every.*trainable"):
        load_config(None, ["stage3.refresh_every=50"])
    config = load_config(None, ["stage3.refresh_every=50", "stage3.compressor=trainable"])
    assert config.stage3.compressor.value == "trainable" and config.stage3.refresh_every == 50
