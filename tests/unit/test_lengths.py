"""Token lengths picked from the data (clara_ray/data/lengths.py) and answers that do not fit."""

import pytest

from clara_ray.config import load_config
from clara_ray.data.formats import Document, QAExample
from clara_ray.data.lengths import LengthReport, choose_lengths, fit_answers
from clara_ray.data.trap import generate_trap_corpus
from clara_ray.modeling.backbone import train_tokenizer
from clara_ray.modeling.initial import build_initial_model
from clara_ray.modeling.text import Prompts, document_input


def _tokenizer(documents, qa, vocab_size=600):
    return train_tokenizer([document_input(d.text, d.title) for d in documents]
                           + [Prompts().question(q.question) for q in qa], vocab_size)


@pytest.fixture(scope="module")
def bundled():
    corpus = generate_trap_corpus(seed=0)
    return corpus, _tokenizer(corpus.documents, corpus.train_qa)


def test_auto_lengths_on_the_bundled_corpus_are_the_tuned_ones(bundled):
    corpus, tokenizer = bundled
    report = choose_lengths(load_config(None).model, tokenizer, corpus.documents, corpus.train_qa, corpus.test_qa)
    # The tiny preset's lengths before they were picked: 32 (2 memory vectors), answers 12, reconstruction 40.
    assert (report.doc_max_len, report.answer_max_len, report.reconstruction_max_len) == (32, 12, 40)
    assert report.question_max_len % 8 == 0 and report.questions.over == 0
    assert report.documents.over == report.answers.over == 0
    assert report.picked == ("doc_max_len", "question_max_len", "answer_max_len", "reconstruction_max_len")
    assert not report.warnings(0.05)
    assert LengthReport.from_dict(report.as_dict()) == report


def test_long_documents_get_more_memory_vectors_and_a_given_length_is_kept_and_warned_about():
    corpus = generate_trap_corpus(seed=0, family="wide")  # filler sentences: documents up to ~80 tokens
    tokenizer = _tokenizer(corpus.documents, corpus.train_qa)
    model = load_config(None).model
    report = choose_lengths(model, tokenizer, corpus.documents, corpus.train_qa, corpus.test_qa)
    assert report.doc_max_len % model.compression_rate == 0 and report.doc_max_len >= 64
    assert report.documents.quantile <= report.doc_max_len < report.documents.quantile + model.compression_rate
    assert report.documents.share_over <= 1 - model.length_coverage
    assert report.reconstruction_max_len == report.doc_max_len + 8

    given = load_config(None, ["model.doc_max_len=32"]).model
    report = choose_lengths(given, tokenizer, corpus.documents, corpus.train_qa, corpus.test_qa)
    assert report.doc_max_len == 32 and "doc_max_len" not in report.picked
    assert report.documents.share_over > 0.3
    (warning,) = report.warnings(0.05)
    assert "of documents are cut at model.doc_max_len=32 tokens" in warning
    assert any("model.doc_max_len = 32 [set]" in line for line in report.lines())


def test_no_auto_length_above_the_cap():
    documents = [Document(f"d{i}", " ".join(["word"] * (50 + i))) for i in range(20)]
    qa = [QAExample("q", "What?", ["a " * 100], ["d0"])]
    tokenizer = _tokenizer(documents, qa)
    model = load_config(None, ["model.max_auto_len=40"]).model
    report = choose_lengths(model, tokenizer, documents, qa)
    assert report.doc_max_len == 32 and report.answer_max_len == 40 and report.question_max_len <= 40
    assert report.documents.over == 20 and report.answers.over == 1


def test_answers_that_do_not_fit_are_set_aside_with_their_reason(bundled):
    _, tokenizer = bundled
    short, long = "baker", "baker and also a part-time surveyor of the northern valleys"
    train = [QAExample("t1", "Which job?", [short], ["a"]), QAExample("t2", "Which job?", [long], ["a"])]
    test = [QAExample("s1", "Which job?", [long, short], ["a"]), QAExample("s2", "Which job?", [long], ["a"])]
    limit = len(tokenizer(" " + short, add_special_tokens=False)["input_ids"]) + 1
    kept, set_aside = fit_answers(tokenizer, train, limit, training=True)
    assert [q.id for q in kept] == ["t1"] and [q.id for q, _ in set_aside] == ["t2"]
    assert f"model.answer_max_len is {limit}" in set_aside[0][1]
    kept, set_aside = fit_answers(tokenizer, test, limit, training=False)  # any answer that fits will do
    assert [q.id for q in kept] == ["s1"] and [q.id for q, _ in set_aside] == ["s2"]


@pytest.mark.parametrize("policy", ["quarantine", "truncate"])
def test_initial_model_applies_the_lengths_and_the_long_answer_policy(tmp_path, policy):
    corpus = generate_trap_corpus(num_entities=12, seed=1)
    long = QAExample("long", "Which job?", ["baker " * 30], [corpus.documents[0].id])
    config = load_config(None, ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
                                "model.tiny.intermediate_size=64", f"data.on_long_answer={policy}"])
    initial = build_initial_model(config, corpus.documents, [*corpus.train_qa, long], tmp_path / "init",
                                  [*corpus.test_qa, long])
    assert initial.config.model.lengths_known and initial.config.model.doc_max_len == 32
    if policy == "quarantine":
        assert [q.id for q, _ in initial.long_answers["train_qa"]] == ["long"]
        assert [q.id for q, _ in initial.long_answers["test_qa"]] == ["long"]
        assert long not in initial.train_qa and long not in initial.test_qa
        assert len(initial.train_qa) == len(corpus.train_qa)
    else:
        assert initial.long_answers == {"train_qa": [], "test_qa": []}
        assert long in initial.train_qa and long in initial.test_qa
