"""The trained digits ViT fixture (tests/trained_vit.py): its ONNX file computes what the torch model
computes, and it learned the digits."""
import numpy as np
import pytest
import torch

import trained_vit
from trained_vit import digits_vit  # noqa: F401 (a fixture)

#: the held-out accuracy the recipe must keep (it reaches about 0.95; chance is 0.1)
ACCURACY_FLOOR = 0.9


def test_onnx_probabilities_equal_the_torch_model(digits_vit):  # noqa: F811
    _, _, pixels, _ = trained_vit.digits()
    pixels = pixels[:64]
    with torch.no_grad():
        expected = trained_vit.trained_model()(trained_vit.normalise(pixels)).softmax(dim=1).numpy()
    got = digits_vit.predict(pixels)
    assert got.shape == (64, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_it_learned_the_held_out_digits(digits_vit):  # noqa: F811
    _, _, pixels, labels = trained_vit.digits()
    assert len(labels) == 450 and set(labels.tolist()) == set(range(10))
    accuracy = float((digits_vit.predict(pixels).argmax(axis=1) == labels).mean())
    assert accuracy > ACCURACY_FLOOR, accuracy
    assert digits_vit.preprocessing.origin == "metadata"  # read from the file, not a default
    assert digits_vit.class_names == trained_vit.CLASS_NAMES
    assert digits_vit.input.size == (trained_vit.IMG_SIZE, trained_vit.IMG_SIZE)


@pytest.mark.long
def test_training_is_deterministic():
    """Training again (about half a minute of one core) gives the cached weights bit for bit: the file
    is keyed by its recipe alone, so the recipe must fix the weights (on one machine; other CPUs' kernels
    may round differently)."""
    model, info = trained_vit.train()
    cached = trained_vit.trained_model().state_dict()
    assert info["test_accuracy"] == trained_vit.training_info()["test_accuracy"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, cached[name]), name
