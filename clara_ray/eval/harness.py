"""The evaluation harness behind `clara-ray evaluate` and jobs/evaluate.py.

    evaluate(qa_path, QAFormat.CLARA_PRETRAIN, "eval/", [Method.BM25, Method.MINILM])
    evaluate(qa_path, QAFormat.JSONL, "eval/", list(Method), corpus_path=corpus,
             model=TrainedModel.from_run("runs/demo"))

Reads a QA set (``data/qa_formats.py``) and its corpus (the documents the QA file
embeds, or a corpus file read by ``formats.read_corpus``), ranks the corpus for each
question with every method, and scores:

- retrieval: Recall@k (a gold document among the top k) and MRR@k, for each k;
  only over questions with gold documents, and left out when none has any;
- answers, when a trained model is given: the generator reads the memory vectors of
  each method's top ``model.top_k`` documents and answers; EM, F1 (SQuAD
  normalisation) and cover-EM (``metrics.cover_exact_match``). Without a model the
  report says the results are retrieval only.

Methods: ``bm25`` and ``minilm`` (``baselines.py``), and ``clara``: the model's query
reasoner over a FAISS index of memory shards that the same model's compressor
encoded from this corpus (``clara-ray encode``, or a run's own ``memory/``). The
index is built once into ``<output>/index`` (``index/versions.py`` layout; memory
memory-mapped there) and reused by a rerun. Memory vectors are read by document id
from that index (``ShardMemory``), only for the documents a question retrieved:
the corpus's memory never sits in this process whole.

Output directory:
    report.md          a table per method, the counts of rows read and set aside
    recall_at_k.png    Recall@k against k, one line per method
    metrics.json       the summary this function returns (also printed as one JSON line)
    predictions.jsonl  per question and method: top ids, and the answer when generated
    documents.jsonl    the embedded documents as a corpus file (embedding formats only):
                       `clara-ray encode --input <it>` gives shards with the same ids
    quarantine/*.jsonl rows set aside, with reasons
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from clara_ray.data.corpus_rows import CorpusFormat
from clara_ray.data.formats import BadRowPolicy, Document, QAExample, read_corpus, write_corpus, write_quarantine
from clara_ray.data.qa_formats import QAFormat, read_qa_set
from clara_ray.errors import DataError, UserError
from clara_ray.eval import baselines
from clara_ray.eval.metrics import mean_cover_exact_match, mean_exact_match, mean_f1, mrr_at_k, recall_at_k
from clara_ray.index.shard import IndexShard
from clara_ray.index.versions import IndexSettings, build_version, find_version, publish

DEFAULT_KS = (1, 2, 5, 10, 20)


class Method(str, enum.Enum):
    BM25 = "bm25"
    MINILM = "minilm"
    CLARA = "clara"


@dataclass(frozen=True)
class TrainedModel:
    """A trained model and the memory shards its compressor encoded from the corpus."""

    model_dir: Path
    memory_dir: Path
    question_max_len: int = 32
    answer_max_len: int = 32
    top_k: int = 1  # documents the generator reads
    num_candidates: int = 20  # the index proposes these; the query reasoner re-scores them exactly
    batch_size: int = 16

    @classmethod
    def from_run(cls, run_dir: str | Path) -> TrainedModel:
        """The final model of a finished `clara-ray demo` run, with its settings and memory."""
        from clara_ray.config import load_config

        run_dir = Path(run_dir)
        steps = run_dir / "steps"
        if not (run_dir / "config.yaml").exists() or not (steps / "stage3.json").exists():
            raise UserError(f"{run_dir} is not a finished run directory (no config.yaml or steps/stage3.json)")
        config = load_config(run_dir / "config.yaml", [])
        if not config.model.lengths_known:  # picked from the data when the run started
            config = config.with_lengths(json.loads((steps / "init.json").read_text())["lengths"])
        return cls(
            model_dir=Path(json.loads((steps / "stage3.json").read_text())["model_dir"]),
            memory_dir=run_dir / "memory",
            question_max_len=config.model.question_max_len,
            answer_max_len=config.model.answer_max_len,
            top_k=config.stage3.top_k,
            num_candidates=config.stage3.num_candidates,
            batch_size=config.eval.batch_size,
        )


class ShardMemory(Mapping):
    """doc_id -> memory (n_mem, d) float16, read from the memory-mapped index shard on demand."""

    def __init__(self, shard: IndexShard):
        self.shard = shard
        self.row_of = {doc_id: row for row, doc_id in enumerate(shard.doc_ids.tolist())}

    def __getitem__(self, doc_id: str) -> np.ndarray:
        row = self.row_of.get(doc_id)
        if row is None:
            raise DataError(
                f"document {doc_id!r} is not in the memory shards: encode this corpus with the model "
                "(clara-ray encode) and pass that directory as --memory"
            )
        _, memory = self.shard.fetch(np.array([row]))
        return memory[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self.row_of)

    def __len__(self) -> int:
        return len(self.row_of)


def open_index(memory_dir: Path, output_dir: Path, log: Callable[[str], None]) -> IndexShard:
    """A one-shard Flat index over the memory shards in ``<output>/index`` (built once, then reused)."""
    settings = IndexSettings(factory="Flat", num_shards=1)
    root = output_dir / "index"
    version = find_version(root, memory_dir, settings) if root.exists() else None
    if version is None:
        log(f"[evaluate] building an index of {memory_dir} in {root}")
        step = len(list(root.glob("v*"))) if root.exists() else 0
        version = build_version(memory_dir, root, step, settings)
        publish(version)
    return IndexShard.load(version / "shard-00000")


def _check_ks(ks: Sequence[int]) -> list[int]:
    if not ks or any(k < 1 for k in ks):
        raise UserError(f"k values must be positive integers, got {list(ks)}")
    return sorted(set(ks))


def _read_inputs(qa_path, qa_format, corpus_path, corpus_format, on_bad_row):
    qa_set = read_qa_set(qa_path, qa_format, on_bad_row)
    if corpus_path is not None:
        corpus = read_corpus(corpus_path, on_bad_row, corpus_format or CorpusFormat.JSONL)
    elif qa_set.documents is not None:
        corpus = qa_set.documents
    else:
        raise UserError(f"QA format {qa_format.value} keeps its documents in another file: pass --corpus")
    if not corpus.records:
        raise DataError("the corpus has no usable document")
    return qa_set, corpus


def _retrieval_scores(rankings: list[list[str]], questions: list[QAExample], ks: list[int]) -> dict[str, float]:
    gold = [q.gold_doc_ids for q in questions]
    if not any(gold):
        return {}
    scores = {}
    for k in ks:
        scores[f"recall@{k}"] = recall_at_k(rankings, gold, k)
        scores[f"mrr@{k}"] = mrr_at_k(rankings, gold, k)
    return scores


def _answer_scores(answers: list[str], questions: list[QAExample]) -> dict[str, float]:
    references = [q.answers for q in questions]
    return {
        "em": mean_exact_match(answers, references),
        "f1": mean_f1(answers, references),
        "cover_em": mean_cover_exact_match(answers, references),
    }


def evaluate(
    qa_path: str | Path,
    qa_format: QAFormat,
    output_dir: str | Path,
    methods: Sequence[Method],
    ks: Sequence[int] = DEFAULT_KS,
    corpus_path: str | Path | None = None,
    corpus_format: CorpusFormat | None = None,
    model: TrainedModel | None = None,
    generate: bool | None = None,
    on_bad_row: BadRowPolicy = BadRowPolicy.QUARANTINE,
    log: Callable[[str], None] = print,
) -> dict:
    """Score `methods` on a QA set; write the report into `output_dir`; return the summary.

    generate: answer with the model's generator (default: when a model is given).
    """
    methods = [Method(m) for m in dict.fromkeys(methods)]
    ks = _check_ks(ks)
    generate = model is not None if generate is None else generate
    if (generate or Method.CLARA in methods) and model is None:
        raise UserError("the clara method and generated answers need a trained model: pass --run, or --model-dir and --memory")
    started = time.time()
    output_dir = Path(output_dir)
    qa_set, corpus = _read_inputs(qa_path, qa_format, corpus_path, corpus_format, on_bad_row)
    questions, documents = qa_set.questions.records, corpus.records
    depth = min(ks[-1], len(documents))
    ks_used = [k for k in ks if k <= depth]
    log(f"[evaluate] {len(questions)} questions, {len(documents)} documents, methods {[m.value for m in methods]}")
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_inputs(output_dir, qa_set, corpus, corpus_path is None)

    loaded = _load_model(model, output_dir, log) if model is not None else None
    results: dict[str, dict] = {}
    predictions: dict[str, dict] = {}
    for method in methods:
        method_started = time.time()
        rankings = _rankings(method, documents, questions, depth, loaded, model)
        scores = _retrieval_scores(rankings, questions, ks_used)
        answers = None
        if generate:
            answers = _generate(loaded, model, questions, rankings, method)
            scores.update(_answer_scores(answers, questions))
        scores["seconds"] = round(time.time() - method_started, 2)
        results[method.value] = scores
        predictions[method.value] = {"rankings": rankings, "answers": answers}
        log(f"[evaluate] {method.value}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if k != "seconds"))

    summary = {
        "qa": str(qa_path),
        "format": qa_format.value,
        "corpus": str(corpus_path) if corpus_path is not None else "embedded in the QA file",
        "num_questions": len(questions),
        "num_questions_with_gold": sum(1 for q in questions if q.gold_doc_ids),
        "num_documents": len(documents),
        "ks": ks_used,
        "answers_generated": generate,
        "model_dir": str(model.model_dir) if model is not None else None,
        "results": results,
        "rows": {
            "qa": _counts(qa_set.questions),
            "corpus": _counts(corpus),
            "repeated_documents_merged": qa_set.num_repeated_documents if corpus_path is None else 0,
        },
        "seconds": round(time.time() - started, 2),
        "report": str(output_dir / "report.md"),
    }
    _write_predictions(output_dir / "predictions.jsonl", questions, predictions)
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    plot_recall(results, ks_used, output_dir / "recall_at_k.png")
    (output_dir / "report.md").write_text(report_markdown(summary))
    return summary


def _counts(result) -> dict[str, int]:
    return {"input": result.num_input_rows, "used": len(result.records), "quarantined": len(result.quarantined)}


def _write_inputs(output_dir: Path, qa_set, corpus, embedded: bool) -> None:
    if embedded:
        write_corpus(output_dir / "documents.jsonl", corpus.records)
    for name, result in (("qa", qa_set.questions), ("corpus", corpus)):
        if result.quarantined:
            write_quarantine(output_dir / "quarantine" / f"{name}.jsonl", result.quarantined)


@dataclass
class _Loaded:
    model: object
    tokenizer: object
    shard: IndexShard
    memory: ShardMemory


def _load_model(model: TrainedModel, output_dir: Path, log) -> _Loaded:
    from clara_ray.modeling.checkpoint import load_model

    for path, what in ((model.model_dir, "model directory"), (model.memory_dir, "memory-shard directory")):
        if not Path(path).is_dir():
            raise UserError(f"no such {what}: {path}")
    network, tokenizer, _ = load_model(model.model_dir)
    shard = open_index(Path(model.memory_dir), output_dir, log)
    return _Loaded(network.eval(), tokenizer, shard, ShardMemory(shard))


def _rankings(method: Method, documents: list[Document], questions: list[QAExample], depth: int,
              loaded: _Loaded | None, model: TrainedModel | None) -> list[list[str]]:
    texts = [q.question for q in questions]
    if method is Method.BM25:
        return baselines.bm25_rankings(documents, texts, depth)
    if method is Method.MINILM:
        return baselines.dense_rankings(documents, texts, depth)
    from clara_ray.eval.evaluate import query_reasoner_rankings

    num_candidates = min(max(depth, model.num_candidates), len(loaded.shard))
    rankings = query_reasoner_rankings(
        loaded.model, loaded.tokenizer, texts, loaded.shard.search, num_candidates,
        model.question_max_len, model.batch_size, progress=f"evaluate: retrieve ({method.value})",
    )
    return [ranking[:depth] for ranking in rankings]


def _generate(loaded: _Loaded, model: TrainedModel, questions: list[QAExample], rankings, method: Method) -> list[str]:
    from clara_ray.eval.evaluate import generate_answers

    return generate_answers(
        loaded.model, loaded.tokenizer, [q.question for q in questions], rankings, loaded.memory,
        model.top_k, model.question_max_len, model.answer_max_len, model.batch_size, progress=f"evaluate: answer ({method.value})",
    )


def _write_predictions(path: Path, questions: list[QAExample], predictions: dict[str, dict]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for index, question in enumerate(questions):
            row = {"id": question.id, "question": question.question, "answers": question.answers,
                   "gold_doc_ids": question.gold_doc_ids}
            for method, found in predictions.items():
                row[method] = {"top": found["rankings"][index][:5]}
                if found["answers"] is not None:
                    row[method]["answer"] = found["answers"][index]
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------
# Report


def plot_recall(results: dict[str, dict], ks: list[int], path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(6, 4))
    for method, scores in results.items():
        if f"recall@{ks[0]}" in scores:
            axis.plot(ks, [scores[f"recall@{k}"] for k in ks], "o-", label=method)
    axis.set(xlabel="k", ylabel="Recall@k", xscale="log", ylim=(0, 1.02), title="gold document in the top k")
    axis.set_xticks(ks, [str(k) for k in ks])
    if axis.get_legend_handles_labels()[0]:
        axis.legend()
    else:
        axis.text(0.5, 0.5, "no question has gold documents", ha="center", transform=axis.transAxes)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def report_markdown(summary: dict) -> str:
    ks, rows = summary["ks"], summary["rows"]
    lines = [
        "# Evaluation", "",
        f"QA set `{summary['qa']}` ({summary['format']}): {summary['num_questions']} questions, "
        f"{summary['num_questions_with_gold']} with gold documents; corpus: {summary['corpus']}, "
        f"{summary['num_documents']} documents.", "",
        f"Rows read: QA {rows['qa']['input']} in, {rows['qa']['used']} used, {rows['qa']['quarantined']} set aside; "
        f"corpus {rows['corpus']['input']} in, {rows['corpus']['used']} used, {rows['corpus']['quarantined']} set aside"
        + (f" ({rows['repeated_documents_merged']} repeated documents merged)" if rows["repeated_documents_merged"] else "")
        + " (reasons in quarantine/).", "",
    ]
    if not summary["answers_generated"]:
        lines += ["**Retrieval only**: no model was given, so no answers were generated.", ""]
    else:
        lines += [f"Answers: the generator of `{summary['model_dir']}` reading each method's top documents' memory.", ""]
    for method, scores in summary["results"].items():
        lines += [f"## {method}", ""]
        if f"recall@{ks[0]}" in scores:
            lines += ["| k | " + " | ".join(str(k) for k in ks) + " |", "|---|" + "---|" * len(ks)]
            for name in ("recall", "mrr"):
                lines.append(f"| {name.upper() if name == 'mrr' else 'Recall'}@k | "
                             + " | ".join(f"{scores[f'{name}@{k}']:.3f}" for k in ks) + " |")
        else:
            lines.append("No question has gold documents: no retrieval metrics.")
        if "em" in scores:
            lines += ["", f"EM {scores['em']:.3f}, F1 {scores['f1']:.3f}, cover-EM {scores['cover_em']:.3f}"]
        lines += ["", f"{scores['seconds']:.1f} s", ""]
    lines += ["![Recall@k](recall_at_k.png)", ""]
    return "\n".join(lines)
