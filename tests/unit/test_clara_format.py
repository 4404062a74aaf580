import json

from clara_ray.data.clara_format import convert
from clara_ray.data.formats import BadRowPolicy, read_corpus, read_qa


def test_clara_rows_become_a_corpus_and_qa_files_split_by_document(tmp_path):
    rows = [{"data_type": "qa", "question": [f"Q{i}a?", f"Q{i}b?"], "answers": [f"A{i}a", f"A{i}b"],
             "docs": [f"Document {i}."]} for i in range(10)]
    lines = [json.dumps(row) for row in rows] + ["not json", json.dumps({"question": ["x"], "answers": [], "docs": ["d"]})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    counts = convert(tmp_path / "in.jsonl", tmp_path / "out", test_fraction=0.2, seed=0)
    assert counts == {"rows_in": 12, "rows_used": 10, "rows_skipped": 2, "documents": 10,
                      "train_questions": 16, "test_questions": 4}
    corpus = read_corpus(tmp_path / "out" / "corpus.jsonl", BadRowPolicy.FAIL).records
    train = read_qa(tmp_path / "out" / "train_qa.jsonl", BadRowPolicy.FAIL).records
    test = read_qa(tmp_path / "out" / "test_qa.jsonl", BadRowPolicy.FAIL).records
    texts = {d.id: d.text for d in corpus}
    for qa in train + test:  # gold = the row's document, whose number the question carries
        (gold,) = qa.gold_doc_ids
        assert texts[gold] == f"Document {qa.question[1:-2]}."
        assert qa.answers == [f"A{qa.question[1:-1]}"]
    assert not {q.gold_doc_ids[0] for q in train} & {q.gold_doc_ids[0] for q in test}
