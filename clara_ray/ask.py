"""Ask a finished run's model questions: `clara-ray ask "question" --run runs/<name>`.

    clara = Clara.load("runs/demo")
    answer = clara.ask("In which city was Wentam Jordra born?")
    answer.answer, [(d.doc_id, d.title, d.score) for d in answer.documents]

What a load reads from the run directory (layout: ``clara_ray/pipeline.py``):
    config.yaml                the run's config (top_k, num_candidates, batch size)
    steps/init.json            the token lengths the run picked from its data
    steps/stage3.json          the final model's directory; its absence means the run
                               has not finished, and loading refuses
    index/CURRENT, index/v*/   the live index version (``index/versions.py``), opened
                               here, in this process: FAISS keys in RAM, memory vectors
                               memory-mapped, so only the rows a question retrieves are read
    data/documents.arrow       the documents' titles and text (memory-mapped), for the previews

Retrieval is the evaluation's: the query reasoner's memory searches the index for
L = stage3.num_candidates documents, which are re-scored exactly on their memory
(``eval.evaluate.query_reasoner_rankings``); the generator answers from the memory
of the top k. The model's compressor must be the one that encoded the live index
version (their fingerprints must match), otherwise the scores would compare
vectors of two different encoders.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from clara_ray.errors import UserError

PREVIEW_CHARS = 160


class RunNotReady(UserError):
    """The run directory cannot be asked: missing, unfinished, or its index and model disagree."""


@dataclass(frozen=True)
class Retrieved:
    doc_id: str
    title: str | None
    score: float  # cosine of the question's and the document's memory (the exact re-score)
    text: str  # the start of the document's text (PREVIEW_CHARS)


@dataclass(frozen=True)
class Answer:
    question: str
    answer: str
    documents: list[Retrieved]  # best first; the generator read the first `top_k` of them

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------
# The run directory


def _read_step(run_dir: Path, name: str) -> dict | None:
    marker = run_dir / "steps" / f"{name}.json"
    return json.loads(marker.read_text()) if marker.exists() else None


def _final_model_dir(run_dir: Path) -> Path:
    stage3 = _read_step(run_dir, "stage3")
    if stage3 is None:
        raise RunNotReady(f"run not finished: stage 3 has not finished ({run_dir}/steps/stage3.json missing); "
                          "run the pipeline again to finish it")
    model_dir = Path(stage3["model_dir"])
    if not model_dir.is_absolute():
        model_dir = run_dir / model_dir
    if not model_dir.exists() and (run_dir / "models" / model_dir.name).exists():
        model_dir = run_dir / "models" / model_dir.name  # the run directory was moved since
    return model_dir


def _live_version(run_dir: Path) -> tuple[Path, dict]:
    from clara_ray.index.versions import current_version, read_version_manifest

    version = current_version(run_dir / "index")
    if version is None:
        raise RunNotReady(f"run not finished: {run_dir}/index has no live version (no CURRENT); "
                          "run the pipeline again to finish it")
    return version, read_version_manifest(version)


def check_same_compressor(model_fingerprint: str, index_fingerprint: str | None, version: Path) -> None:
    """The live index must hold memory the model's own compressor encoded."""
    if model_fingerprint != index_fingerprint:
        raise RunNotReady(
            f"the final model's compressor (fingerprint {model_fingerprint}) did not encode the live index "
            f"version {version} (fingerprint {index_fingerprint}): with a trainable compressor this means the "
            "final refresh did not finish; run the pipeline again to finish it (it re-encodes the corpus with "
            "the final compressor), or publish the version that compressor encoded"
        )


# ---------------------------------------------------------------------------
# The index, in this process


class LocalIndex:
    """A finished index version's shards, searched in this process (the same shards the
    run's Ray actors served): top-L ids, scores and memory, merged over shards exactly."""

    def __init__(self, version: Path, manifest: dict):
        from clara_ray.index.shard import IndexShard

        self.shards = [IndexShard.load(version / spec["dir"]) for spec in manifest["shards"]]
        self.first_rows = np.array([spec["first_row"] for spec in manifest["shards"]], dtype=np.int64)
        self.num_documents = manifest["num_documents"]

    def search(self, queries: np.ndarray, num_candidates: int):
        """Flattened query memory (B, n_mem * d) -> SearchResult of the top `num_candidates`."""
        from clara_ray.index.shard import merge_shard_results
        from clara_ray.training.candidates import SearchResult

        found = [shard.search_rows(queries, num_candidates) for shard in self.shards]
        scores, rows = merge_shard_results([f[0] for f in found], [f[1] for f in found], self.first_rows,
                                           num_candidates)  # (B, L) each, global rows
        owner = np.searchsorted(self.first_rows, rows, side="right") - 1  # (B, L) shard of each row
        doc_ids = np.empty(rows.shape, dtype=object)
        memory = None
        for i in np.unique(owner):
            mask = owner == i
            shard_ids, shard_memory = self.shards[i].fetch(rows[mask] - self.first_rows[i])
            if memory is None:
                memory = np.empty(rows.shape + shard_memory.shape[1:], dtype=shard_memory.dtype)  # (B, L, n, d)
            doc_ids[mask], memory[mask] = shard_ids, shard_memory
        return SearchResult(doc_ids, scores, memory)


class _RecordingSearch:
    """The search callable handed to ``query_reasoner_rankings``: it keeps each question's
    candidates' exact scores and the memory of every candidate, so the answers read the
    memory the search fetched and the scores are the ones the ranking sorted by."""

    def __init__(self, search: Callable):
        self.search = search
        self.scores: list[dict[str, float]] = []  # per question, in the order asked
        self.memory: dict[str, np.ndarray] = {}  # doc_id -> (n_mem, d) float16

    def __call__(self, queries: np.ndarray, num_candidates: int):
        from clara_ray.modeling.topk import retrieval_scores

        found = self.search(queries, num_candidates)
        # (B, 1, n_mem * d) flattens to the same (B, n_mem * d) the ranking scored
        scores = retrieval_scores(torch.from_numpy(queries).unsqueeze(1),
                                  torch.from_numpy(found.memory.astype(np.float32))).numpy()  # (B, L)
        for row in range(len(queries)):
            self.scores.append(dict(zip(found.doc_ids[row], scores[row].tolist())))
            self.memory.update(zip(found.doc_ids[row], found.memory[row]))
        return found


# ---------------------------------------------------------------------------
# The model


class Clara:
    """A finished run's final model and live index, ready to answer questions."""

    def __init__(self, run_dir: Path, config, model, tokenizer, index: LocalIndex):
        from clara_ray.training.tables import DOCUMENTS, read_table

        self.run_dir, self.config = run_dir, config
        self.model, self.tokenizer, self.index = model, tokenizer, index
        self.documents = read_table(run_dir / "data" / DOCUMENTS)  # memory-mapped id, text, title
        self._row_of: dict[str, int] | None = None

    @classmethod
    def load(cls, run_dir: str | Path, log: Callable[[str], None] = lambda message: None) -> Clara:
        """The final model and live index version of the finished run in `run_dir`.
        Raises RunNotReady (a UserError) when the run is missing or unfinished, or when
        the model's compressor did not encode the live index version."""
        from clara_ray.config import load_config
        from clara_ray.modeling.checkpoint import MANIFEST as MODEL_MANIFEST
        from clara_ray.modeling.checkpoint import load_model

        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise RunNotReady(f"{run_dir} is not a run directory (no config.yaml): "
                              "pass --run <output_dir>/<run.name> of a finished run")
        config = load_config(run_dir / "config.yaml")
        model_dir = _final_model_dir(run_dir)
        if not (model_dir / MODEL_MANIFEST).exists():
            raise RunNotReady(f"the final model {model_dir} is missing or incomplete (no {MODEL_MANIFEST})")
        if not config.model.lengths_known:  # picked from the data when the run started
            config = config.with_lengths(_read_step(run_dir, "init")["lengths"])
        version, manifest = _live_version(run_dir)
        model_fingerprint = json.loads((model_dir / MODEL_MANIFEST).read_text())["compressor_fingerprint"]
        check_same_compressor(model_fingerprint, manifest["source"]["model_fingerprint"], version)

        model, tokenizer, _ = load_model(model_dir)
        log(f"[ask] model {model_dir}, index {version} ({manifest['num_documents']} documents)")
        return cls(run_dir, config, model.eval(), tokenizer, LocalIndex(version, manifest))

    @property
    def top_k(self) -> int:
        return self.config.stage3.top_k

    def ask(self, question: str, k: int | None = None) -> Answer:
        return self.ask_batch([question], k)[0]

    def ask_batch(self, questions: Sequence[str], k: int | None = None) -> list[Answer]:
        """Answer each question from its top-`k` documents (default: the run's stage3.top_k);
        each answer lists those k documents, best first."""
        k = self.top_k if k is None else k
        if not 1 <= k <= self.index.num_documents:
            raise UserError(f"k must be in [1, {self.index.num_documents}], got {k}")
        batch_size = self.config.eval.batch_size
        answers = []
        for start in range(0, len(questions), batch_size):  # bounds the memory kept per chunk
            answers.extend(self._answer_chunk(list(questions[start : start + batch_size]), k))
        return answers

    def _rank(self, questions: list[str], num_candidates: int) -> tuple[list[list[str]], _RecordingSearch]:
        """The query reasoner's ranking of `num_candidates` documents per question (the evaluation's)."""
        from clara_ray.eval.evaluate import query_reasoner_rankings

        search = _RecordingSearch(self.index.search)
        rankings = query_reasoner_rankings(
            self.model, self.tokenizer, questions, search, num_candidates,
            self.config.model.question_max_len, self.config.eval.batch_size,
        )
        return rankings, search

    def num_candidates(self, k: int) -> int:
        """L: the run's stage3.num_candidates (at least k), capped at the corpus size."""
        return min(max(self.config.stage3.num_candidates, k), self.index.num_documents)

    def _answer_chunk(self, questions: list[str], k: int) -> list[Answer]:
        from clara_ray.eval.evaluate import generate_answers

        rankings, search = self._rank(questions, self.num_candidates(k))
        texts = generate_answers(
            self.model, self.tokenizer, questions, rankings, search.memory, k,
            self.config.model.question_max_len, self.config.model.answer_max_len, len(questions),
        )
        return [
            Answer(question, text, [self._retrieved(doc_id, scores[doc_id]) for doc_id in ranking[:k]])
            for question, text, ranking, scores in zip(questions, texts, rankings, search.scores)
        ]

    def _retrieved(self, doc_id: str, score: float) -> Retrieved:
        if self._row_of is None:
            self._row_of = {d: row for row, d in enumerate(self.documents.column("id").to_pylist())}
        row = self._row_of.get(doc_id)
        text = "" if row is None else self.documents.column("text")[row].as_py()
        title = None if row is None else self.documents.column("title")[row].as_py()
        if title is not None:
            text = text.removeprefix(f"{title}\n")  # documents.arrow holds what the compressor read
        return Retrieved(doc_id, title, score, text[:PREVIEW_CHARS])


# ---------------------------------------------------------------------------
# The command


def format_answer(answer: Answer) -> str:
    lines = [f"Q: {answer.question}", f"A: {answer.answer}"]
    for rank, document in enumerate(answer.documents, 1):
        title = f" {document.title!r}" if document.title else ""
        lines.append(f"  {rank}. {document.doc_id}{title}  score {document.score:.3f}  {document.text}")
    return "\n".join(lines)


def ask_command(run_dir: str, questions: list[str], k: int | None, as_json: bool) -> int:
    """`clara-ray ask`: print each answer and its ranked documents (or one JSON line per
    question); exit code 2 with one line on a user's mistake."""
    try:
        clara = Clara.load(run_dir, log=lambda message: print(message, file=sys.stderr))
        answers = clara.ask_batch(questions, k)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for answer in answers:
        print(json.dumps(answer.to_dict(), ensure_ascii=False) if as_json else format_answer(answer) + "\n")
    return 0
