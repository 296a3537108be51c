"""Layer listing and activations, against onnxruntime run directly on the graph with the layer exposed."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import explainer
from explainer.errors import UnknownLayerError

from graphs import linear_classifier


def _direct_all(model: onnx.ModelProto, tensors: list[str], x: np.ndarray) -> list[np.ndarray]:
    """``tensors`` of input ``x`` from onnxruntime run directly on the graph, each exposed as an output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(list(tensors), {sess.get_inputs()[0].name: x})


def _direct(model: onnx.ModelProto, tensor: str, x: np.ndarray) -> np.ndarray:
    return _direct_all(model, [tensor], x)[0]


def test_tiny_graph_layers_and_activations_by_node_and_tensor_name():
    model, _ = linear_classifier(k=4, size=(8, 8))
    net = explainer.load(model, preprocessing="none")
    assert [(l.name, l.op_type, l.shape) for l in net.layers()] == [
        ("conv1", "Conv", (4, 8, 8)), ("relu1", "Relu", (4, 8, 8)), ("gap", "GlobalAveragePool", (4, 1, 1)),
        ("flatten", "Flatten", (4,))]
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    x = image.astype(np.float32).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(net.activations(image, "relu1"), _direct(model, "relu", x)[0], rtol=1e-6)
    np.testing.assert_allclose(net.activations(image, "relu"), _direct(model, "relu", x)[0], rtol=1e-6)
    flat = net.activations(image, "flatten")
    assert flat.shape == (4, 1, 1) and flat.dtype == np.float32


def test_googlenet_activations_batch(googlenet_graph):
    net = googlenet_graph
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(2)]
    last_inception = [l for l in net.layers() if l.op_type == "Concat"][-1]  # the light graph's names are n1..
    acts = net.activations(images, last_inception.name)
    assert acts.shape == (2, *last_inception.shape) == (2, 1024, 6, 6)  # the zoo graph pools by floor
    pixels, _ = net.prepare(images)
    x = net.to_model_input(pixels)
    from explainer.zoo.seeded import seeded_model

    np.testing.assert_allclose(acts[1], _direct(seeded_model("inception_v1"), last_inception.output,
                                                x[1:2])[0], rtol=1e-4, atol=1e-5)


def test_unknown_layer_lists_closest(default_net, chelsea):
    name = default_net.layers()[10].name
    with pytest.raises(UnknownLayerError, match="Closest: .*" + name[:8].replace(".", r"\.")):
        default_net.activations(chelsea, name[:-1] + "X")


def test_describe_layer_says_what_where_and_what_shape(default_net, chelsea):
    """Titles say what a layer is: its family's ordinal, op, shape (H x W x C, from its activations)
    and depth, counted from the graph itself."""
    convs = [n for n in default_net.model.graph.node if n.op_type == "Conv"]
    first, middle, last = convs[0], convs[len(convs) // 2], convs[-1]
    for node, position in ((first, "first conv layer"), (middle, f"conv layer {len(convs) // 2 + 1} of {len(convs)}"),
                           (last, "last conv layer")):
        c, h, w = default_net.activations(chelsea, node.name).shape
        text = default_net.describe_layer(node.name)
        assert text.startswith(f"{position} (Conv), {h}\u00d7{w}\u00d7{c}, "), text
        assert text.endswith("% deep")
    gemm = default_net.describe_layer("/_fc/Gemm")
    assert gemm.startswith("dense layer (Gemm), 1000") and gemm.endswith("100% deep")


@pytest.mark.parametrize("family,exporter,data_dependent", [("vit_tiny", "legacy-dynamic", False),
                                                            ("deit_tiny_distilled", "dynamo", False),
                                                            ("swin_timm", "legacy", True)])
def test_shapes_the_free_batch_hides_are_inferred_at_one_image_not_fetched(family, exporter, data_dependent,
                                                                           monkeypatch):
    """The batch passes compute Reshape targets from the input's Shape, so shape inference on the graph
    loses the per-image shapes after them (dozens of tensors of ViT-Tiny and DeiT, hundreds of Swin-T's).
    ``layers()`` infers them again with one image rather than fetching them all from one run (MobileNetV5-300M
    at 768 x 768 held more than 8 GB of attention tensors that way): what it still fetches is a few
    hundredths of their bytes (a class token's Expand) where nothing depends on the data; Swin's padding
    to whole windows does, and is measured as before. Every shape equals a direct onnxruntime run's."""
    import exports
    from explainer.graph import dims, infer_shapes

    net = explainer.load(exports.export(family, exporter))
    known = infer_shapes(net.model)
    lost = [n.output[0] for n in net.model.graph.node if n.output and n.op_type != "Constant"
            and (n.output[0] not in known or None in dims(known[n.output[0]])[1:])]
    assert len(lost) > 20
    fetched = []
    run = net.ort.run
    monkeypatch.setattr(net.ort, "run", lambda x, outputs, *a, **k: fetched.extend(outputs) or run(x, outputs, *a, **k))
    layers = {l.output: l.shape for l in net.layers()}
    x = np.zeros((1, *net.per_image_shape), np.float32)  # onnxruntime on one image, directly
    one = {n: v.shape for n, v in zip(lost, _direct_all(net.model, lost, x))}
    size = {name: int(np.prod(shape)) for name, shape in one.items()}
    share = sum(size[n] for n in fetched if n in size) / sum(size.values())
    assert data_dependent or share < 0.05, (share, fetched)
    for name in lost:
        if name in layers:
            assert layers[name] == tuple(one[name][1:]), name
