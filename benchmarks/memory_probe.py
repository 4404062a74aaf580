"""Does a run's memory carry what stage 3 needs? Two probes of a finished stage 1.

    python benchmarks/memory_probe.py RUN_DIR [--questions 60] [--model models/stage1]

1. Retrieval spread: each test question is encoded by the stage-1 compressor (what
   the query reasoner starts stage 3 as) and scored against the run's encoded
   memory (`RUN_DIR/memory`) by the cosine of flattened memory vectors, as the
   index and stage 3 score them. Printed: the median gap between the top-1 and the
   64th candidate's cosine (stage 3's softmax divides it by temperature 0.02:
   a gap far below ~0.02 makes the top-k flat), and Recall@1/@5.
2. Does the generator read memory: for training questions, its answer loss given
   (a) the gold document, (b) the gold document of another question (on the
   bundled trap corpus: another person's fact), (c) a document no question has as
   gold (an echo or distractor), (d) up to two gold documents of other questions
   with the same answer (the trap corpus reuses answer values: another person's
   fact that states the right value), each alone. Printed: the median loss of each,
   how often the gold document gives the lowest loss of the six (a)-(c) drawn, and
   how often a same-value document (d) does at least as well as the gold one.
   Equal losses mean the generator answers without reading memory, and stage 3's
   loss then cannot tell a good candidate from a bad one; (d) as good as (a) means
   the loss rewards the value, not whose fact it is.

Measured (not timed); prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clara_ray.data.formats import read_corpus, read_qa  # noqa: E402
from clara_ray.index.keys import KeyKind, memory_keys, normalize_rows  # noqa: E402
from clara_ray.memory_shards import read_memory_shards  # noqa: E402
from clara_ray.modeling.checkpoint import load_model  # noqa: E402
from clara_ray.modeling.clara import Role  # noqa: E402
from clara_ray.modeling.text import Prompts, document_input, tokenize_targets, tokenize_texts  # noqa: E402

CANDIDATES = 64


def retrieval_spread(model, tokenizer, config: dict, run: Path) -> dict:
    shards = read_memory_shards(run / "memory")
    test = read_qa(run / "data" / "test_qa.jsonl").records
    position = {doc_id: i for i, doc_id in enumerate(shards.doc_ids)}
    queries = []
    for start in range(0, len(test), 32):
        chunk = test[start : start + 32]
        tokens = tokenize_texts(tokenizer, [q.question for q in chunk], config["model"]["question_max_len"])
        with torch.inference_mode():
            queries.append(model.encode(Role.COMPRESSOR, tokens.ids, tokens.mask)[0].float().numpy())
    # Cosine of flattened memory vectors, the stored fp16 memory: how stage 3 re-scores its candidates.
    scores = memory_keys(np.concatenate(queries), KeyKind.FLAT_MEMORY) @ normalize_rows(
        shards.memory.reshape(len(shards.doc_ids), -1)).T  # (Q, N)
    ranked = np.argsort(-scores, axis=1)[:, :CANDIDATES]
    top = np.take_along_axis(scores, ranked, axis=1)
    gold = [{position[d] for d in q.gold_doc_ids if d in position} for q in test]
    return {
        "test_questions": len(test),
        "top1_minus_top64_cosine": float(np.median(top[:, 0] - top[:, -1])),
        "top1_cosine": float(np.median(top[:, 0])),
        "recall_at_1": float(np.mean([bool(g & {int(r[0])}) for g, r in zip(gold, ranked)])),
        "recall_at_5": float(np.mean([bool(g & set(r[:5].tolist())) for g, r in zip(gold, ranked)])),
    }


def generator_reading(model, tokenizer, config: dict, run: Path, num_questions: int, seed: int) -> dict:
    documents = {d.id: document_input(d.text, d.title) for d in read_corpus(run / "data" / "corpus.jsonl").records}
    train = [q for q in read_qa(run / "data" / "train_qa.jsonl").records if q.gold_doc_ids]
    golds = sorted({d for q in train for d in q.gold_doc_ids})
    others = sorted(set(documents) - set(golds))
    prompts, lengths, rng = Prompts(tokenizer), config["model"], random.Random(seed)
    losses: dict[str, list[float]] = {"gold": [], "another_question_gold": [], "no_question_gold": [],
                                      "same_value_other_gold": []}
    by_answer: dict[str, set[str]] = {}
    for q in train:
        by_answer.setdefault(q.answers[0].strip().lower(), set()).update(q.gold_doc_ids)
    lowest = same_value_as_good = with_same_value = 0
    questions = rng.sample(train, min(num_questions, len(train)))
    for question in questions:
        gold = question.gold_doc_ids[0]
        drawn = [gold] + rng.sample([d for d in golds if d not in question.gold_doc_ids], 3)
        drawn += rng.sample(others, min(2, len(others)))
        same_value = sorted(by_answer[question.answers[0].strip().lower()] - set(question.gold_doc_ids))
        drawn += rng.sample(same_value, min(2, len(same_value)))
        tokens = tokenize_texts(tokenizer, [documents[d] for d in drawn], lengths["doc_max_len"], pad_to_max_length=True)
        prompt = tokenize_texts(tokenizer, [prompts.question(question.question)] * len(drawn), lengths["question_max_len"])
        target = tokenize_targets(tokenizer, [prompts.answer(question.answers[0])] * len(drawn), lengths["answer_max_len"])
        with torch.inference_mode():
            memory, _ = model.encode(Role.COMPRESSOR, tokens.ids, tokens.mask)
            loss = model.generator_losses(memory, prompt.ids, prompt.mask, target.ids, target.mask).tolist()
        losses["gold"].append(loss[0])
        losses["another_question_gold"] += loss[1:4]
        losses["no_question_gold"] += loss[4:6]
        losses["same_value_other_gold"] += loss[6:]
        lowest += loss[0] < min(loss[1:6])
        if loss[6:]:
            with_same_value += 1
            same_value_as_good += min(loss[6:]) <= loss[0]
    return {
        "train_questions": len(questions),
        **{f"answer_loss_{kind}": statistics.median(values) for kind, values in losses.items() if values},
        "gold_lowest_share": lowest / len(questions),
        "questions_with_a_same_value_document": with_same_value,
        "same_value_document_at_least_as_good_share": same_value_as_good / max(with_same_value, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--model", default="models/stage1", help="model directory, relative to the run directory")
    parser.add_argument("--questions", type=int, default=60, help="training questions for the generator probe")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import yaml

    config = yaml.safe_load((args.run_dir / "config.yaml").read_text())
    initial = json.loads((args.run_dir / "steps" / "init.json").read_text())
    config["model"].update({k: v for k, v in initial.get("lengths", {}).items() if k.endswith("_len")})  # as picked (older runs: in config.yaml)
    model, tokenizer, _ = load_model(args.run_dir / args.model)
    model.eval()
    result = {"run": str(args.run_dir), "model": args.model}
    result.update(retrieval_spread(model, tokenizer, config, args.run_dir))
    print(json.dumps(result), flush=True)
    result.update(generator_reading(model, tokenizer, config, args.run_dir, args.questions, args.seed))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
