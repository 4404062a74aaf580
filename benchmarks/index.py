"""Index benchmark: Flat vs IVF-PQ vs HNSW, one process vs sharded Ray actors, and key choices.

    python benchmarks/index.py                 # the full run behind BENCHMARKS.md (1M x 768 and 100k x 4096)
    python benchmarks/index.py --pooled-keys 100000 --memory-keys 20000 --queries 200 --no-write   # a quick look

Data: clustered synthetic vectors (``clara_ray.index.synthetic``: a Gaussian mixture
with one centre per ``--docs-per-centre`` documents, noise 0.7, normalised), queries
drawn fresh from the same mixture.
1. "pooled": ``--pooled-keys`` keys of 768 dims (a pooled key; the memory stored
   beside it is the key itself in fp16, one 768-dim token, to keep the disk small).
2. "flattened": ``--memory-keys`` documents of 8 x 512 memory, key = the flattened
   memory (4096 dims, CLaRa's exact score).
For each, every factory is built once in this process (``--threads`` FAISS threads)
and once as an index version served by ``--shards`` shard actors (threads / shards
each); the exact top-10 comes from the single-process Flat index. Reported: build
seconds, index bytes (serialized size; for actors the summed actor RSS), recall@10
against exact search, queries/s over all queries in one call (k=10), and the
latency of one training batch (``--batch`` queries, L = ``--candidates``; the
actor path returns the candidates' memory vectors too), median of 5.
3. Key choices on "flattened": recall@10 of the index's own top-10 and of the
   exact re-score of its L candidates (what the trainer does), bytes per key.
Timings are noisy when other work shares the machine: compare numbers from one run.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clara_ray.index.keys import KeyKind, memory_keys
from clara_ray.index.shard import SearchParams, apply_search_params, search_index, train_and_add
from clara_ray.index.synthetic import clustered_memory, clustered_vectors
from clara_ray.index.versions import IndexSettings
from clara_ray.memory_shards import memory_table, write_manifest

MARK_BEGIN, MARK_END = "<!-- benchmarks/index.py begin -->", "<!-- benchmarks/index.py end -->"
MAX_TRAINING_KEYS = 65536


@dataclass
class Dataset:
    name: str
    keys: np.ndarray  # (N, D) float32, unit rows: what the index holds
    queries: np.ndarray  # (Q, n_mem * d) float32: flattened query memory
    memory_of: callable  # rows -> (n, n_mem, d) memory, for writing memory shards
    n_mem: int
    hidden: int


@dataclass
class Row:
    dataset: str
    factory: str
    where: str
    params: str
    build_s: float
    index_mb: float
    recall: float
    qps: float
    batch_ms: float


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def index_bytes(index: faiss.Index) -> int:
    """Serialized size, counted without holding a second copy of a multi-GB index."""
    total = [0]

    def count(chunk):
        total[0] += len(chunk)
        return len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total[0]


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(f[:k]) & set(e)) / k for f, e in zip(found, exact)]))


def median_ms(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def nlist_for(count: int) -> int:
    return 2 ** round(math.log2(math.sqrt(count)))  # ~sqrt(N) lists, a power of two


def factories(dim: int, count: int) -> list[tuple[str, list[SearchParams]]]:
    nlist = nlist_for(count)
    sub = dim // 8 if dim <= 1024 else 256  # PQ sub-vectors of 8 dims (768 -> 96), 16 dims at 4096
    return [
        ("Flat", [SearchParams()]),
        (f"IVF{nlist},PQ{sub}x4fs,RFlat", [SearchParams(nprobe=p, refine_k_factor=k) for p, k in
                                           ((8, 16), (16, 32), (32, 64))]),
        ("HNSW32", [SearchParams(ef_search=e) for e in (64, 128, 256)]),
    ]


def describe(factory: str, params: SearchParams) -> str:
    if "IVF" in factory:
        return f"nprobe={params.nprobe}, k_factor={params.refine_k_factor:g}"
    if "HNSW" in factory:
        return f"efSearch={params.ef_search}"
    return "-"


def pooled_dataset(args) -> Dataset:
    count, dim = args.pooled_keys, 768
    centres = max(1, count // args.docs_per_centre)
    raw = clustered_vectors(count, dim, centres, seed=0)
    queries = clustered_vectors(args.queries, dim, centres, seed=1, centres_seed=0)
    # The memory-shard writer normalises once more; do the same so both paths hold identical keys.
    keys = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
    return Dataset(f"pooled {count // 1000}k x {dim}", keys, queries, lambda rows: raw[rows][:, None, :], 1, dim)


def flattened_dataset(args) -> Dataset:
    count, n_mem, hidden = args.memory_keys, 8, 512
    centres = max(1, count // args.docs_per_centre)
    memory = clustered_memory(count, n_mem, hidden, centres, seed=0)  # (N, 8, 512) float16
    queries = clustered_memory(args.queries, n_mem, hidden, centres, seed=1, centres_seed=0)
    keys = memory_keys(memory, KeyKind.FLAT_MEMORY)
    return Dataset(f"flattened {count // 1000}k x {n_mem}x{hidden}", keys,
                   queries.reshape(args.queries, -1).astype(np.float32), lambda rows: memory[rows], n_mem, hidden)


def write_memory_dir(data: Dataset, directory: Path, rows_per_file: int = 100_000) -> None:
    directory.mkdir(parents=True)
    count = len(data.keys)
    for part, start in enumerate(range(0, count, rows_per_file)):
        rows = np.arange(start, min(start + rows_per_file, count))
        table = memory_table([f"d{i}" for i in rows], data.memory_of(rows), num_tokens=np.ones(len(rows)),
                             truncated=np.zeros(len(rows), bool))
        pq.write_table(table, directory / f"part-{part:05d}.parquet")
    write_manifest(directory, model_fingerprint="synthetic", num_memory_tokens=data.n_mem, hidden_size=data.hidden,
                   memory_dtype="float16", key_kind="flat_memory", key_dim=data.n_mem * data.hidden,
                   num_input_documents=count, num_quarantined=0)


def query_keys_of(data: Dataset) -> np.ndarray:
    return memory_keys(data.queries.reshape(len(data.queries), data.n_mem, data.hidden), KeyKind.FLAT_MEMORY)


def run_single(data: Dataset, args) -> tuple[list[Row], dict, np.ndarray]:
    """Every factory in this process. Returns rows, the chosen params per factory, the exact top-10."""
    faiss.omp_set_num_threads(args.threads)
    queries = query_keys_of(data)  # (Q, D)
    rows, chosen, exact = [], {}, None
    for factory, settings in factories(data.keys.shape[1], len(data.keys)):
        log(f"{data.name}: building {factory} in one process")
        started = time.perf_counter()
        index = train_and_add(data.keys, factory, MAX_TRAINING_KEYS)
        build_s = time.perf_counter() - started
        size_mb = index_bytes(index) / 2**20
        results = []
        for params in settings:
            apply_search_params(index, params)
            started = time.perf_counter()
            _, top = search_index(index, queries, 10, params)  # (Q, 10)
            qps = len(queries) / (time.perf_counter() - started)
            if exact is None:  # the first factory is Flat: exact search
                exact = top
            batch = queries[: args.batch]
            if (search_index(index, batch, args.candidates, params)[1] < 0).any():
                log(f"  {factory} ({describe(factory, params)}) finds fewer than L={args.candidates} candidates")
            batch_ms = median_ms(partial(search_index, index, batch, args.candidates, params))
            row = Row(data.name, factory, "1 process", describe(factory, params), build_s, size_mb,
                      recall_at(top, exact), qps, batch_ms)
            log(f"  {row}")
            results.append((params, row))
        rows += [row for _, row in results]
        good = [(p, r) for p, r in results if r.recall >= 0.95]
        chosen[factory] = max(good, key=lambda pr: pr[1].qps)[0] if good else max(results, key=lambda pr: pr[1].recall)[0]
        del index
    return rows, chosen, exact


def run_sharded(data: Dataset, args, chosen: dict, exact: np.ndarray, workdir: Path) -> tuple[list[Row], bool]:
    import ray

    from clara_ray.index.actor import start_index_actor

    memory_dir = workdir / "memory"
    log(f"{data.name}: writing memory shards to {memory_dir}")
    write_memory_dir(data, memory_dir)
    rows, flat_equal = [], False
    for factory, params in chosen.items():
        settings = IndexSettings(factory=factory, num_shards=args.shards, num_cpus_per_shard=args.threads / args.shards,
                                 search=params, max_training_keys=MAX_TRAINING_KEYS, keep_versions=1)
        log(f"{data.name}: building {factory} as {args.shards} shards and starting their actors")
        started = time.perf_counter()
        router = start_index_actor(str(memory_dir), settings=settings, index_root=str(workdir / "index"),
                                   name="benchmark-index")
        build_s = time.perf_counter() - started  # build the version + load every shard actor
        started = time.perf_counter()
        found = ray.get(router.search.remote(data.queries, 10))
        qps = len(data.queries) / (time.perf_counter() - started)
        top = np.vectorize(lambda doc_id: int(doc_id[1:]))(found.doc_ids)  # "d<row>" -> row
        if factory == "Flat":
            flat_equal = bool(np.array_equal(top, exact))
        batch = data.queries[: args.batch]
        batch_ms = median_ms(partial(lambda r, b: ray.get(r.search.remote(b, args.candidates)), router, batch))
        shard_infos = ray.get([a.info.remote() for a in ray.get(router.shard_actors.remote())])
        rss_mb = sum(info["rss_bytes"] for info in shard_infos) / 2**20
        row = Row(data.name, factory, f"{args.shards} actors", describe(factory, params), build_s, rss_mb,
                  recall_at(top, exact), qps, batch_ms)
        log(f"  {row}")
        rows.append(row)
        ray.kill(router)
        shutil.rmtree(workdir / "index")
    shutil.rmtree(memory_dir)
    return rows, flat_equal


def key_choices(data: Dataset, args, exact: np.ndarray) -> list[dict]:
    """Key kind x compression on the flattened dataset: own top-10 recall and recall after exact re-score of L."""
    faiss.omp_set_num_threads(args.threads)
    memory = data.memory_of(np.arange(len(data.keys)))  # (N, n_mem, d) float16
    nlist = nlist_for(len(data.keys))
    choices = [
        (KeyKind.FLAT_MEMORY, "Flat"),
        (KeyKind.FLAT_MEMORY, f"IVF{nlist},PQ256x4fs"),
        (KeyKind.MEAN_POOLED, "Flat"),
        (KeyKind.MEAN_POOLED, f"IVF{nlist},PQ64x4fs"),
    ]
    query_memory = data.queries.reshape(len(data.queries), data.n_mem, data.hidden)
    exact_queries = query_keys_of(data)  # (Q, n_mem * d) unit rows: CLaRa's score is exact_queries @ keys.T
    out = []
    for kind, factory in choices:
        keys = data.keys if kind is KeyKind.FLAT_MEMORY else memory_keys(memory, kind)
        log(f"key choice {kind.value} / {factory}")
        index = train_and_add(keys, factory, MAX_TRAINING_KEYS)
        apply_search_params(index, SearchParams(nprobe=32))
        started = time.perf_counter()
        _, candidates = search_index(index, memory_keys(query_memory, kind), args.candidates, SearchParams(nprobe=32))
        qps = len(candidates) / (time.perf_counter() - started)
        # The trainer's exact re-score of the L candidates on their full memory vectors.
        rescored = np.empty(candidates.shape, dtype=np.float32)  # (Q, L) CLaRa's exact score of each candidate
        for start in range(0, len(candidates), 32):  # chunks: (32, L, 4096) float32 is 256 MB
            chunk = candidates[start : start + 32]
            rescored[start : start + 32] = np.einsum("qd,qld->ql", exact_queries[start : start + 32], data.keys[chunk])
        recall_rescored = {}
        for num in rescore_sizes(args):  # the index's top-`num` (a prefix of its top-L), re-scored exactly
            best = np.take_along_axis(candidates[:, :num], np.argsort(-rescored[:, :num], axis=1)[:, :10], axis=1)
            recall_rescored[num] = recall_at(best, exact)
        out.append({
            "key": kind.value, "factory": factory, "key_dim": keys.shape[1],
            "bytes_per_doc": index_bytes(index) / len(keys), "qps_at_L": qps,
            "recall_own": recall_at(candidates[:, :10], exact), "recall_rescored": recall_rescored,
        })
        log(f"  {out[-1]}")
        del index
    return out


def rescore_sizes(args) -> list[int]:
    return sorted({n for n in (16, 64, args.candidates) if 10 <= n <= args.candidates})


def render(args, rows: list[Row], equal: dict, keys: list[dict], wall_s: float, command: str) -> str:
    lines = [
        MARK_BEGIN,
        "## Sharded FAISS index (`benchmarks/index.py`)",
        "",
        (f"Command: `{command}` — {args.threads} CPU threads (faiss {faiss.__version__}), {time.strftime('%Y-%m-%d')}, "
        f"wall time {wall_s / 60:.1f} min. Clustered synthetic vectors (one centre per {args.docs_per_centre} documents, "
        f"noise 0.7), {args.queries} queries from the same mixture; exact = the single-process Flat index. "
        f"Actors: {args.shards} shard actors with {args.threads / args.shards:g} thread(s) each behind the router; "
        "their build time includes starting the actors, their memory is the actors' summed RSS (index in "
        "RAM, memory vectors memory-mapped)."),
        "",
        (f"| data | factory | where | search params | build s | index MB | recall@10 | queries/s (k=10) | "
         f"x Flat q/s | batch of {args.batch}, L={args.candidates} ms |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        flat = next(r for r in rows if r.dataset == row.dataset and r.factory == "Flat" and r.where == row.where)
        lines.append(
            f"| {row.dataset} | {row.factory} | {row.where} | {row.params} | {row.build_s:.1f} | {row.index_mb:.0f} | "
            f"{row.recall:.4f} | {row.qps:.1f} | {row.qps / flat.qps:.1f} | {row.batch_ms:.1f} |"
        )
    lines.append("")
    for dataset, same in equal.items():
        lines.append(f"- {dataset}: sharded Flat top-10 == single Flat top-10 for every query: **{same}**")
    for dataset in dict.fromkeys(r.dataset for r in rows):
        single = [r for r in rows if r.dataset == dataset and r.where == "1 process"]
        flat = next(r for r in single if r.factory == "Flat")
        good = [r for r in single if r.factory != "Flat" and r.recall >= 0.95]
        if good:
            best = max(good, key=lambda r: r.qps)
            lines.append(f"- {dataset}: fastest ANN with recall@10 >= 0.95: {best.factory} ({best.params}), recall "
                         f"{best.recall:.4f} at {best.qps:.0f} q/s = **{best.qps / flat.qps:.1f}x** Flat ({flat.qps:.1f} q/s)")
    if keys:
        lines += [
            "",
            (f"Key choices ({next(r.dataset for r in rows if 'flattened' in r.dataset)}, 1 process, "
             f"L={args.candidates}): recall@10 of CLaRa's exact top-10 in the index's own top-10, and after the "
             "trainer's exact re-score of the L candidates on their full memory vectors."),
            "",
            "| key | factory | key dims | index bytes/doc | queries/s (k=L) | recall@10 own ranking | "
            + " | ".join(f"after re-scoring L={n}" for n in rescore_sizes(args)) + " |",
            "|---|---|---|---|---|---|" + "---|" * len(rescore_sizes(args)),
        ]
        for k in keys:
            rescored = " | ".join(f"{k['recall_rescored'][n]:.4f}" for n in rescore_sizes(args))
            lines.append(f"| {k['key']} | {k['factory']} | {k['key_dim']} | {k['bytes_per_doc']:.0f} | {k['qps_at_L']:.1f} | "
                         f"{k['recall_own']:.4f} | {rescored} |")
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if MARK_BEGIN in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pooled-keys", type=int, default=1_000_000, help="keys of the 768-dim (pooled) dataset")
    parser.add_argument("--memory-keys", type=int, default=100_000, help="documents of the 8x512 (flattened) dataset")
    parser.add_argument("--docs-per-centre", type=int, default=250)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32, help="queries in one training batch")
    parser.add_argument("--candidates", type=int, default=512, help="L, candidates per training query")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-sharded", action="store_true", help="skip the Ray actor runs")
    parser.add_argument("--workdir", default=None, help="scratch space for memory shards and index versions")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    command = "python benchmarks/index.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    if not args.no_sharded:
        import ray

        ray.init(num_cpus=args.threads, include_dashboard=False)
    rows, equal, keys = [], {}, []
    workdir = Path(tempfile.mkdtemp(prefix="index-bench-", dir=args.workdir))
    try:
        for make in (pooled_dataset, flattened_dataset):
            data = make(args)
            log(f"{data.name}: {data.keys.shape} keys, {len(data.queries)} queries")
            single_rows, chosen, exact = run_single(data, args)
            rows += single_rows
            if not args.no_sharded:
                sharded_rows, equal[data.name] = run_sharded(data, args, chosen, exact, workdir)
                rows += sharded_rows
            if make is flattened_dataset:
                keys = key_choices(data, args, exact)
            del data
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    section = render(args, rows, equal, keys, time.perf_counter() - started, command)
    print(section)
    if not args.no_write:
        write_section(REPO / "BENCHMARKS.md", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
