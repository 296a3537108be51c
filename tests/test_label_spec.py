"""``LabelSpec``: the one reading of "top3" / "tabby,5" for the report, the CLI, the service and the
dataset jobs, checked against the classes a Classifier resolves by hand."""
import numpy as np
import pytest

from explainer.errors import InvalidParameterError, InvalidParameterTypeError, UnknownClassError
from explainer.model.labels import LabelSpec, top_indices


def test_top_k_is_the_most_probable_first_ties_in_class_order():
    probs = np.array([0.1, 0.3, 0.3, 0.05, 0.25], np.float32)
    assert top_indices(probs, 3) == [1, 2, 4]
    assert LabelSpec.parse("TOP2").indices(None, probs) == [1, 2]
    assert LabelSpec.parse(None).indices(None, probs) == [1]
    assert LabelSpec.parse("top9").indices(None, probs) == [1, 2, 4, 0, 3]  # at most K classes


def test_names_and_indices_resolve_through_the_classifier(default_net):
    spec = LabelSpec.parse("tabby, 285,tabby")
    assert spec.classes == ("tabby", 285)
    assert spec.indices(default_net.class_index) == [default_net.class_names.index("tabby"), 285]
    assert LabelSpec.parse([3, "goldfish"]).indices(default_net.class_index) == [3, 1]
    with pytest.raises(UnknownClassError, match="tabbby"):
        LabelSpec.parse("tabbby").indices(default_net.class_index)


@pytest.mark.parametrize("value, error", [("top0", InvalidParameterError), ({}, InvalidParameterTypeError),
                                          ([True], InvalidParameterTypeError), (2.5, InvalidParameterTypeError),
                                          ([], InvalidParameterTypeError)])
def test_bad_specs_are_refused_by_name(value, error):
    with pytest.raises(error, match="labels"):
        LabelSpec.parse(value)
