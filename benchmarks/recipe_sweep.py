"""Recipe runs: the pipeline's recipe on the bundled trap corpus in one process, many at once.

    python benchmarks/recipe_sweep.py one --out r.json run.seed=1 stage3.num_candidates=32   # one run
    python benchmarks/recipe_sweep.py sweep JOBS --parallel 16 --results DIR                  # many runs
    python benchmarks/recipe_sweep.py summary DIR
    python benchmarks/recipe_sweep.py probe runs/demo/models/stage1       # diagnostics of a demo's model
    python benchmarks/recipe_sweep.py mistakes runs/demo/models/stage3    # where wrong top-1 documents go

A run reads the same config as `clara-ray demo` (``--config``, default
jobs/configs/tiny.yaml, plus ``key=value`` overrides) and runs stage 1 -> (stage 2)
-> encode -> stage 3 -> evaluate with the library's own settings objects, batches, step
functions, optimizer groups and schedule (``clara_ray.training.one_process``), but
without Ray, DeepSpeed or FAISS: one process, ``TorchUpdater``, an exact search over
the whole corpus memory (``ExactSearch``) in place of the index actors. A step takes
the examples that ``train.num_workers`` workers take together in the pipeline. It
exists because a demo takes 15 minutes of a 2-core machine while a recipe change
must be judged over several seeds: on one GPU, 20 runs side by side take a few
minutes (start CUDA MPS, ``nvidia-cuda-mps-control -d``, so their small kernels
overlap). It needs torch, transformers, peft, tokenizers, bm25s and pydantic only:
`sweep` is a plain process pool for a machine without Ray (such a GPU box); on a Ray
cluster, hyperparameter sweeps over stage 3 are `clara-ray sweep` (Ray Tune, ASHA).

JOBS holds one run per line: a name ending in ``_<seed>`` and that run's arguments,
e.g. ``k2_3 run.seed=3 stage3.top_k=2``; `summary` groups runs by the name before
the last underscore. Each run's JSON has test Recall@1/5 and EM before and after
stage 3, the curve of test/train Recall@1, and two diagnostics that use gold labels
for measurement only: the generator's EM reading the gold document's memory (is
stage 1 good enough?) and how often the untrained query reasoner's nearest
gold-style document is about the right person (can cosine match names at all?).
Numbers differ from the Ray pipeline's in the loss averaging (one mean over the
step's examples instead of a mean of per-worker means) and stage 1's random
choices (one random stream instead of one per worker).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clara_ray.config import Config, ReconstructionOrder, load_config, steps_for_counts  # noqa: E402
from clara_ray.data.lengths import choose_lengths  # noqa: E402
from clara_ray.data.trap import generate_trap_corpus  # noqa: E402
from clara_ray.eval.evaluate import decode_answers, generate_answers, query_reasoner_rankings, score  # noqa: E402
from clara_ray.modeling.checkpoint import load_model, save_model  # noqa: E402
from clara_ray.modeling.clara import Role  # noqa: E402
from clara_ray.modeling.initial import build_initial_model  # noqa: E402
from clara_ray.modeling.text import Prompts, document_input, tokenize_texts  # noqa: E402
from clara_ray.training.batches import prepare_stage1_examples, prepare_stage2_examples  # noqa: E402
from clara_ray.training.examples import QuestionBatch  # noqa: E402
from clara_ray.training.candidates import ExactSearch  # noqa: E402
from clara_ray.training.one_process import train_stage1, train_stage2, train_stage3  # noqa: E402
from clara_ray.training.settings import Stage1Settings, Stage2Settings, Stage3Settings, WorkerSettings  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml"
NAME = re.compile(r"[A-Z][a-z]{5,7} [A-Z][a-z]{5,7}")  # trap-corpus names: two parts of 2 syllables


class Probe:
    """The corpus encoded by one model's compressor, and evaluations over it."""

    def __init__(self, model, tokenizer, documents: dict[str, str], config: Config, device):
        self.model, self.tokenizer, self.config, self.device = model, tokenizer, config, device
        self.documents = documents
        self.ids = list(documents)
        self.position = {d: i for i, d in enumerate(self.ids)}
        model.eval()
        chunks = []
        with torch.no_grad():
            for start in range(0, len(self.ids), 256):
                texts = [documents[i] for i in self.ids[start : start + 256]]
                tokens = tokenize_texts(tokenizer, texts, config.model.doc_max_len)
                chunks.append(model.encode(Role.COMPRESSOR, tokens.ids.to(device), tokens.mask.to(device))[0].float().cpu())
        self.memory = torch.cat(chunks).numpy().astype(np.float16)  # (N, n_mem, d), as the memory shards store it
        self.source = ExactSearch(self.ids, self.memory)
        self.memory_of = dict(zip(self.ids, self.memory))

    def _rankings(self, qa) -> list[list[str]]:
        c = self.config
        return query_reasoner_rankings(
            self.model, self.tokenizer, [q.question for q in qa], lambda keys, depth: self.source.candidates(keys, depth),
            max(c.stage3.num_candidates, 5), c.model.question_max_len, c.eval.batch_size,
        )

    def _answers(self, qa, rankings) -> list[str]:
        c = self.config
        return generate_answers(
            self.model, self.tokenizer, [q.question for q in qa], rankings, self.memory_of, c.stage3.top_k,
            c.model.question_max_len, c.model.answer_max_len, c.eval.batch_size,
        )

    def evaluate(self, qa, with_answers: bool = False) -> dict:
        was_training = self.model.training
        self.model.eval()
        rankings = self._rankings(qa)
        answers = self._answers(qa, rankings) if with_answers else [""] * len(qa)
        self.model.train(was_training)
        result = score(rankings, answers, qa).as_dict()
        return result if with_answers else {k: result[k] for k in ("recall@1", "recall@5")}

    def oracle_em(self, qa) -> float:
        """EM of the generator reading each question's gold document (stage-1 quality)."""
        return score([list(q.gold_doc_ids) for q in qa], self._answers(qa, [list(q.gold_doc_ids) for q in qa]), qa).exact_match

    @torch.no_grad()
    def reconstruction(self, qa) -> dict:
        """Does the memory hold what a question needs? The generator reconstructs each
        question's gold document from its memory alone (greedy, the reconstruction
        prompt): the share whose subject's name, and whose answer, come back, and the
        share reconstructed word for word. A generator that cannot answer from gold
        memory (oracle EM) while the memory holds the answer has not learnt to read;
        one whose memory has lost it, to compress."""
        ids = [q.gold_doc_ids[0] for q in qa]
        prompt = tokenize_texts(self.tokenizer, [Prompts(self.tokenizer).reconstruction()] * len(ids), 16)
        texts = []
        for start in range(0, len(ids), 64):
            memory = torch.from_numpy(np.stack([self.memory_of[d] for d in ids[start:start + 64]]).astype(np.float32))
            rows = slice(start, start + 64)
            generated = self.model.generate(memory.to(self.device), prompt.ids[rows].to(self.device),
                                            prompt.mask[rows].to(self.device),
                                            max_new_tokens=self.config.model.reconstruction_max_len,
                                            eos_token_id=self.tokenizer.eos_token_id)
            texts += decode_answers(self.tokenizer, generated.cpu())
        if self.config.stage1.reconstruction_order == ReconstructionOrder.REVERSED:
            texts = [" ".join(reversed(t.split())) for t in texts]
        n = len(qa)
        return {"name": sum(NAME.search(q.question).group(0) in t for q, t in zip(qa, texts)) / n,
                "answer": sum(q.answers[0] in t for q, t in zip(qa, texts)) / n,
                "exact": sum(t.split() == self.documents[d].split() for d, t in zip(ids, texts)) / n}

    @torch.no_grad()
    def person_match(self, qa, gold_ids: list[str]) -> dict:
        """How often the nearest gold-style document (flattened, and per memory vector)
        is about the question's person: can cosine match names at all?"""
        gold = torch.from_numpy(self.memory[[self.position[d] for d in gold_ids]].astype(np.float32))  # (G, n, d)
        tokens = tokenize_texts(self.tokenizer, [q.question for q in qa], self.config.model.question_max_len)
        query = self.model.encode(Role.QUERY_REASONER, tokens.ids.to(self.device), tokens.mask.to(self.device))[0].float().cpu()
        person = [NAME.search(q.question).group(0) for q in qa]

        def rate(q, g):
            top = (F.normalize(q, dim=-1) @ F.normalize(g, dim=-1).T).argmax(-1).tolist()
            return sum(NAME.search(self.documents[gold_ids[j]]).group(0) == p for j, p in zip(top, person)) / len(qa)

        return {"flat": rate(query.flatten(1), gold.flatten(1)),
                "per_vector": [rate(query[:, k], gold[:, k]) for k in range(query.shape[1])]}


def _trap(config: Config):
    trap = config.data.trap
    corpus = generate_trap_corpus(trap.num_entities, trap.test_fraction, trap.seed, trap.family.value)
    return corpus, {d.id: document_input(d.text, d.title) for d in corpus.documents}


def run_one(args) -> None:
    config = load_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    log: dict = {"config": config.to_dict(), "overrides": args.overrides, "device": str(device), "curve": []}
    corpus, documents = _trap(config)
    train, test = corpus.train_qa, corpus.test_qa
    # steps given in epochs, counted as the pipeline counts them (one stage-1 example per document and per question)
    counts = {"stage1": len(documents) + len(train), "stage2": len(train), "stage3": len(train)}
    config = config.with_steps({stage: n for stage, (n, _) in steps_for_counts(config, counts).items()})
    if args.stage1_dir:
        model, tokenizer, _ = load_model(args.stage1_dir)
        model.to(device)
        config = config.with_lengths(choose_lengths(config.model, tokenizer, corpus.documents, train, test).lengths)
        worker = WorkerSettings.from_config(config)
    else:
        with tempfile.TemporaryDirectory() as init_dir:
            config = build_initial_model(config, corpus.documents, train, Path(init_dir), test).config
            model, tokenizer, manifest = load_model(init_dir)
        worker = WorkerSettings.from_config(config)
        model.to(device)
        s1 = config.stage1
        examples = prepare_stage1_examples(
            documents, train, s1.hard_distractor_fraction, s1.hard_distractor_pool, s1.rival_pool, config.run.seed
        )
        history = train_stage1(model, tokenizer, examples, list(documents.values()), Stage1Settings.from_config(config),
                               worker, workers=config.train.num_workers)
        log["stage1_loss"] = history[-1]["loss"]
        if config.stage2.enabled:
            examples = prepare_stage2_examples(documents, train, config.stage2.num_documents)
            history = train_stage2(model, tokenizer, examples, list(documents.values()),
                                   Stage2Settings.from_config(config), worker, workers=config.train.num_workers)
            log["stage2_loss"] = history[-1]["loss"]
        if args.save_stage1:
            save_model(model, tokenizer, args.save_stage1, "backbone", save_backbone=True)
    log["stage1_seconds"] = time.time() - started
    probe = Probe(model, tokenizer, documents, config, device)
    gold_ids = sorted({q.gold_doc_ids[0] for q in train + test})
    log["oracle_em"] = probe.oracle_em(test)
    log["person_match_before"] = probe.person_match(test, gold_ids)
    log["before"] = probe.evaluate(test, with_answers=True)
    print(f"before stage 3: {log['before']} oracle EM {log['oracle_em']:.3f} person {log['person_match_before']}", flush=True)

    settings = Stage3Settings.from_config(config)

    def on_window(metrics: dict) -> None:
        if metrics["step"] % args.eval_every and metrics["step"] != settings.steps:
            return
        point = {"step": metrics["step"], "loss": metrics["loss"], "test_recall@1": probe.evaluate(test)["recall@1"],
                 "train_recall@1": probe.evaluate(train[::3])["recall@1"],
                 "gains": [round(v, 3) for k, v in metrics.items() if k.startswith("retrieval_gain_")]}
        log["curve"].append(point)
        Path(args.out).write_text(json.dumps(log))  # a run cut short still leaves its curve
        print(f"stage3 {point}", flush=True)

    train_stage3(model, tokenizer, QuestionBatch.from_qa(train), probe.source, settings, worker,
                 workers=config.train.num_workers, on_window=on_window)
    log["after"] = probe.evaluate(test, with_answers=True)
    log["person_match_after"] = probe.person_match(test, gold_ids)
    log["seconds"] = time.time() - started
    print(f"after stage 3: {log['after']}", flush=True)
    Path(args.out).write_text(json.dumps(log))


def probe(model_dir: Path, config_path: Path | None, overrides: list[str]) -> None:
    """Person match, oracle EM and reconstruction of a saved model (e.g. runs/<run>/models/stage1 of
    a `clara-ray demo`), on the trap corpus of the config it was trained with."""
    config = load_config(config_path, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    corpus, documents = _trap(config)
    model, tokenizer, _ = load_model(model_dir)
    config = config.with_lengths(choose_lengths(config.model, tokenizer, corpus.documents, corpus.train_qa,
                                                corpus.test_qa).lengths)
    diagnostics = Probe(model.to(device), tokenizer, documents, config, device)
    gold_ids = sorted({q.gold_doc_ids[0] for q in corpus.train_qa + corpus.test_qa})
    result = {"person_match": diagnostics.person_match(corpus.test_qa, gold_ids),
              "oracle_em": diagnostics.oracle_em(corpus.test_qa),
              "reconstruction": diagnostics.reconstruction(corpus.test_qa)}
    print(json.dumps(result))


def mistakes(model_dir: Path, config_path: Path | None, overrides: list[str]) -> None:
    """Recall@1 per question wording and where wrong top-1 documents go (other / same person,
    gold-style / echo), on 240 training questions drawn with a fixed seed (a stride would
    follow the generator's order: every third question of the bundled corpus is one wording
    per relation) and on the test questions."""
    config = load_config(config_path, overrides)
    corpus, documents = _trap(config)
    model, tokenizer, _ = load_model(model_dir)
    config = config.with_lengths(choose_lengths(config.model, tokenizer, corpus.documents, corpus.train_qa,
                                                corpus.test_qa).lengths)
    probe = Probe(model, tokenizer, documents, config, torch.device("cpu"))
    gold = {q.gold_doc_ids[0] for q in corpus.train_qa + corpus.test_qa}
    train = [corpus.train_qa[i] for i in sorted(random.Random(0).sample(range(len(corpus.train_qa)), 240))]
    for split, qa in (("train", train), ("test", corpus.test_qa)):
        right, total, kinds = defaultdict(int), defaultdict(int), defaultdict(int)
        for q, ranking in zip(qa, probe._rankings(qa)):
            wording = " ".join(w for w in q.question.split() if w.islower())
            total[wording] += 1
            if ranking[0] == q.gold_doc_ids[0]:
                right[wording] += 1
                continue
            person = "same person" if NAME.search(q.question).group(0) in documents[ranking[0]] else "other person"
            kinds[f"{person} {'gold' if ranking[0] in gold else 'echo'}"] += 1
        print(json.dumps({"split": split, "recall@1": {k: f"{right[k]}/{total[k]}" for k in total},
                          "wrong top-1": dict(kinds)}))


def sweep(jobs_file: Path, parallel: int, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    lines = [line.split() for line in jobs_file.read_text().splitlines() if line.strip() and not line.startswith("#")]

    def launch(job: list[str]) -> str:
        name, arguments = job[0], job[1:]
        with open(results / f"{name}.log", "w") as log:
            code = subprocess.call([sys.executable, __file__, "one", "--out", str(results / f"{name}.json"), *arguments],
                                   stdout=log, stderr=subprocess.STDOUT)
        return f"{name} exit {code}"

    with ThreadPoolExecutor(parallel) as pool:
        for line in pool.map(launch, lines):
            print(line, flush=True)
    summary(results)


def summary(results: Path) -> None:
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(results.glob("*.json")):
        run = json.loads(path.read_text())
        if "after" not in run:  # cut short: its last curve point, marked
            last = run["curve"][-1]["test_recall@1"] if run["curve"] else float("nan")
            run["after"] = {"recall@1": last, "em": float("nan")}
            path = path.with_name(path.stem.rsplit("_", 1)[0] + "-unfinished_" + path.stem.rsplit("_", 1)[-1])
        groups[path.stem.rsplit("_", 1)[0]].append(run)
    print("group | runs | test R@1 mean (min-max) | each run R@1/EM | person match before stage 3 (flat)")
    for group, runs in groups.items():
        recall = [r["after"]["recall@1"] for r in runs]
        each = " ".join(f"{r['after']['recall@1']:.2f}/{r['after']['em']:.2f}" for r in runs)
        person = statistics.mean(r["person_match_before"]["flat"] for r in runs)
        print(f"{group} | {len(runs)} | {statistics.mean(recall):.3f} ({min(recall):.3f}-{max(recall):.3f}) | {each} | {person:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("one", help="one run")
    one.add_argument("--out", required=True, help="JSON file for this run's results")
    one.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    one.add_argument("--stage1-dir", help="start stage 3 from this model directory instead of training stage 1")
    one.add_argument("--save-stage1", help="write the stage-1 model directory here")
    one.add_argument("--eval-every", type=int, default=100, help="test/train Recall@1 every this many stage-3 steps")
    one.add_argument("--threads", type=int, default=1)
    one.add_argument("overrides", nargs="*", help="key=value config overrides, as for clara-ray demo")
    many = commands.add_parser("sweep", help="the runs of a jobs file, in parallel processes")
    many.add_argument("jobs", type=Path)
    many.add_argument("--parallel", type=int, default=2)
    many.add_argument("--results", type=Path, required=True)
    commands.add_parser("summary", help="group a results folder").add_argument("results", type=Path)
    inspect = commands.add_parser("probe", help="diagnostics of a model directory trained on a trap corpus")
    inspect.add_argument("model_dir", type=Path)
    inspect.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    inspect.add_argument("overrides", nargs="*")
    wrong = commands.add_parser("mistakes", help="where a trained model's wrong top-1 documents go")
    wrong.add_argument("model_dir", type=Path)
    wrong.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    wrong.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.command == "one":
        run_one(args)
    elif args.command == "sweep":
        sweep(args.jobs, args.parallel, args.results)
    elif args.command == "probe":
        probe(args.model_dir, args.config, args.overrides)
    elif args.command == "mistakes":
        mistakes(args.model_dir, args.config, args.overrides)
    else:
        summary(args.results)


if __name__ == "__main__":
    main()
