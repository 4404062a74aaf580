"""Encode a corpus into memory shards with Ray Data and an autoscaling compressor actor pool.

    summary = encode_corpus(["psgs_w100.tsv"], model_dir, "memory/", EncodeSettings(...))

Each step is a streaming Ray Data job over the input files (see
``clara_ray/data/corpus_reader.py`` for formats and bad rows):

1. duplicate ids: a groupby over the ids; only duplicated ids reach the driver
   (on a corpus of one shuffle partition the driver groups the ids itself).
2. counts: input rows, good rows, bad rows by kind (a Ray aggregation).
3. quarantine: every bad row, with its reason, to ``<output>/quarantine/*.json``.
4. encode: good rows -> ``map_batches(CompressorActor)`` on an actor pool that
   grows from ``min_actors`` to ``max_actors`` -> Parquet shards in ``<output>``.
   The write is checkpointed by ``row_key`` (Ray Data checkpointing) under
   ``<output>.checkpoint``: a rerun after a killed driver, actor or node skips
   the rows already written. Before anything reads the output, every file whose
   write was not committed is removed (``clara_ray/write_commits.py``), so
   counts and the manifest only ever see whole shards.
5. manifest: every committed shard file with its rows; checks input = encoded +
   quarantined and that every id was encoded exactly once (counted in the driver up
   to ``DRIVER_ID_CHECK_MAX_ROWS`` documents, by a Ray Data groupby beyond), then writes
   ``manifest.json`` last: its presence marks a complete output. The checkpoint
   is deleted only after that, so an output without a manifest always has one.

Steps 1-3 only parse (cheap next to the compressor) and write nothing that a
rerun must skip, so they simply run again. Layout of the output: see
``clara_ray/memory_shards.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from ray.data.aggregate import Count
from ray.data.checkpoint import CheckpointConfig
from ray.data.expressions import col

from clara_ray.data.corpus_reader import (
    count_corpus_rows,
    find_duplicate_ids,
    good_rows,
    mark_duplicate_ids,
    quarantined_rows,
    read_corpus_rows,
)
from clara_ray.data.corpus_rows import CorpusFormat
from clara_ray.data.formats import BadRowPolicy
from clara_ray.errors import UserError
from clara_ray.memory_shards import KEY_KIND_FLAT_MEMORY, MANIFEST, memory_table, write_manifest
from clara_ray.placement import Scheduling, actor_options
from clara_ray.write_commits import committed_rows, inspect_write, settle_interrupted_write

QUARANTINE_DIR = "quarantine"
SUMMARY = "summary.json"


class CompressorActor:
    """Ray Data callable class: a batch of good corpus rows -> rows of the shard schema."""

    def __init__(self, model_dir: str, doc_max_len: int, dtype: str = "float32", num_threads: int = 1,
                 pad_to_doc_max_len: bool = True):
        from clara_ray.modeling.checkpoint import load_model
        from clara_ray.modeling.clara import Role

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            dtype = "float32"  # CPUs run bf16 matmuls slowly; memory is stored as fp16 anyway
            # Load on one thread. Ray Data builds this class on the actor's main
            # thread but calls it on another one; OpenMP threads started here
            # would stay alive beside the caller's own, and with more OpenMP
            # threads than cores libgomp stops spinning at its barriers: the
            # encode threads then sleep and wake between every op (measured:
            # ~150% of 2 cores busy instead of ~175%, about 10% fewer docs/s).
            torch.set_num_threads(1)
        model, self.tokenizer, _ = load_model(model_dir, dtype=getattr(torch, dtype))
        self.model = model.to(self.device).eval()
        self.model.merge_for_inference(Role.COMPRESSOR)
        if self.device == "cpu":
            torch.set_num_threads(num_threads)  # the calling thread's OpenMP team starts at its first op
        self.doc_max_len = doc_max_len
        self.pad_to_doc_max_len = pad_to_doc_max_len

    def __call__(self, batch: pa.Table) -> pa.Table:
        from clara_ray.modeling.text import document_input

        titles = batch.column("title").to_pylist()
        texts = [document_input(text, title) for text, title in zip(batch.column("text").to_pylist(), titles)]
        return self.encode_texts(batch.column("doc_id").to_pylist(), texts, batch.column("row_key").to_pylist())

    def encode_texts(self, doc_ids: list[str], texts: list[str], row_keys: list[str]) -> pa.Table:
        """Rows of the shard schema for documents already rendered by ``document_input``."""
        from clara_ray.modeling.clara import Role
        from clara_ray.modeling.text import tokenize_texts

        tokens = tokenize_texts(self.tokenizer, texts, self.doc_max_len, self.pad_to_doc_max_len)
        with torch.inference_mode():
            memory, _ = self.model.encode(
                Role.COMPRESSOR, tokens.ids.to(self.device), tokens.mask.to(self.device)
            )  # (B, n_mem, d)
        lengths = np.asarray(tokens.lengths)
        return memory_table(
            doc_ids,
            memory.float().cpu().numpy(),
            num_tokens=np.minimum(lengths, self.doc_max_len),
            truncated=lengths > self.doc_max_len,
            row_keys=row_keys,
        )

    def load_adapters(self, model_dir: str) -> None:
        """Swap in the adapters (LoRA, memory tokens, standardisation) of another
        directory of the same base model; the base stays loaded. The compressor's LoRA
        is unmerged from the base weights first and merged again after."""
        from safetensors.torch import load_file

        from clara_ray.modeling.checkpoint import ADAPTERS
        from clara_ray.modeling.clara import Role

        self.model.lm.base_model.unmerge_adapter()
        adapters = {k: v.to(self.device) for k, v in load_file(str(Path(model_dir) / ADAPTERS)).items()}
        self.model.load_state_dict(adapters, strict=False)
        self.model.merge_for_inference(Role.COMPRESSOR)


@dataclass(frozen=True)
class EncodeSettings:
    doc_max_len: int
    batch_size: int = 128
    min_actors: int = 1
    max_actors: int = 1
    num_cpus_per_actor: float = 1
    num_gpus_per_actor: float = 0
    # > 0: no batch is sent until min_actors are up, or an error after this many seconds.
    wait_for_min_actors_s: int = 0
    dtype: str = "bfloat16"  # on GPU; CPU actors always compute in float32
    on_bad_row: BadRowPolicy = BadRowPolicy.QUARANTINE
    rows_per_shard: int = 8192
    # Every batch padded to doc_max_len: a document's memory is then the same bits
    # whatever batch Ray Data put it in (padded to the batch's longest document,
    # the matmul shapes change with the batch and so do the last bits).
    pad_to_doc_max_len: bool = True
    # Custom resources and scheduling of the encoder actors (clara_ray/placement.py).
    resources_per_actor: Mapping[str, float] = field(default_factory=dict)
    scheduling: Scheduling = Scheduling.DEFAULT

    @property
    def placement(self) -> dict:
        """The encoder actors' Ray options beyond CPUs and GPUs."""
        return actor_options(self.resources_per_actor, self.scheduling)


@dataclass(frozen=True)
class EncodeSummary:
    output_dir: str
    num_input_rows: int
    num_encoded: int
    num_quarantined: int
    quarantined_by_kind: dict[str, int]
    num_truncated: int
    num_tokens: int
    num_shards: int
    num_encoded_this_run: int  # the rest were written by an interrupted earlier run
    seconds: float  # of the encode step
    total_seconds: float
    steps_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def documents_per_second(self) -> float:
        return self.num_encoded_this_run / max(self.seconds, 1e-9)

    def as_dict(self) -> dict:
        return {**asdict(self), "documents_per_second": self.documents_per_second}

    def describe(self) -> str:
        kinds = ", ".join(f"{kind}: {count}" for kind, count in sorted(self.quarantined_by_kind.items())) or "none"
        tokens_per_second = self.num_tokens * self.num_encoded_this_run / max(self.num_encoded, 1) / max(self.seconds, 1e-9)
        return (
            f"{self.num_input_rows} rows in = {self.num_encoded} encoded + {self.num_quarantined} quarantined "
            f"({kinds}); {self.num_truncated} truncated at the length limit; {self.num_shards} shards in "
            f"{self.output_dir}; this run encoded {self.num_encoded_this_run} documents in {self.seconds:.1f}s "
            f"({self.documents_per_second:.1f} docs/s, {tokens_per_second:.0f} tokens/s)"
        )


def checkpoint_dir(output_dir: str | Path) -> Path:
    """Where an unfinished encode keeps its resume state (beside the output, not in it)."""
    output_dir = Path(output_dir)
    return output_dir.parent / f"{output_dir.name}.checkpoint"


def encode_corpus(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    model_dir: str | Path,
    output_dir: str | Path,
    settings: EncodeSettings,
    corpus_format: CorpusFormat | None = None,
    log=print,
) -> EncodeSummary:
    """Encode every good row of the corpus files exactly once into ``output_dir``.

    Resumes an interrupted run into the same ``output_dir`` (same inputs and
    model); refuses a directory that is complete already or holds something else.
    """
    output_dir = Path(output_dir).resolve()
    # Absolute local paths: row keys name their source file, and must not change
    # when a rerun starts from another working directory.
    paths = [_absolute(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    model_manifest = json.loads((Path(model_dir) / "clara.json").read_text())
    _check_output_dir(output_dir, model_manifest["compressor_fingerprint"])
    # First, so that whatever a killed run leaves is recognised as its own.
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_fingerprint(output_dir, model_manifest["compressor_fingerprint"])
    started = time.perf_counter()
    steps: dict[str, float] = {}

    def step(name: str, since: float) -> float:
        steps[name] = round(time.perf_counter() - since, 2)
        log(f"[encode] {name} done in {steps[name]:.1f}s")
        return time.perf_counter()

    mark = time.perf_counter()
    num_partitions = _shuffle_partitions(paths)
    duplicates = find_duplicate_ids(read_corpus_rows(paths, corpus_format, settings.on_bad_row),
                                    num_partitions=num_partitions)

    def corpus_rows():
        # A dataset keeps the DataContext of its creation: the checkpointed
        # encode step needs one created after its checkpoint config is set.
        rows = read_corpus_rows(paths, corpus_format, settings.on_bad_row)
        return mark_duplicate_ids(rows, duplicates, settings.on_bad_row)

    rows = corpus_rows()
    mark = step(f"duplicate ids ({len(duplicates)} ids occur more than once)", mark)
    counts = count_corpus_rows(rows)
    mark = step(f"count ({counts.num_input_rows} rows, {counts.num_good_rows} good)", mark)
    quarantine_dir = output_dir / QUARANTINE_DIR
    shutil.rmtree(quarantine_dir, ignore_errors=True)
    if counts.num_input_rows > counts.num_good_rows:
        quarantined_rows(rows).drop_columns(["doc_id", "text", "title"]).write_json(str(quarantine_dir))
    mark = step("quarantine", mark)

    rows_before = committed_rows(settle_interrupted_write(output_dir, checkpoint_dir(output_dir), log))
    encode_started = time.perf_counter()
    _encode_good_rows(lambda: good_rows(corpus_rows()), model_dir, output_dir, settings)
    encode_seconds = time.perf_counter() - encode_started
    shards = _finished_shards(output_dir, log)
    mark = step("encode", encode_started)

    manifest = write_manifest(
        output_dir,
        shards,
        model_fingerprint=model_manifest["compressor_fingerprint"],
        num_memory_tokens=model_manifest["num_memory_tokens"],
        hidden_size=model_manifest["hidden_size"],
        memory_dtype="float16",
        key_kind=KEY_KIND_FLAT_MEMORY,
        key_dim=model_manifest["num_memory_tokens"] * model_manifest["hidden_size"],
        num_input_documents=counts.num_input_rows,
        num_quarantined=counts.num_input_rows - counts.num_good_rows,
        quarantined_by_kind=counts.quarantined_by_kind,
        quarantine_dir=QUARANTINE_DIR,
        inputs=paths,
        check=lambda manifest: _check_exactly_once(output_dir, shards, manifest, counts.num_good_rows, num_partitions),
    )
    shutil.rmtree(checkpoint_dir(output_dir))
    step("manifest", mark)
    summary = EncodeSummary(
        output_dir=str(output_dir),
        num_input_rows=manifest["num_input_documents"],
        num_encoded=manifest["num_encoded"],
        num_quarantined=manifest["num_quarantined"],
        quarantined_by_kind=manifest["quarantined_by_kind"],
        num_truncated=manifest["num_truncated"],
        num_tokens=manifest["num_tokens"],
        num_shards=len(manifest["shards"]),
        num_encoded_this_run=manifest["num_encoded"] - rows_before,
        seconds=round(encode_seconds, 2),
        total_seconds=round(time.perf_counter() - started, 2),
        steps_seconds=steps,
    )
    (output_dir / SUMMARY).write_text(json.dumps(summary.as_dict(), indent=2))
    log(f"[encode] {summary.describe()}")
    return summary


def _encode_good_rows(documents, model_dir, output_dir: Path, settings: EncodeSettings) -> None:
    """documents() -> the good rows, created here under the checkpoint config."""
    context = ray.data.DataContext.get_current()
    previous = context.checkpoint_config, context.wait_for_min_actors_s
    # Kept after success: it is what tells whole shards from half-written ones
    # until the manifest exists (encode_corpus deletes it after writing that).
    context.checkpoint_config = CheckpointConfig(
        id_column="row_key", checkpoint_path=str(checkpoint_dir(output_dir)), delete_checkpoint_on_success=False
    )
    context.wait_for_min_actors_s = settings.wait_for_min_actors_s or -1  # Ray Data's "do not wait"
    try:
        documents().map_batches(
            CompressorActor,
            fn_constructor_kwargs={
                "model_dir": str(model_dir),
                "doc_max_len": settings.doc_max_len,
                "dtype": settings.dtype,
                "num_threads": max(1, int(settings.num_cpus_per_actor)),
                "pad_to_doc_max_len": settings.pad_to_doc_max_len,
            },
            batch_size=settings.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=settings.min_actors, max_size=settings.max_actors),
            num_cpus=settings.num_cpus_per_actor,
            num_gpus=settings.num_gpus_per_actor,
            **settings.placement,
        ).write_parquet(str(output_dir), min_rows_per_file=settings.rows_per_shard)
    except ray.exceptions.GetTimeoutError as error:
        if "starting actors" not in str(error):
            raise
        raise UserError(
            f"encode: {settings.min_actors} encoder actor(s) did not start within encode.wait_for_min_actors_s="
            f"{settings.wait_for_min_actors_s} s: the cluster has no room for what each asks "
            f"({settings.num_cpus_per_actor} CPU, {settings.num_gpus_per_actor} GPU, "
            f"resources {dict(settings.resources_per_actor)}); lower encode.min_actors or add nodes"
        ) from None
    finally:
        context.checkpoint_config, context.wait_for_min_actors_s = previous


FINGERPRINT = "compressor_fingerprint.txt"


def _write_fingerprint(output_dir: Path, fingerprint: str) -> None:
    partial = output_dir / f"{FINGERPRINT}.partial"
    partial.write_text(fingerprint)
    partial.replace(output_dir / FINGERPRINT)


def _check_output_dir(output_dir: Path, fingerprint: str) -> None:
    """A fresh directory, or the unfinished output of the same compressor."""
    if (output_dir / MANIFEST).exists():
        raise FileExistsError(f"{output_dir} holds a finished encoding ({MANIFEST}); choose a new output directory")
    if not output_dir.exists() or not any(output_dir.iterdir()):
        shutil.rmtree(checkpoint_dir(output_dir), ignore_errors=True)  # stale state of a deleted output
        return
    marker = output_dir / FINGERPRINT
    if not marker.exists():
        raise FileExistsError(f"{output_dir} is not empty and is not an unfinished encoding; choose a new output directory")
    if marker.read_text() != fingerprint:
        raise FileExistsError(
            f"{output_dir} is an unfinished encoding by another compressor ({marker.read_text()}); "
            f"delete it or choose a new output directory"
        )


def _finished_shards(output_dir: Path, log) -> list[Path]:
    """The committed shards after a successful write. A file under no commit
    record can still appear when a task of a killed earlier driver outlived it
    and finished its write after this run's recovery; its rows were encoded
    again by this run, so it is removed, not counted."""
    state = inspect_write(output_dir, checkpoint_dir(output_dir))
    if state.unreadable:
        raise RuntimeError(f"{output_dir}: committed shards cannot be read: {[p.name for p in state.unreadable]}")
    for path in state.uncommitted:
        log(f"[encode] removing {path.name}: written outside this run's commits")
        path.unlink()
    return state.committed


def _absolute(path: str | os.PathLike) -> str:
    text = os.fspath(path)
    return text if "://" in text else str(Path(text).resolve())


def _shuffle_partitions(paths, bytes_per_partition: int = 256 * 2**20) -> int | None:
    """Partitions for a groupby over the corpus ids: about one per 256 MiB of local
    input (Ray's default of 200 costs seconds of set-up on a small corpus); Ray's
    default for remote paths, whose size is not looked up here."""
    total = 0
    for text in paths:
        path = Path(text)
        if "://" in text or not path.exists():
            return None
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        total += sum(f.stat().st_size for f in files)
    return max(1, min(200, total // bytes_per_partition + 1))


# Up to this many encoded documents the driver counts their ids itself (a few hundred
# MB at most): on a small corpus that takes milliseconds, where Ray Data's groupby
# spends seconds starting up.
DRIVER_ID_CHECK_MAX_ROWS = 5_000_000


def _check_exactly_once(
    output_dir: Path, shards: list[Path], manifest: dict, num_good_rows: int, num_partitions: int | None,
    driver_max_rows: int = DRIVER_ID_CHECK_MAX_ROWS,
) -> None:
    if manifest["num_encoded"] != num_good_rows:
        raise RuntimeError(
            f"{output_dir}: {manifest['num_encoded']} documents encoded but {num_good_rows} good rows went in"
        )
    if manifest["num_encoded"] <= driver_max_rows:
        ids = pa.chunked_array([chunk for path in shards
                                for chunk in pq.read_table(path, columns=["doc_id"]).column("doc_id").chunks],
                               type=pa.string())
        counts = pc.value_counts(ids)
        repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values").to_pylist()[:5]
    else:
        repeated = (
            ray.data.read_parquet([str(path) for path in shards])
            .select_columns(["doc_id"])
            .groupby("doc_id", num_partitions=num_partitions)
            .aggregate(Count(alias_name="copies"))
            .filter(expr=col("copies") > 1)
            .take(5)
        )
    if repeated:
        raise RuntimeError(f"{output_dir}: documents encoded more than once, e.g. {repeated}")
