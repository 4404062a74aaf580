"""A write that is interrupted leaves nothing a reader takes for whole."""

import pytest

from clara_ray.data.formats import Document, read_corpus, write_corpus
from clara_ray.modeling import checkpoint
from clara_ray.modeling.checkpoint import load_model, save_model
from tests.tiny_model import make_model


class _Killed(Exception):
    pass


def test_model_overwritten_by_an_interrupted_save_is_not_loadable(tmp_path, monkeypatch):
    model, tokenizer = make_model()
    directory = save_model(model, tokenizer, tmp_path / "m", backbone_ref="tiny", save_backbone=True)
    load_model(directory)

    def killed(*args, **kwargs):
        raise _Killed

    monkeypatch.setattr(checkpoint, "save_file", killed)
    with pytest.raises(_Killed):
        save_model(model, tokenizer, directory, backbone_ref="tiny", save_backbone=True)
    with pytest.raises(FileNotFoundError, match="interrupted"):
        load_model(directory)


def test_interrupted_jsonl_write_leaves_the_old_file_whole(tmp_path):
    path = write_corpus(tmp_path / "corpus.jsonl", [Document("a", "first text")])

    def documents():
        yield Document("b", "second text")
        raise _Killed

    with pytest.raises(_Killed):
        write_corpus(path, documents())
    assert [d.id for d in read_corpus(path).records] == ["a"]
