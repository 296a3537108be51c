import json

import pytest

import explainer
from explainer.errors import InvalidParameterError, UnknownClassError

from graphs import linear_classifier


def _load(k=3, **kw):
    model, _ = linear_classifier(k=k)
    return model, kw


def test_default_names_for_unknown_k():
    model, _ = linear_classifier(k=3)
    assert explainer.load(model, preprocessing="none").class_names == ["class_0", "class_1", "class_2"]


def test_metadata_labels():
    model, _ = linear_classifier(k=3)
    model.metadata_props.add(key="labels", value=json.dumps(["cat", "dog", "fox"]))
    net = explainer.load(model, preprocessing="none")
    assert net.class_names == ["cat", "dog", "fox"]
    assert net.class_index("dog") == 1 and net.class_index(2) == 2


def test_text_and_json_files(tmp_path):
    model, _ = linear_classifier(k=3)
    (tmp_path / "l.txt").write_text("cat\ndog\nfox\n")
    (tmp_path / "l.json").write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))
    assert explainer.load(model, labels=tmp_path / "l.txt").class_names == ["cat", "dog", "fox"]
    assert explainer.load(model, labels=str(tmp_path / "l.json")).class_names == ["a", "b", "c"]


def test_label_count_mismatch_and_unknown_class():
    model, _ = linear_classifier(k=3)
    with pytest.raises(InvalidParameterError, match="2 labels .* 3 classes"):
        explainer.load(model, labels=["a", "b"])
    net = explainer.load(model, labels=["tabby", "tiger", "lynx"])
    with pytest.raises(UnknownClassError, match="'tabby'"):
        net.class_index("taby")
    with pytest.raises(UnknownClassError, match=r"\[0, 2\]"):
        net.class_index(3)


def test_imagenet_builtin(default_net):
    assert len(default_net.class_names) == 1000 and default_net.class_names[285] == "Egyptian cat"
