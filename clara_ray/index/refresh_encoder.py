"""The encoders of index refreshes: long-lived actors that re-encode the corpus with a snapshot's compressor.

    encoders = RefreshEncoders(source_memory_dir, documents_path, settings)   # the refresh scheduler, once
    encoders.encode(snapshot_dir, memory_dir)                                 # each refresh

The first encoding of a corpus is the Ray Data job of ``clara_ray/encode.py``: it
reads, validates and deduplicates the files, and writes memory shards. A refresh
encodes those same documents again, many times in one run, with a compressor whose
base model never changes (stage 3 trains adapters only). So the refresh keeps its
encoders: the actors (``encode.*``: count, CPUs, GPUs per actor) start at the first
refresh, each loads the model once, and a later refresh only swaps the snapshot's
adapters into them (``CompressorActor.load_adapters``). The job's fixed cost, paid
again at every refresh, was most of a refresh on the tiny preset: 12-40 s of process
start-up and model loading to encode 160 documents in well under a second, on cores
training shares (BENCHMARKS.md, "Throughput while refreshes run").

Shard i of a refresh holds the documents of the source encoding's shard i, in order:
their ids and row keys read from that shard, their texts by id from the run's document
table (``data/documents.arrow``, the text the encoder renders with
``document_input``). Shards are handed to whichever actor is free; each writes its
shard whole (renamed into place). The manifest, written last, carries the source's
counts (inputs, quarantined rows and their files) with the snapshot's fingerprint:
nothing is parsed again, so nothing can be counted twice.

A failed shard (an actor killed, an error) fails the refresh; the pool is then dropped,
and the next refresh starts a fresh one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.util import ActorPool

from clara_ray.encode import CompressorActor, EncodeSettings
from clara_ray.memory_shards import MANIFEST, write_manifest
from clara_ray.modeling.checkpoint import MANIFEST as MODEL_MANIFEST
from clara_ray.training.tables import DocumentTable

# Fields of the source manifest that describe the corpus, not its encoding.
_CORPUS_FIELDS = ("num_memory_tokens", "hidden_size", "memory_dtype", "key_kind", "key_dim", "num_input_documents",
                  "num_quarantined", "quarantined_by_kind", "inputs")


def _base_identity(model_dir: Path) -> str:
    """What must not change between two snapshots whose adapters are swapped: the base
    model, by reference, or by the content of a base saved in the directory."""
    backbone = json.loads((model_dir / MODEL_MANIFEST).read_text())["backbone"]
    if backbone != "backbone":
        return backbone
    digest = hashlib.sha256()
    with open(model_dir / "backbone" / "model.safetensors", "rb") as weights:
        while chunk := weights.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class RefreshEncoder:
    """Ray actor body: one long-lived encoder (see the module doc)."""

    def __init__(self, documents_path: str, settings: EncodeSettings):
        self.documents = DocumentTable(documents_path)
        self.settings = settings
        self.compressor: CompressorActor | None = None
        self.model_dir: str | None = None
        self.base: str | None = None

    def _load(self, model_dir: str) -> None:
        if model_dir == self.model_dir:
            return
        base = _base_identity(Path(model_dir))
        if self.compressor is None or base != self.base:
            s = self.settings
            self.compressor = CompressorActor(model_dir, s.doc_max_len, s.dtype, max(1, int(s.num_cpus_per_actor)),
                                              s.pad_to_doc_max_len)
        else:
            self.compressor.load_adapters(model_dir)
        self.model_dir, self.base = model_dir, base

    def ready(self) -> bool:
        return True

    def encode_shard(self, model_dir: str, source_file: str, output_file: str) -> int:
        """Encode the documents of one source shard into `output_file`; returns its row count."""
        self._load(model_dir)
        source = pq.read_table(source_file, columns=["doc_id", "row_key"])
        doc_ids, row_keys = source.column("doc_id").to_pylist(), source.column("row_key").to_pylist()
        texts = self.documents.texts_of(doc_ids)
        size = self.settings.batch_size
        parts = [self.compressor.encode_texts(doc_ids[i:i + size], texts[i:i + size], row_keys[i:i + size])
                 for i in range(0, len(doc_ids), size)]
        partial = Path(f"{output_file}.partial")
        pq.write_table(pa.concat_tables(parts), partial)
        partial.replace(output_file)
        return len(doc_ids)


class RefreshEncoders:
    """The pool of a run's refresh encoders (started at the first `encode`, kept after)."""

    def __init__(self, source_memory_dir: str, documents_path: str, settings: EncodeSettings,
                 encoder_class: type = RefreshEncoder):
        self.source = Path(source_memory_dir)
        self.documents_path, self.settings, self.encoder_class = documents_path, settings, encoder_class
        self.actors: list = []

    def _pool(self, num_shards: int) -> ActorPool:
        """Up to encode.max_actors encoders (no more than shards), of which those already
        running take this refresh's shards: one still waiting for resources (a node the
        autoscaler is bringing up, CPUs training holds) joins a later refresh, and only
        when none runs yet does this one wait for the first."""
        wanted = max(1, min(self.settings.max_actors, num_shards))
        encoder = ray.remote(self.encoder_class).options(num_cpus=self.settings.num_cpus_per_actor,
                                                         num_gpus=self.settings.num_gpus_per_actor,
                                                         **self.settings.placement)
        while len(self.actors) < wanted:
            self.actors.append(encoder.remote(self.documents_path, self.settings))
        pings = {actor.ready.remote(): actor for actor in self.actors}
        done, _ = ray.wait(list(pings), num_returns=len(pings), timeout=1.0)
        if not done:
            done, _ = ray.wait(list(pings), num_returns=1)
        running = [pings[ref] for ref in done]
        ray.get([ping for ping in done])  # an encoder that died raises here: the refresh fails, the pool restarts
        return ActorPool(running)

    def encode(self, model_dir: str, memory_dir: str | Path) -> dict:
        """The corpus encoded by `model_dir`'s compressor into `memory_dir` (replaced); returns its manifest."""
        source = json.loads((self.source / MANIFEST).read_text())
        memory_dir = Path(memory_dir)
        shutil.rmtree(memory_dir, ignore_errors=True)
        memory_dir.mkdir(parents=True)
        files = [shard["file"] for shard in source["shards"]]
        try:
            rows = list(self._pool(len(files)).map_unordered(
                lambda actor, name: actor.encode_shard.remote(model_dir, str(self.source / name),
                                                              str(memory_dir / name)), files))
        except Exception:
            self.close()  # an actor may be dead or wedged: the next refresh starts afresh
            raise
        model = json.loads((Path(model_dir) / MODEL_MANIFEST).read_text())
        quarantine = self.source / source["quarantine_dir"] if source.get("quarantine_dir") else None

        def check(manifest: dict) -> None:
            if manifest["num_encoded"] != source["num_encoded"] or sum(rows) != source["num_encoded"]:
                raise RuntimeError(f"a refresh encoded {manifest['num_encoded']} documents, "
                                   f"the source encoding {source['num_encoded']}")

        return write_manifest(memory_dir, [memory_dir / name for name in files], check=check,
                              model_fingerprint=model["compressor_fingerprint"],
                              **{k: source[k] for k in _CORPUS_FIELDS if k in source},
                              # the rows set aside stay where the source encoding wrote them
                              quarantine_dir=None if quarantine is None else str(quarantine.resolve()))

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
