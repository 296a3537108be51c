"""The plumbing the map methods share (``methods._common.MapMethod``): images and labels in, each map at
its image's size, the public shape out; and the one rule of the three registries (``explainer.registries``):
found by one scan, registered by a decorator, a duplicate refused with both places named."""
import numpy as np
import pytest

import explainer
from explainer.errors import InvalidParameterError, NonFiniteOutputError
from explainer.methods._common import MapMethod, resize_map

from graphs import linear_classifier


@pytest.fixture(scope="module")
def tiny():
    model, _ = linear_classifier(k=3, size=(8, 8))
    return explainer.load(model, preprocessing="none")


class Coarse(MapMethod):
    """A 2 x 2 map per label: the label's index, minus 1 (negative for label 0)."""

    where = "coarse"

    def explain(self, pixels, indices):
        self.seen.append(pixels.shape)
        return np.stack([np.full((2, 2), i - 1.0, np.float32) for i in indices])


def run(cls, net, image, label, **attributes):
    method = cls(net, seen=[], **attributes)
    return method(image, label), method


def test_one_image_one_label_is_h_w_at_the_image_size(tiny):
    image = np.zeros((12, 10, 3), np.uint8)
    out, method = run(Coarse, tiny, image, 2)
    assert out.shape == (12, 10) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, resize_map(np.full((1, 2, 2), 1.0, np.float32), (12, 10))[0])
    assert method.seen == [(12, 10, 3)] and method.options == {"seen": method.seen}


def test_several_labels_and_batches(tiny):
    image = np.zeros((8, 8, 3), np.uint8)
    assert run(Coarse, tiny, image, [0, 2])[0].shape == (2, 8, 8)
    assert run(Coarse, tiny, [image, image], 1)[0].shape == (2, 8, 8)  # stacked: one map per image
    assert run(Coarse, tiny, np.stack([image, image]), [0, 1])[0].shape == (2, 2, 8, 8)
    listed = run(Coarse, tiny, [image, np.zeros((6, 4, 3), np.uint8)], [0, 1])[0]
    assert isinstance(listed, list) and [m.shape for m in listed] == [(2, 8, 8), (2, 6, 4)]


def test_rectify_cuts_below_zero_and_upsample_false_keeps_the_map(tiny):
    image = np.zeros((8, 8, 3), np.uint8)

    class Rectified(Coarse):
        rectify = True

    class Sized(Coarse):
        upsample = False

    assert run(Coarse, tiny, image, 0)[0].min() < 0
    assert run(Rectified, tiny, image, 0)[0].min() == 0.0
    assert run(Sized, tiny, image, [0, 1])[0].shape == (2, 2, 2)


def test_class_agnostic_maps_repeat_per_label_and_setup_sees_the_call(tiny):
    class Agnostic(MapMethod):
        where, class_agnostic = "agnostic", True

        def setup(self, pixels, indices):
            self.calls = (len(pixels), list(indices))

        def explain_all(self, pixels, indices):  # the images at once
            return [np.full((1, 4, 4), float(k), np.float32) for k in range(len(pixels))]

    image = np.zeros((8, 8, 3), np.uint8)
    method = Agnostic(tiny)
    out = method([image, image], [0, 1, 2])
    assert out.shape == (2, 3, 8, 8) and method.calls == (2, [0, 1, 2])
    np.testing.assert_array_equal(out[1], np.ones((3, 8, 8), np.float32))


def test_labels_images_and_non_finite_maps_are_refused(tiny):
    image = np.zeros((8, 8, 3), np.uint8)

    class Broken(Coarse):
        def explain(self, pixels, indices):
            return np.full((len(indices), 2, 2), np.nan, np.float32)

    with pytest.raises(InvalidParameterError, match="coarse: label"):
        run(Coarse, tiny, image, 7)
    with pytest.raises(NonFiniteOutputError, match="coarse: the map contains NaN"):
        run(Broken, tiny, image, 0)


def test_every_map_method_but_deep_dream_uses_the_base():
    """Deep dream makes images, not maps of an image: it is no method and has no base."""
    import inspect

    for m in explainer.list_methods():
        module = inspect.getmodule(m.function)
        uses = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, MapMethod)
                and v is not MapMethod and v.__module__ == module.__name__] or \
            ("gradient_maps" in vars(module))  # the gradient methods, through _gradients.GradientMaps
        if m.name != "recipro_cam":  # written beside this refactor; it may join later
            assert uses, f"{m.name} does not use MapMethod"


def test_the_three_registries_refuse_a_duplicate_naming_both_places():
    import explainer.convert.passes as passes
    from explainer.convert import converters
    from explainer.methods.registry import GRADIENT, method

    explainer.list_methods()
    with pytest.raises(ValueError, match=r"method \(or alias\) named 'gradcam' is already registered "
                                         r"\(explainer/methods/gradcam\.py:\d+\); refused a second one \(.*test_method_base"):
        @method("gradcam", kind=GRADIENT, options={}, answers="-", returns="-", cost="-", reference="-")
        def again(net, image, label):
            pass

    passes._load_all()
    with pytest.raises(ValueError, match=r"pass named 'safe-names' is already registered \(explainer/convert/"
                                         r"names\.py:\d+\); refused a second one \(.*test_method_base"):
        @passes.register("safe-names")
        def safe_names_again(model, ctx):
            return 0

    op, version = next(k for k, v in converters.CONVERTERS.items() if v == "ours")
    with pytest.raises(ValueError, match=rf"converter for {op}-{version} is already registered \(explainer/"
                                         r"convert/converters/\w+\.py:\d+\); refused a second one"):
        @converters.register(op, version)
        def convert_again(node, graph):
            pass


def test_the_three_registries_are_found_by_one_scan():
    """Each registry imports the modules of its package (private ones and subpackages excepted)."""
    import sys
    from pathlib import Path

    import explainer.convert.passes as passes
    from explainer.methods import registry
    from explainer.registries import modules

    root = Path(explainer.__file__).parent
    registry.list_methods()
    passes._load_all()
    from explainer.convert import converters  # noqa: F401

    for package, folder in (("explainer.methods", root / "methods"), ("explainer.convert", root / "convert"),
                            ("explainer.convert.converters", root / "convert" / "converters")):
        found = modules(folder)
        assert found and all(f"{package}.{name}" in sys.modules for name in found), package
        assert not any(name.startswith("_") for name in found) and "converters" not in found
    assert registry.method_modules() == modules(root / "methods")
