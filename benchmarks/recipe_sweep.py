"""Recipe sweep: the tiny trap-corpus recipe in one process, over many seeds at once.

    python benchmarks/recipe_sweep.py one --out r.json --n-mem 2 --seed 1        # one run
    python benchmarks/recipe_sweep.py sweep JOBS --parallel 16 --results DIR      # many runs
    python benchmarks/recipe_sweep.py summary DIR
    python benchmarks/recipe_sweep.py probe runs/demo/models/stage1              # diagnostics of a demo's model

A run is stage 1 -> encode -> stage 3 -> evaluate with the library's own model,
batches, objectives and metrics (clara_ray), but without Ray, DeepSpeed or FAISS:
one process, AdamW with DeepSpeed's WarmupCosineLR schedule, an exact search over
the whole corpus memory in place of the index. It exists because one demo takes
13 minutes of a 2-core machine while a recipe change must be judged over several
seeds: on one GPU, 20 runs side by side take about 4 minutes (start CUDA MPS,
``nvidia-cuda-mps-control -d``, so the processes' small kernels overlap).

JOBS holds one run per line: a name ending in ``_<seed>`` and that run's flags, e.g.
``n2_3 --seed 3 --s3-seed 3 --n-mem 2``; `summary` groups runs by the name before
the last underscore. Each run's JSON has the test Recall@1/5 and EM after stage 3,
the curve of test/train Recall@1, and two diagnostics that use gold labels for
measurement only: the generator's EM reading the gold document's memory (is stage
1 good enough?) and how often the untrained query reasoner's nearest gold-style
document is about the right person (is the memory name-matchable by cosine?).
Numbers from these runs differ from the Ray pipeline's (other batch order, one
process instead of two ZeRO workers) but follow the same recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clara_ray.config import ReconstructionOrder  # noqa: E402
from clara_ray.data.formats import Document  # noqa: E402
from clara_ray.data.trap import generate_trap_corpus  # noqa: E402
from clara_ray.eval.baselines import bm25_rankings  # noqa: E402
from clara_ray.eval.metrics import mean_exact_match, recall_at_k  # noqa: E402
from clara_ray.modeling.backbone import build_tiny, train_tokenizer  # noqa: E402
from clara_ray.modeling.checkpoint import load_model, save_model  # noqa: E402
from clara_ray.modeling.clara import ClaraModel, LoraSettings, Objective, Role  # noqa: E402
from clara_ray.modeling.text import (  # noqa: E402
    RECONSTRUCTION_PROMPT,
    decode_answers,
    question_prompt,
    tokenize_targets,
    tokenize_texts,
)
from clara_ray.modeling.topk import annealed_temperature  # noqa: E402
from clara_ray.training.batches import (  # noqa: E402
    Lengths,
    reconstruction_target,
    stage1_batch,
    stage1_examples,
    stage3_batch,
)
from clara_ray.training.engine import parameter_groups  # noqa: E402
from clara_ray.training.rivals import rival_documents  # noqa: E402

LENGTHS = Lengths(doc=32, question=32, answer=12, reconstruction=40)
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NAME = re.compile(r"[A-Z][a-z]{5} [A-Z][a-z]{5}")  # trap-corpus names: two 6-letter parts


def run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="JSON file for this run's results")
    parser.add_argument("--stage1-dir", help="start stage 3 from this model directory instead of training stage 1")
    parser.add_argument("--entities", type=int, default=160)
    parser.add_argument("--test-fraction", type=float, default=0.5)
    parser.add_argument("--n-mem", type=int, default=2, help="memory vectors per document (doc_max_len 32 / rate)")
    parser.add_argument("--seed", type=int, default=0, help="stage 1: model init and batches")
    parser.add_argument("--s1-steps", type=int, default=800)
    parser.add_argument("--s1-batch", type=int, default=32, help="2 workers x 16 in the demo")
    parser.add_argument("--s1-lr", type=float, default=1e-3)
    parser.add_argument("--hard-fraction", type=float, default=0.75)
    parser.add_argument("--rival-pool", type=int, default=8, help="rivals per training question (0 = none)")
    parser.add_argument("--rival-until", type=float, default=0.25,
                        help="rivals join the distractors for this fraction of stage-1 steps only")
    parser.add_argument("--save-stage1", help="write the stage-1 model directory here")
    parser.add_argument("--s3-seed", type=int, default=0)
    parser.add_argument("--s3-steps", type=int, default=600)
    parser.add_argument("--s3-batch", type=int, default=16, help="2 workers x 8 in the demo")
    parser.add_argument("--s3-lr", type=float, default=5e-4)
    parser.add_argument("--candidates", type=int, default=512, help="L")
    parser.add_argument("--s3-params", default="all",
                        help="query-reasoner parameters stage 3 trains: all, memory (memory tokens only), "
                             "or top:N (memory tokens + LoRA of the last N layers)")
    parser.add_argument("--s3-anchor", type=float, default=0.0,
                        help="weight of an L2 pull of the query reasoner's parameters towards their start "
                             "(retrieval gains included, unlike the pipeline's stage3.anchor_weight)")
    parser.add_argument("--s3-anchor-start", type=float, default=0.0,
                        help="the L2 pull starts after this fraction of the stage-3 steps")
    parser.add_argument("--s3-gain-lr", type=float, default=0.0,
                        help="learning rate of the query reasoner's retrieval gains (0: they stay at 1)")
    parser.add_argument("--s3-gain-start", type=float, default=0.0,
                        help="gains held at 1 for this fraction of the stage-3 steps "
                             "(the demo's stage3.retrieval_gain_start_fraction)")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--t0", type=float, default=0.1, help="initial top-k temperature")
    parser.add_argument("--t1", type=float, default=0.02, help="final top-k temperature")
    parser.add_argument("--cloze-batch", type=int, default=0,
                        help="stage 3: inverse-cloze examples per step (a word span of a corpus document "
                             "as the query, the whole document as the target; no labels)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """DeepSpeed's WarmupCosineLR ratio (log warm-up, floor 1e-4) for 0-based `step`."""
    warmup = max(2, warmup)
    if step < warmup:
        return math.log(step + 1) / math.log(warmup)
    return max(1e-4, 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def make_optimizer(params, learning_rate: float, total_steps: int):
    """`params`: parameters or optimizer groups (see clara_ray.training.engine.parameter_groups)."""
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, int(0.05 * total_steps))
    )
    return optimizer, schedule


def train_stage1(args, docs: dict[str, str], train, device):
    """A fresh tiny model trained on reconstruction + training QA, as `stage1_loop`."""
    torch.manual_seed(args.seed)
    texts = list(docs.values()) + [question_prompt(q.question) for q in train] + [RECONSTRUCTION_PROMPT]
    tokenizer = train_tokenizer(texts, 600)
    backbone = build_tiny(tokenizer, 256, 4, 4, 512, 512, args.seed)
    model = ClaraModel(backbone, args.n_mem, LoraSettings(32, 64, 0.0, LORA_MODULES)).to(device)
    corpus = [Document(i, t) for i, t in docs.items()]
    rivals = rival_documents(docs, train, args.rival_pool, args.seed) if args.rival_pool else None
    examples = stage1_examples(docs, train, bm25_rankings(corpus, [q.question for q in train], 9), rivals)
    model.set_trainable([Role.COMPRESSOR, Role.GENERATOR], backbone=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = make_optimizer(params, args.s1_lr, args.s1_steps)
    answer_pool = sorted({e.answer for e in examples if e.answer is not None})
    without_rivals = [dataclasses.replace(e, rivals=()) for e in examples]
    rng = random.Random(args.seed * 7919)
    order: list[int] = []
    for step in range(1, args.s1_steps + 1):
        if len(order) < args.s1_batch:
            epoch = list(range(len(examples)))
            random.Random(args.seed + step).shuffle(epoch)
            order += epoch
        rows, order = order[: args.s1_batch], order[args.s1_batch :]
        pool = examples if step <= args.rival_until * args.s1_steps else without_rivals
        batch = stage1_batch(
            [pool[i] for i in rows], list(docs.values()), 5, args.n_mem, tokenizer, LENGTHS, rng,
            ReconstructionOrder.REVERSED, 1.0, answer_pool, args.hard_fraction, 1,
        )
        out = model(Objective.COMPRESSOR_PRETRAINING, **{k: v.to(device) for k, v in batch.items()}, mse_weight=0.1)
        optimizer.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 200 == 0:
            print(f"stage1 step {step} loss {out['loss'].item():.3f}", flush=True)
    model.copy_adapter(Role.COMPRESSOR, Role.QUERY_REASONER)
    if args.save_stage1:
        save_model(model, tokenizer, args.save_stage1, "backbone", save_backbone=True)
    return model, tokenizer, out["loss"].item()


class Probe:
    """Corpus memory plus the evaluations, over one model."""

    def __init__(self, model, tokenizer, docs: dict[str, str], device):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.ids = list(docs)
        self.docs = docs
        self.position = {d: i for i, d in enumerate(self.ids)}
        model.eval()
        with torch.no_grad():
            chunks = []
            for start in range(0, len(self.ids), 256):
                tokens = tokenize_texts(tokenizer, [docs[i] for i in self.ids[start : start + 256]], LENGTHS.doc)
                chunks.append(model.encode(Role.COMPRESSOR, tokens.ids.to(device), tokens.mask.to(device))[0].float())
        self.memory = torch.cat(chunks)  # (N, n_mem, d)
        self.keys = F.normalize(self.memory.flatten(1), dim=-1)  # (N, n_mem * d)

    def query_memory(self, texts: list[str]) -> torch.Tensor:
        tokens = tokenize_texts(self.tokenizer, texts, LENGTHS.question)
        return self.model.encode(Role.QUERY_REASONER, tokens.ids.to(self.device), tokens.mask.to(self.device))[0]

    def search(self, texts: list[str], depth: int) -> torch.Tensor:
        with torch.no_grad():
            query = F.normalize(self.query_memory(texts).float().flatten(1), dim=-1)
            return (query @ self.keys.T).topk(depth, dim=-1).indices  # (B, depth)

    @torch.no_grad()
    def answers(self, questions: list[str], memory: torch.Tensor) -> list[str]:
        prompt = tokenize_texts(self.tokenizer, [question_prompt(q) for q in questions], LENGTHS.question)
        generated = self.model.generate(
            memory, prompt.ids.to(self.device), prompt.mask.to(self.device),
            max_new_tokens=LENGTHS.answer, eos_token_id=self.tokenizer.eos_token_id,
        )
        return decode_answers(self.tokenizer, generated.cpu())

    def evaluate(self, qa, with_answers: bool = False) -> dict:
        was_training = self.model.training
        self.model.eval()
        rankings, predictions = [], []
        for start in range(0, len(qa), 128):
            chunk = qa[start : start + 128]
            top = self.search([x.question for x in chunk], 5).tolist()
            rankings += [[self.ids[j] for j in row] for row in top]
            if with_answers:
                predictions += self.answers([x.question for x in chunk], self.memory[[row[0] for row in top]])
        self.model.train(was_training)
        gold = [list(x.gold_doc_ids) for x in qa]
        result = {"recall@1": recall_at_k(rankings, gold, 1), "recall@5": recall_at_k(rankings, gold, 5)}
        if with_answers:
            result["em"] = mean_exact_match(predictions, [list(x.answers) for x in qa])
        return result

    def oracle_em(self, qa) -> float:
        """EM of the generator reading each question's gold document (stage-1 quality)."""
        predictions = []
        for start in range(0, len(qa), 128):
            chunk = qa[start : start + 128]
            gold = self.memory[[self.position[x.gold_doc_ids[0]] for x in chunk]]
            predictions += self.answers([x.question for x in chunk], gold)
        return mean_exact_match(predictions, [list(x.answers) for x in qa])

    @torch.no_grad()
    def person_match(self, qa, gold_ids: list[str]) -> dict:
        """How often the nearest gold-style document (flattened, and per memory vector)
        is about the question's person: can cosine match names at all?"""
        gold = self.memory[[self.position[d] for d in gold_ids]]  # (G, n, d)
        query = torch.cat([self.query_memory([x.question for x in qa[s : s + 128]]).float() for s in range(0, len(qa), 128)])
        person = [NAME.search(x.question).group(0) for x in qa]

        def rate(q, g):
            top = (F.normalize(q, dim=-1) @ F.normalize(g, dim=-1).T).argmax(-1).tolist()
            return sum(NAME.search(self.docs[gold_ids[j]]).group(0) == p for j, p in zip(top, person)) / len(qa)

        return {"flat": rate(query.flatten(1), gold.flatten(1)),
                "per_vector": [rate(query[:, k], gold[:, k]) for k in range(query.shape[1])]}


def cloze_batch(probe: Probe, count: int, rng: random.Random) -> tuple[list[str], dict]:
    """Inverse-cloze examples: a random word span of a random document -> the whole
    document (word-reversed, as stage 1's reconstruction)."""
    queries, targets = [], []
    for index in rng.sample(range(len(probe.ids)), count):
        words = probe.docs[probe.ids[index]].split()
        length = max(1, round(len(words) * rng.uniform(0.3, 0.7)))
        start = rng.randrange(len(words) - length + 1)
        queries.append(" ".join(words[start : start + length]))
        targets.append(reconstruction_target(probe.docs[probe.ids[index]], ReconstructionOrder.REVERSED))
    tok = probe.tokenizer
    question = tokenize_texts(tok, queries, LENGTHS.question)
    prompt = tokenize_texts(tok, [RECONSTRUCTION_PROMPT] * count, LENGTHS.question)
    target = tokenize_targets(tok, targets, LENGTHS.reconstruction)
    batch = {"question_ids": question.ids, "question_mask": question.mask, "prompt_ids": prompt.ids,
             "prompt_mask": prompt.mask, "target_ids": target.ids, "target_mask": target.mask}
    return queries, batch


def train_stage3(args, probe: Probe, train, test, log: dict, device) -> None:
    model = probe.model
    torch.manual_seed(args.s3_seed)
    model.set_trainable([Role.QUERY_REASONER], backbone=False)
    if args.s3_params != "all":
        num_layers = model.lm.get_base_model().config.num_hidden_layers
        top = int(args.s3_params.split(":")[1]) if args.s3_params.startswith("top:") else 0
        for name, param in model.named_parameters():
            if param.requires_grad and not name.startswith(("memory_tokens.", "retrieval_gain.")):
                layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
                param.requires_grad_(layer >= num_layers - top)
        # ClaraModel.use() re-applies its trainable map on every role switch: keep it in step.
        model._trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params] if args.s3_anchor else []
    print(f"stage3 trains {sum(p.numel() for p in params)} parameters", flush=True)
    optimizer, schedule = make_optimizer(parameter_groups(model, args.s3_gain_lr), args.s3_lr, args.s3_steps)
    rng = random.Random(args.s3_seed)
    order: list[int] = []
    model.train()
    for step in range(1, args.s3_steps + 1):
        if len(order) < args.s3_batch:
            order += rng.sample(range(len(train)), len(train))
        rows, order = order[: args.s3_batch], order[args.s3_batch :]
        questions = [train[i].question for i in rows]
        batch = stage3_batch(questions, [train[i].answers[0] for i in rows], probe.tokenizer, LENGTHS)
        temperature = annealed_temperature(step, args.s3_steps, args.t0, args.t1)
        candidates = probe.search(questions, args.candidates)
        out = model(Objective.JOINT, **{k: v.to(device) for k, v in batch.items()},
                    candidate_memory=probe.memory[candidates], k=args.top_k, temperature=temperature)
        loss = out["loss"]
        if args.s3_anchor and step > round(args.s3_anchor_start * args.s3_steps):
            loss = loss + args.s3_anchor * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start))
        if args.cloze_batch:
            queries, cloze = cloze_batch(probe, args.cloze_batch, rng)
            found = probe.search(queries, args.candidates)
            loss = loss + model(Objective.JOINT, **{k: v.to(device) for k, v in cloze.items()},
                                candidate_memory=probe.memory[found], k=1, temperature=temperature)["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if args.s3_gain_lr > 0 and step <= round(args.s3_gain_start * args.s3_steps):
            optimizer.param_groups[-1]["lr"] = 0.0  # the schedule sets it again after the step
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.s3_steps:
            point = {"step": step, "loss": out["loss"].item(), "test_recall@1": probe.evaluate(test)["recall@1"],
                     "train_recall@1": probe.evaluate(train[::3])["recall@1"],
                     "gains": [round(g, 3) for g in model.retrieval_gain[Role.QUERY_REASONER.value].weight.exp().flatten().tolist()]}
            log["curve"].append(point)
            Path(args.out).write_text(json.dumps(log))  # a run cut short still leaves its curve
            print(f"stage3 {point}", flush=True)


def run_one(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    log: dict = {"args": vars(args), "device": str(device), "curve": []}
    corpus = generate_trap_corpus(args.entities, args.test_fraction, 0)
    docs = {d.id: d.text for d in corpus.documents}
    train, test = corpus.train_qa, corpus.test_qa
    if args.stage1_dir:
        model, tokenizer, _ = load_model(args.stage1_dir)
        model.to(device)
    else:
        model, tokenizer, log["stage1_loss"] = train_stage1(args, docs, train, device)
    log["stage1_seconds"] = time.time() - started
    probe = Probe(model, tokenizer, docs, device)
    gold_ids = sorted({x.gold_doc_ids[0] for x in train + test})
    log["oracle_em"] = probe.oracle_em(test)
    log["person_match_before"] = probe.person_match(test, gold_ids)
    log["before"] = probe.evaluate(test, with_answers=True)
    print(f"before stage 3: {log['before']} oracle EM {log['oracle_em']:.3f} person {log['person_match_before']}", flush=True)
    train_stage3(args, probe, train, test, log, device)
    log["after"] = probe.evaluate(test, with_answers=True)
    log["person_match_after"] = probe.person_match(test, gold_ids)
    log["seconds"] = time.time() - started
    print(f"after stage 3: {log['after']}", flush=True)
    Path(args.out).write_text(json.dumps(log))


def probe(model_dir: Path) -> None:
    """Person match and oracle EM of a saved model (e.g. runs/<run>/models/stage1 of
    a `clara-ray demo`), on the bundled trap corpus with its default settings."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    corpus = generate_trap_corpus(160, 0.5, 0)
    model, tokenizer, _ = load_model(model_dir)
    diagnostics = Probe(model.to(device), tokenizer, {d.id: d.text for d in corpus.documents}, device)
    gold_ids = sorted({x.gold_doc_ids[0] for x in corpus.train_qa + corpus.test_qa})
    result = {"person_match": diagnostics.person_match(corpus.test_qa, gold_ids),
              "oracle_em": diagnostics.oracle_em(corpus.test_qa)}
    print(json.dumps(result))


def sweep(jobs_file: Path, parallel: int, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    lines = [line.split() for line in jobs_file.read_text().splitlines() if line.strip() and not line.startswith("#")]

    def launch(job: list[str]) -> str:
        name, flags = job[0], job[1:]
        with open(results / f"{name}.log", "w") as log:
            code = subprocess.call([sys.executable, __file__, "one", "--out", str(results / f"{name}.json"), *flags],
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
    run_arguments(commands.add_parser("one", help="one run"))
    many = commands.add_parser("sweep", help="the runs of a jobs file, in parallel processes")
    many.add_argument("jobs", type=Path)
    many.add_argument("--parallel", type=int, default=2)
    many.add_argument("--results", type=Path, required=True)
    commands.add_parser("summary", help="group a results folder").add_argument("results", type=Path)
    commands.add_parser("probe", help="diagnostics of a model directory trained on the default trap corpus").add_argument(
        "model_dir", type=Path)
    args = parser.parse_args()
    if args.command == "one":
        run_one(args)
    elif args.command == "sweep":
        sweep(args.jobs, args.parallel, args.results)
    elif args.command == "probe":
        probe(args.model_dir)
    else:
        summary(args.results)


if __name__ == "__main__":
    main()
