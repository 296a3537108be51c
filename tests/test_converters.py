"""Converters and conversion passes on tiny graphs built in code, each compared with onnxruntime at a
relative 1e-5 (and its gradient checked to reach the image): ranks and shapes that shape inference
loses, recorded shapes that are missing, stale or wrong, attributes honoured or refused by name,
auto_pad made explicit, and the ops whose onnx2torch converters computed another function."""
import inspect
import itertools

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import explainer
from explainer.convert.attributes import HONOURED, unhonoured
from explainer.errors import ConversionError
from explainer.graph import dims, infer_shapes, measured_dims
from explainer.runtime.torch_engine import convert_graph, torch_engine

from graphs import keras_batchnorm_classifier, rank_lost_classifier, single_op, with_recorded_shapes

TOLERANCE = 1e-5


def _ort(model, x):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x})


def _check(model, shape=None, *, seed=0, one_at_a_time=False, grad=True, image_shape=None, reference=None):
    """The converted module equals onnxruntime (on ``reference``, else the same model) on a random
    image (relative max error <= 1e-5) and passes a gradient back to it; returns the module."""
    shape = shape or [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    expected = _ort(reference or model, x)
    module, _ = convert_graph(model, "image", image_shape, one_at_a_time=one_at_a_time)
    image = torch.from_numpy(x).requires_grad_(grad)
    got = module(image)
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    for g, e in zip(got, expected):
        assert tuple(g.shape) == e.shape
        error = np.abs(g.detach().numpy() - e).max() / max(np.abs(e).max(), 1e-12)
        assert error <= TOLERANCE, error
    if grad:
        (got[0] * torch.linspace(-1, 1, got[0].numel()).reshape(got[0].shape)).sum().backward()
        assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    return module


def _rank(model, name):
    vi = infer_shapes(model).get(name)
    return len(dims(vi)) if vi is not None and vi.type.tensor_type.HasField("shape") else None


# --- 1. ranks and shapes from the graph's own run --------------------------------------------------

RANK_READERS = [("BatchNormalization", {"epsilon": 1e-3}), ("InstanceNormalization", {}),
                ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
                ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2]}),
                ("GlobalAveragePool", {}), ("GlobalMaxPool", {})]


@pytest.mark.parametrize("op,attrs", RANK_READERS, ids=[op for op, _ in RANK_READERS])
def test_ops_after_a_rank_inference_loses(op, attrs):
    """LeViT, PoolFormer, Swin and EfficientViT exported at opset 11-13: a Reshape-13 with a computed
    target leaves every later tensor without a rank; onnx2torch's BatchNorm and pools raised "spatial
    rank == -2", its GlobalAveragePool averaged over batch and channels ("mat1 and mat2 shapes cannot
    be multiplied (1x1 and 768x1000)" at the head)."""
    model = rank_lost_classifier(op, attrs)
    assert _rank(model, "lost") is None  # the precondition: inference lost the rank
    _check(model, [2, 3, 8, 8])
    net = explainer.load(model, preprocessing="none")
    assert torch_engine(net).max_relative_error <= TOLERANCE


def test_ops_after_a_pad_with_computed_pads():
    """A Pad whose pads are computed keeps the rank but loses every dim."""
    model = rank_lost_classifier("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, through="pad")
    assert _rank(model, "lost") == 4 and dims(infer_shapes(model)["lost"]) == [None] * 4
    _check(model, [2, 3, 8, 8])


@pytest.mark.parametrize("how", ["none", "wrong-rank", "stale"])
@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_recorded_shapes_do_not_matter(how, one_at_a_time):
    """Whatever value_info a file carries (none, of the wrong rank, of another size), the conversion
    reads none of it, even where the batch passes are left out and nothing else drops it."""
    clean = rank_lost_classifier("BatchNormalization", opset=17)
    clean.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    _check(with_recorded_shapes(clean, how), [1, 3, 8, 8], one_at_a_time=one_at_a_time, reference=clean)


def test_measured_dims_keep_the_batch_symbolic():
    """Shapes measured in onnxruntime where inference has none: at batch 1 and 2 when the batch is
    free, the dims that change with it None (a (N*H, W) reshape too); at the given size where the
    graph's own height and width are symbolic."""
    model = rank_lost_classifier("Relu")
    model.graph.node.insert(len(model.graph.node) - 3, helper.make_node("Flatten", ["normed"], ["rows"], axis=3))
    found = measured_dims(model, "image", ["lost", "rows", "logits"])
    assert found == {"lost": [None, 4, 8, 8], "rows": [None, 8], "logits": [None, 4]}
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    assert measured_dims(model, "image", ["lost"]) == {}
    assert measured_dims(model, "image", ["lost"], [None, 3, 8, 8]) == {"lost": [None, 4, 8, 8]}
    assert measured_dims(model, "image", ["lost"], [1, 3, 8, 8]) == {"lost": [1, 4, 8, 8]}


def test_converters_that_read_shapes_get_measured_ones(monkeypatch):
    """Where a converter reads its input's shape (``SHAPE_READERS``) and inference has none, the shape
    measured in onnxruntime is what it reads, the batch symbolic."""
    from explainer.convert import PassContext, converters, normalise
    from explainer.runtime import torch_engine as te

    model, _ = normalise(rank_lost_classifier("BatchNormalization"), "torch", "image", PassContext("image"))
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    monkeypatch.setattr(converters, "SHAPE_READERS", frozenset({"BatchNormalization"}))
    seen = {}
    with te._shapes_inferred_without_weights(model, model.graph.input[0].name, [1, 3, 8, 8]):
        seen = {vi.name: vi for vi in model.graph.value_info}
    shape = seen[bn.input[0]].type.tensor_type.shape.dim
    assert [d.dim_value or None for d in shape] == [None, 4, 8, 8] and shape[0].dim_param


def test_no_converter_in_use_reads_inferred_shapes():
    """Every onnx2torch converter still in the registry that reads ``graph.value_info`` is for an op in
    SHAPE_READERS (whose inputs get measured shapes); today there is none."""
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    from explainer.convert import converters

    readers = set()
    for key, fn in _CONVERTER_REGISTRY.items():
        module = inspect.getmodule(fn)
        if module.__name__.startswith("onnx2torch.") and "value_info" in inspect.getsource(fn):
            readers.add(key.operation_type)
    assert readers <= converters.SHAPE_READERS, readers


# --- 2. every attribute honoured or refused by name ------------------------------------------------

def test_keras_batchnorm_epsilon_is_honoured():
    """Keras' BatchNormalization epsilon (1e-3), kept as a node: the module uses it (with the variances
    here, 1e-5 instead would be off by far more than the tolerance)."""
    model = keras_batchnorm_classifier(epsilon=1e-3)
    module = _check(model, [2, 3, 8, 8])
    assert [m.epsilon for m in module.modules() if type(m).__name__ == "BatchNorm"] == [pytest.approx(1e-3)]
    other = keras_batchnorm_classifier(epsilon=1e-5)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert np.abs(_ort(model, x)[0] - _ort(other, x)[0]).max() > 100 * TOLERANCE * np.abs(_ort(model, x)[0]).max()


W3 = ("W", np.full((4, 3, 3, 3), 0.1, np.float32))
REFUSED = [  # (op, attributes, opset, initialisers, the attribute named)
    ("BatchNormalization", {"training_mode": 1}, 15, [(f"bn{i}", np.ones(3, np.float32)) for i in range(4)],
     "training_mode"),
    ("ConvTranspose", {"output_shape": [10, 10]}, 17, [("W", np.ones((3, 2, 3, 3), np.float32))], "output_shape"),
    ("AveragePool", {"kernel_shape": [3, 3], "dilations": [2, 2]}, 19, [], "dilations"),
    ("Selu", {"alpha": 2.0}, 17, [], "alpha"),
    ("LRN", {"size": 4}, 17, [], "size"),
    ("Pad", {"mode": "wrap"}, 19, [("pads", np.ones(8, np.int64))], "mode"),
    ("Resize", {"coordinate_transformation_mode": "tf_crop_and_resize"}, 13,
     [("roi", np.zeros(0, np.float32)), ("scales", np.array([1, 1, 2, 2], np.float32))],
     "coordinate_transformation_mode"),
    ("LayerNormalization", {"stash_type": 0}, 17, [("scale", np.ones(8, np.float32))], "stash_type"),
    ("Conv", {"auto_pad": "SAME_UPPER"}, 17, [W3], "auto_pad"),  # stride 2 on an unknown size (below)
    # an odd total padding: asymmetric, which onnx2torch's ConvTranspose lacks
    ("ConvTranspose", {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 17, [("W", np.ones((3, 2, 3, 3), np.float32))],
     "auto_pad"),
]


@pytest.mark.parametrize("op,attrs,opset,inits,named", REFUSED, ids=[r[-1] + "-" + r[0] for r in REFUSED])
def test_unhonoured_attribute_is_refused_by_name(op, attrs, opset, inits, named):
    shape = [1, 3, 8, 8]
    if op == "Conv":  # an input size neither inference nor a run can tell: SAME at stride 2 stays
        attrs = {**attrs, "strides": [2, 2]}
        shape = [1, 3, "H", "W"]
    model = single_op(op, attrs, shape=shape, inits=inits, opset=opset)
    with pytest.raises(ConversionError, match=rf"'the_{op.lower()}' \({op}\) has {named}="):
        convert_graph(model, "image")


def test_unhonoured_attribute_refuses_gradient_methods_naming_the_node():
    model = keras_batchnorm_classifier()
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type = "Selu"  # torch's SELU has ONNX's default alpha only
    relu.attribute.append(helper.make_attribute("alpha", 2.0))
    net = explainer.load(model, preprocessing="none")
    with pytest.raises(ConversionError, match=r"'relu' \(Selu\) has alpha=2.0"):
        explainer.gradient_attribution(net, np.zeros((8, 8, 3), np.uint8), 0, verbose=False)


AT_DEFAULT = [("LeakyRelu", {"alpha": 0.01}, 17), ("Softmax", {"axis": -1}, 17), ("Softmax", {"axis": 1}, 11),
              ("Gelu", {"approximate": "none"}, 20), ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}, 17),
              ("Elu", {"alpha": 1.0}, 17), ("Flatten", {"axis": 1}, 17),
              ("Selu", {"alpha": 1.67326319217681884765625}, 17),
              ("MaxPool", {"kernel_shape": [2, 2], "auto_pad": "NOTSET", "storage_order": 0, "ceil_mode": 0}, 12),
              ("IsInf", {"detect_negative": 1, "detect_positive": 1}, 17), ("Cast", {"to": 1, "saturate": 1}, 19),
              ("Reshape", {"allowzero": 0}, 17), ("LayerNormalization", {"stash_type": 1, "epsilon": 1e-5}, 17)]


@pytest.mark.parametrize("op,attrs,opset", AT_DEFAULT, ids=[f"{a[0]}-{a[2]}" for a in AT_DEFAULT])
def test_attributes_at_their_default_pass(op, attrs, opset):
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    assert unhonoured(node, opset) is None


@pytest.mark.parametrize("op,attrs,opset,named", [
    ("IsInf", {"detect_negative": 0}, 17, "detect_negative"), ("GatherND", {"batch_dims": 1}, 13, "batch_dims"),
    ("Reshape", {"allowzero": 1}, 17, "allowzero"), ("TopK", {"k": 3}, 1, "k"),
    ("Cast", {"to": 1, "saturate": 0}, 19, "saturate"),
    ("QuantizeLinear", {"block_size": 2}, 21, "block_size"), ("Gelu", {"approximate": "erf"}, 20, "approximate")])
def test_unhonoured_values(op, attrs, opset, named):
    assert unhonoured(helper.make_node(op, ["x"], ["y"], **attrs), opset)[0] == named


def test_attribute_table_covers_every_converted_op():
    """Each op the registry converts that has attributes in some version is in HONOURED (an explicit {}
    where only defaults are honoured), and HONOURED names only attributes ONNX defines."""
    from onnx import defs
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    from explainer.convert import converters  # noqa: F401

    schemas = {}
    for s in defs.get_all_schemas_with_history():
        if s.domain in ("", "ai.onnx"):
            schemas.setdefault(s.name, set()).update(s.attributes)
    ops = {k.operation_type for k in _CONVERTER_REGISTRY if k.domain in ("", "ai.onnx")}
    assert not [op for op in ops if schemas.get(op) and op not in HONOURED]
    assert not {op: set(a) - schemas[op] for op, a in HONOURED.items() if set(a) - schemas[op]}


# --- 3. auto_pad made explicit ----------------------------------------------------------------------

CONV_CASES = [(mode, s, k, n, d) for mode, s, k, n, d in itertools.product(  # onnxruntime: no SAME with dilation
    ("SAME_UPPER", "SAME_LOWER", "VALID"), (1, 2), (2, 3, 5), (7, 8), (1, 2)) if d == 1 or (k == 3 and mode == "VALID")]


@pytest.mark.parametrize("mode,stride,kernel,size,dilation", CONV_CASES)
def test_conv_auto_pad(mode, stride, kernel, size, dilation):
    w = np.random.default_rng(1).standard_normal((4, 3, kernel, kernel)).astype(np.float32)
    model = single_op("Conv", {"auto_pad": mode, "strides": [stride] * 2, "dilations": [dilation] * 2},
                      shape=["N", 3, size, size], inits=[("W", w), ("B", np.arange(4, dtype=np.float32))])
    _check(model, [2, 3, size, size])


POOL_CASES = list(itertools.product(("MaxPool", "AveragePool0", "AveragePool1"), ("SAME_UPPER", "SAME_LOWER", "VALID"),
                                    (1, 2), (2, 3), (7, 8)))


@pytest.mark.parametrize("op,mode,stride,kernel,size", POOL_CASES)
def test_pool_auto_pad(op, mode, stride, kernel, size):
    attrs = {"auto_pad": mode, "strides": [stride] * 2, "kernel_shape": [kernel] * 2}
    if op.startswith("AveragePool"):
        attrs["count_include_pad"] = int(op[-1])
    model = single_op(op.rstrip("01"), attrs, shape=["N", 3, size, size])
    _check(model, [2, 3, size, size])


PADDED_POOL_CASES = list(itertools.product(("MaxPool", "AveragePool0", "AveragePool1"), (1, 2), (7, 8),
                                           ([0, 0, 1, 1], [1, 2, 1, 2], [2, 2, 2, 2]), (0, 1)))


@pytest.mark.parametrize("op,stride,size,pads,ceil", PADDED_POOL_CASES)
def test_pool_explicit_pads(op, stride, size, pads, ceil):
    """Pads asymmetric or over half the kernel, with and without ceil_mode (onnxruntime keeps a last
    window only where it starts before the end padding)."""
    attrs = {"kernel_shape": [3, 3], "strides": [stride] * 2, "pads": pads, "ceil_mode": ceil}
    if op.startswith("AveragePool"):
        attrs["count_include_pad"] = int(op[-1])
    _check(single_op(op.rstrip("01"), attrs, shape=["N", 3, size, size]), [2, 3, size, size])


@pytest.mark.parametrize("op", ["Conv", "MaxPool", "AveragePool"])
def test_auto_pad_at_opset_23(op):
    """jax2onnx's Flax exports: opset 23, SAME_UPPER, stride 2."""
    attrs = {"auto_pad": "SAME_UPPER", "strides": [2, 2]}
    inits = []
    if op == "Conv":
        inits = [("W", np.random.default_rng(2).standard_normal((4, 3, 3, 3)).astype(np.float32))]
    else:
        attrs["kernel_shape"] = [3, 3]
    _check(single_op(op, attrs, shape=[1, 3, 9, 9], inits=inits, opset=23), [1, 3, 9, 9])


def test_auto_pad_measures_sizes_inference_lost():
    """A SAME stride-2 convolution after a Pad whose pads are computed: inference knows the rank only,
    so the input's size is measured in onnxruntime."""
    model = rank_lost_classifier("Conv", {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, through="pad", size=(9, 9))
    _check(model, [2, 3, 9, 9])


def test_conv_transpose_auto_pad():
    w = np.random.default_rng(4).standard_normal((3, 2, 3, 3)).astype(np.float32)
    for mode in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        _check(single_op("ConvTranspose", {"auto_pad": mode}, shape=[1, 3, 6, 6], inits=[("W", w)]))


# --- ops whose onnx2torch converters computed another function ------------------------------------

@pytest.mark.parametrize("op,attrs,opset,shape", [
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [2, 2, 2, 2], "count_include_pad": 0}, 17, [1, 3, 8, 8]),
    ("MaxPool", {"kernel_shape": [2, 2], "pads": [1, 1, 1, 1], "strides": [2, 2]}, 17, [1, 3, 8, 8]),
    ("MaxPool", {"kernel_shape": [3, 3], "dilations": [2, 2], "ceil_mode": 1, "strides": [2, 2]}, 17, [1, 3, 10, 10]),
    ("AveragePool", {"kernel_shape": [3, 3], "ceil_mode": 1, "strides": [2, 2], "pads": [1, 1, 1, 1]}, 17,
     [1, 3, 8, 8]),
    ("Flatten", {"axis": 0}, 17, [2, 3, 4, 4]), ("Flatten", {"axis": -1}, 17, [2, 3, 4, 4]),
    ("GlobalMaxPool", {}, 17, [2, 3, 5, 5]), ("DepthToSpace", {"blocksize": 2}, 13, [1, 8, 3, 3]),
    ("DepthToSpace", {"blocksize": 2, "mode": "CRD"}, 13, [1, 8, 3, 3]), ("LRN", {"size": 3}, 17, [1, 6, 4, 4]),
])
def test_ops_match_onnxruntime(op, attrs, opset, shape):
    _check(single_op(op, attrs, shape=shape, opset=opset), shape)


def test_cumsum_default_is_forward():
    for attrs in ({}, {"reverse": 1}, {"exclusive": 1}, {"exclusive": 1, "reverse": 1}):
        _check(single_op("CumSum", attrs, shape=[1, 3, 4, 4], inits=[("axis", np.array(2, np.int64))]), [1, 3, 4, 4])


def test_split_18_num_outputs_over_an_uneven_length():
    _check(single_op("Split", {"axis": 2, "num_outputs": 3}, shape=[1, 3, 7, 4], opset=18, outputs=3))


@pytest.mark.parametrize("opset", [18, 21])
def test_group_normalization(opset):
    c = 4 if opset == 21 else 2
    rng = np.random.default_rng(5)
    inits = [("scale", rng.standard_normal(c).astype(np.float32)), ("bias", rng.standard_normal(c).astype(np.float32))]
    _check(single_op("GroupNormalization", {"num_groups": 2, "epsilon": 1e-3}, shape=[1, 4, 5, 5], inits=inits,
                     opset=opset))


RESIZE_CASES = [(mode, ctm, nearest, how) for mode, ctm, nearest, how in itertools.product(
    ("nearest", "linear", "cubic"),
    ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn"),
    ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"),
    ("up2", "down2", "sizes13x7", "scales1.5"))
    if (mode == "nearest" or nearest == "round_prefer_floor") and (ctm != "tf_half_pixel_for_nn" or mode == "nearest")]


@pytest.mark.parametrize("mode,ctm,nearest,how", RESIZE_CASES)
def test_resize(mode, ctm, nearest, how):
    attrs = {"mode": mode, "coordinate_transformation_mode": ctm, "nearest_mode": nearest}
    inits = [("roi", np.zeros(0, np.float32))]
    if how.startswith("sizes"):
        h, w = (int(v) for v in how[5:].split("x"))
        inits += [("scales", np.zeros(0, np.float32)), ("sizes", np.array([1, 3, h, w], np.int64))]
    else:
        factor = {"up2": 2.0, "down2": 0.5, "scales1.5": 1.5}[how]
        inits.append(("scales", np.array([1, 1, factor, factor], np.float32)))
    _check(single_op("Resize", attrs, shape=[1, 3, 6, 9], inits=inits, opset=13))


ANTIALIAS_CASES = list(itertools.product(
    ("linear", "cubic"), ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric"),
    (0, 1), ("down2", "down0.3x0.24", "up1.7x1.36", "sizes5x11", "sizes37x3")))


@pytest.mark.parametrize("mode,ctm,exclude,how", ANTIALIAS_CASES)
def test_resize_antialias(mode, ctm, exclude, how):
    """Resize-19 with antialias=1: onnxruntime's Pillow-style filter, shrinking (the kernel widened) and
    enlarging, every coordinate transformation, border weights moved in (exclude_outside=0) or dropped."""
    attrs = {"mode": mode, "coordinate_transformation_mode": ctm, "antialias": 1, "exclude_outside": exclude,
             "cubic_coeff_a": -0.5}
    inits = [("roi", np.zeros(0, np.float32))]
    if how.startswith("sizes"):
        h, w = (int(v) for v in how[5:].split("x"))
        inits += [("scales", np.zeros(0, np.float32)), ("sizes", np.array([1, 3, h, w], np.int64))]
    else:
        h, w = {"down2": (0.5, 0.5), "down0.3x0.24": (0.3, 0.24), "up1.7x1.36": (1.7, 1.36)}[how]
        inits.append(("scales", np.array([1, 1, h, w], np.float32)))
    _check(single_op("Resize", attrs, shape=[1, 3, 13, 17], inits=inits, opset=19))


def test_resize_antialias_is_torchs_interpolate():
    """The node torch's exporter writes for ``interpolate(..., mode='bicubic', antialias=True)`` (cubic,
    a = -0.5, exclude_outside=1, half_pixel; DINOv2's position table) and for bilinear: the converted
    module computes what torch computed, shrinking and enlarging."""
    x = np.random.default_rng(3).standard_normal((2, 4, 37, 29)).astype(np.float32)
    for mode, torch_mode, extra in (("cubic", "bicubic", {"cubic_coeff_a": -0.5}), ("linear", "bilinear", {})):
        for size in ((16, 11), (45, 60), (37, 12)):
            attrs = {"mode": mode, "antialias": 1, "exclude_outside": 1, **extra}
            inits = [("roi", np.zeros(0, np.float32)), ("scales", np.zeros(0, np.float32)),
                     ("sizes", np.array([2, 4, *size], np.int64))]
            module, _ = convert_graph(single_op("Resize", attrs, shape=list(x.shape), inits=inits, opset=18), "image")
            got = module(torch.from_numpy(x)).detach().numpy()
            expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode=torch_mode,
                                                       antialias=True, align_corners=False).numpy()
            assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max(), (mode, size)


_NO = ("roi", np.zeros(0, np.float32))
RESIZE_18_CASES = [  # (attributes, initialisers, shape): axes, the aspect-ratio policies, sizes that stay
    ({"axes": [2, 3]}, [_NO, ("scales", np.array([0.45, 2.2], np.float32))], [1, 2, 10, 9]),
    ({"axes": [-1, -2]}, [_NO, ("scales", np.zeros(0, np.float32)), ("sizes", np.array([4, 15], np.int64))], [1, 2, 10, 9]),
    ({"axes": [1, 2]}, [_NO, ("scales", np.array([0.5, 0.7], np.float32))], [1, 10, 9, 3]),
    ({"axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"},
     [_NO, ("scales", np.zeros(0, np.float32)), ("sizes", np.array([5, 7], np.int64))], [1, 2, 10, 9]),
    ({"axes": [2, 3], "keep_aspect_ratio_policy": "not_smaller"},
     [_NO, ("scales", np.zeros(0, np.float32)), ("sizes", np.array([5, 7], np.int64))], [1, 2, 10, 9]),
    ({"keep_aspect_ratio_policy": "not_larger"},
     [_NO, ("scales", np.zeros(0, np.float32)), ("sizes", np.array([1, 2, 23, 30], np.int64))], [1, 2, 10, 9]),
    ({"coordinate_transformation_mode": "half_pixel_symmetric"},
     [_NO, ("scales", np.array([1, 1, 0.6, 1.7], np.float32))], [1, 2, 10, 9]),
    ({}, [_NO, ("scales", np.array([1, 1, 1.05, 1.05], np.float32))], [1, 2, 7, 6]),  # no size changes: a copy
    ({}, [_NO, ("scales", np.array([1, 1, 1.2, 1.05], np.float32))], [1, 2, 7, 6]),  # W keeps its size, not its scale
    ({}, [_NO, ("scales", np.array([1.05, 1.05], np.float32))], [7, 6]),
    ({}, [_NO, ("scales", np.array([1, 1, 0.4, 0.6, 0.5], np.float32))], [1, 2, 10, 9, 8]),
]


RESIZE_18_PARAMS = [(mode, antialias, case) for mode in ("nearest", "linear", "cubic") for antialias in (0, 1)
                    for case, (_, _, shape) in enumerate(RESIZE_18_CASES)
                    # beyond onnxruntime's cubic: 5-D, and NHWC (axes 1, 2) without antialias
                    if not (mode == "cubic" and (len(shape) == 5 or shape[-1] == 3 and not antialias))]


@pytest.mark.parametrize("mode,antialias,case", RESIZE_18_PARAMS)
def test_resize_18_attributes(mode, antialias, case):
    """``axes``, ``keep_aspect_ratio_policy`` and ``half_pixel_symmetric`` as onnxruntime computes them.
    antialias is ignored for nearest, as the spec says (onnxruntime refuses that node: the reference is
    the same node without it)."""
    attrs, inits, shape = RESIZE_18_CASES[case]
    model = single_op("Resize", {**attrs, "mode": mode, "antialias": antialias}, shape=shape, inits=inits, opset=19)
    reference = single_op("Resize", {**attrs, "mode": mode}, shape=shape, inits=inits, opset=19) \
        if mode == "nearest" else None
    _check(model, shape, reference=reference)


@pytest.mark.parametrize("opset", [10, 19])
def test_resize_other_versions(opset):
    inits = [("scales", np.array([1, 1, 2, 0.5], np.float32))] if opset == 10 else \
        [("roi", np.zeros(0, np.float32)), ("scales", np.array([1, 1, 2, 0.5], np.float32))]
    _check(single_op("Resize", {"mode": "nearest"}, shape=[1, 3, 6, 8], inits=inits, opset=opset))


_RNG = np.random.default_rng(6)
IMG = [1, 3, 4, 4]


def _f(*shape):
    return _RNG.standard_normal(shape).astype(np.float32)


def _i(*values):
    return np.array(values, np.int64)


_PADS = ("pads", _i(0, 0, 1, 2, 0, 0, 2, 1))
_NO_ROI = ("roi", np.zeros(0, np.float32))
HONOURED_CASES = [  # (op, attributes at values other than their defaults, opset, initialisers, shape)
    ("Softmax", {"axis": 2}, 11, [], IMG), ("Softmax", {"axis": 1}, 11, [], IMG),
    ("LogSoftmax", {"axis": 2}, 11, [], IMG), ("Softmax", {"axis": 2}, 13, [], IMG),
    ("LeakyRelu", {"alpha": 0.3}, 17, [], IMG), ("Elu", {"alpha": 0.5}, 17, [], IMG),
    ("Celu", {"alpha": 0.5}, 17, [], IMG), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, 17, [], IMG),
    ("Gelu", {"approximate": "tanh"}, 20, [], IMG), ("Selu", {}, 17, [], IMG),
    ("Pad", {"mode": "reflect"}, 17, [_PADS], IMG), ("Pad", {"mode": "edge"}, 17, [_PADS], IMG),
    ("Pad", {"mode": "constant"}, 17, [_PADS, ("v", np.array(1.5, np.float32))], IMG),
    ("InstanceNormalization", {"epsilon": 0.3}, 17, [("s", _f(3)), ("b", _f(3))], IMG),
    ("LayerNormalization", {"axis": 2, "epsilon": 0.1}, 17, [("s", _f(4, 4))], IMG),
    ("ReduceMax", {"axes": [-2, -1], "keepdims": 0}, 13, [], IMG),
    ("ReduceMin", {"axes": [-1, 1], "keepdims": 0}, 13, [], IMG),
    ("ReduceMean", {"axes": [-2, -1], "keepdims": 0}, 13, [], IMG),
    ("ReduceMax", {"keepdims": 0}, 18, [("ax", _i(-2, -1))], IMG),
    ("ReduceSum", {"keepdims": 0}, 13, [("ax", _i(-2, -1))], IMG),
    ("Flatten", {"axis": 3}, 17, [], IMG), ("Concat", {"axis": -1}, 17, [("c", _f(1, 3, 4, 2))], IMG),
    ("Split", {"axis": -1}, 13, [("sp", _i(1, 3))], IMG), ("Split", {"axis": 1, "split": [1, 2]}, 11, [], IMG),
    ("Transpose", {"perm": [0, 2, 3, 1]}, 17, [], IMG),
    ("LRN", {"size": 5, "alpha": 0.01, "beta": 0.5, "bias": 2.0}, 17, [], [1, 6, 4, 4]),
    ("Gemm", {"alpha": 0.5, "beta": 2.0, "transB": 1}, 17, [("B", _f(5, 4)), ("C", _f(5))], [3, 4]),
    ("Gemm", {"alpha": 0.5, "beta": 2.0, "transA": 1}, 17, [("B", _f(3, 5)), ("C", _f(5))], [3, 4]),
    ("Gemm", {"alpha": 0.5, "beta": 2.0}, 17, [("B", _f(4, 5)), ("C", _f(3, 5))], [3, 4]),
    ("CumSum", {"exclusive": 1}, 17, [("ax", np.array(-1, np.int64))], IMG),
    ("Clip", {}, 17, [("lo", np.array(-0.5, np.float32)), ("hi", np.array(0.5, np.float32))], IMG),
    ("DepthToSpace", {"blocksize": 2, "mode": "DCR"}, 13, [], [2, 8, 3, 2]),
    ("Resize", {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, 13,
     [_NO_ROI, ("sc", np.zeros(0, np.float32)), ("sz", _i(1, 3, 7, 9))], IMG),
    ("Resize", {"mode": "cubic", "cubic_coeff_a": -0.5, "exclude_outside": 1}, 13,
     [_NO_ROI, ("sc", np.array([1, 1, 2, 2], np.float32))], IMG),
    ("Resize", {"mode": "linear"}, 13, [_NO_ROI, ("sc", np.array([1, 1, 1, 1], np.float32))], IMG),
    ("Resize", {"mode": "linear"}, 11, [_NO_ROI, ("sc", np.array([1, 1, 2.5, 0.7], np.float32))], IMG),
    ("GatherElements", {"axis": 2}, 13, [("i", _RNG.integers(0, 4, (1, 3, 2, 4)).astype(np.int64))], IMG),
    ("Gather", {"axis": -1}, 13, [("i", _i(3, 0, 1))], IMG),
]


@pytest.mark.parametrize("op,attrs,opset,inits,shape", HONOURED_CASES,
                         ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(HONOURED_CASES)])
def test_honoured_attributes_match_onnxruntime(op, attrs, opset, inits, shape):
    """Attributes the table says are honoured, at values other than their defaults (ReduceMax/Min/Prod
    with keepdims=0 over negative axes were not: onnx2torch shifted them after removing one)."""
    model = single_op(op, attrs, shape=shape, inits=inits, opset=opset, outputs=2 if op == "Split" else 1)
    assert unhonoured(model.graph.node[0], opset) is None
    _check(model, shape)


def test_a_mask_computed_from_the_image_is_off_the_gradient_path():
    """HF ViT's dynamo export masks attention as Where(IsNaN(p), 0, p): IsNaN has no gradient but its
    mask only selects; the values, and the gradient, flow through Where's other inputs."""
    from graphs import linear_classifier

    model, reference = linear_classifier(k=3)
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    relu = next(n for n in g.node if n.op_type == "Relu")
    at = list(g.node).index(relu) + 1
    g.node.insert(at, helper.make_node("IsNaN", ["relu"], ["nan"], name="is_nan"))
    g.node.insert(at + 1, helper.make_node("Where", ["nan", "zero", "relu"], ["masked"], name="mask"))
    next(n for n in g.node if n.op_type == "GlobalAveragePool").input[0] = "masked"
    net = explainer.load(model, preprocessing="none")
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    saliency = explainer.gradient_attribution(net, image, 0, verbose=False)
    assert saliency.shape == (8, 8) and np.abs(saliency).sum() > 0


# --- what gradient methods rest on, against numbers computed by hand --------------------------------

def _forward_backward(model, x, upstream):
    """The module the library converts ``model`` into (``convert_graph``: its passes and converters),
    run forward on ``x`` and backward from ``upstream``: (output, d sum(output * upstream) / d x)."""
    module, _ = convert_graph(model, "image")
    image = torch.from_numpy(x).requires_grad_(True)
    out = module(image)
    (out * torch.from_numpy(upstream)).sum().backward()
    return out.detach().numpy().astype(np.float64), image.grad.numpy().astype(np.float64)


def test_batchnorm_epsilon_forward_and_backward_hand_computed():
    """A BatchNormalization node kept in the graph (exports fold it into the convolution, so no real
    model of the quick suite has one) with epsilon 0.1 and running variances of 1e-3..1e-2: epsilon
    changes the result several-fold, so a converter that drops it or uses torch's 1e-5 fails. Forward
    against onnxruntime and (x - mean) / sqrt(var + eps) * scale + bias; backward against
    scale / sqrt(var + eps)."""
    rng = np.random.default_rng(11)
    c = 4
    scale, bias = rng.uniform(0.5, 2.0, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    mean, var = rng.standard_normal(c).astype(np.float32), rng.uniform(1e-3, 1e-2, c).astype(np.float32)
    model = single_op("BatchNormalization", {"epsilon": 0.1}, shape=[2, c, 5, 5], opset=15,
                      inits=[("scale", scale), ("bias", bias), ("mean", mean), ("var", var)])
    x = rng.standard_normal((2, c, 5, 5)).astype(np.float32)
    upstream = rng.standard_normal((2, c, 5, 5)).astype(np.float32)
    out, grad = _forward_backward(model, x, upstream)
    per_channel = lambda v: v.astype(np.float64)[None, :, None, None]  # noqa: E731
    expected = (x - per_channel(mean)) / np.sqrt(per_channel(var) + 0.1) * per_channel(scale) + per_channel(bias)
    assert np.abs(expected - ((x - per_channel(mean)) / np.sqrt(per_channel(var) + 1e-5) * per_channel(scale)
                              + per_channel(bias))).max() > 1.0  # epsilon matters here
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, _ort(model, x)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, upstream * per_channel(scale) / np.sqrt(per_channel(var) + 0.1), rtol=1e-5)
    # and in a classifier the library loads: the engine's check against onnxruntime passes, and the
    # pixel gradient equals torch autograd through the formula written out
    net = explainer.load(keras_batchnorm_classifier(epsilon=0.1), preprocessing="none")
    image = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    from explainer.methods.gradients import pixel_attributions

    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()).double()
               for t in net.source_model.graph.initializer}
    xt = torch.from_numpy(image.astype(np.float64).transpose(2, 0, 1)[None]).requires_grad_(True)
    conv = torch.nn.functional.conv2d(xt, weights["W"], padding=1)
    v = lambda name: weights[name][None, :, None, None]  # noqa: E731
    bn = (conv - v("mean")) / torch.sqrt(v("var") + 0.1) * v("scale") + v("bias")
    logits = torch.relu(bn).mean(dim=(2, 3))[0]
    np.testing.assert_allclose(net.logits(image), logits.detach().numpy(), rtol=1e-5, atol=1e-6)
    label = int(torch.argmax(logits))
    expected_grad = torch.autograd.grad(logits[label], xt)[0].numpy()
    np.testing.assert_allclose(pixel_attributions(net, image, label), expected_grad, rtol=1e-4,
                               atol=1e-5 * np.abs(expected_grad).max())


def test_relu_backward_masks_negative_inputs():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    upstream = rng.standard_normal(x.shape).astype(np.float32)
    out, grad = _forward_backward(single_op("Relu", shape=[2, 3, 6, 6]), x, upstream)
    assert 0.3 < (x > 0).mean() < 0.7
    np.testing.assert_array_equal(out, np.maximum(x, 0))
    np.testing.assert_array_equal(grad, np.where(x > 0, upstream, 0.0))


@pytest.mark.parametrize("low,high", [(0.0, 6.0), (-0.5, 0.5)], ids=["relu6", "clip"])
def test_clip_backward_is_zero_outside_the_bounds(low, high):
    """Clip(0, 6) is ReLU6 (split by a pass into ReLU + ReLU6 so that guided backpropagation sees the
    ReLU); either way, and for other bounds, the gradient passes inside [low, high] only."""
    rng = np.random.default_rng(13)
    x = rng.uniform(low - (high - low), high + (high - low), (2, 3, 6, 6)).astype(np.float32)
    upstream = rng.standard_normal(x.shape).astype(np.float32)
    model = single_op("Clip", shape=[2, 3, 6, 6], inits=[("lo", np.array(low, np.float32)),
                                                         ("hi", np.array(high, np.float32))])
    out, grad = _forward_backward(model, x, upstream)
    assert (x < low).any() and (x > high).any() and ((x > low) & (x < high)).any()
    np.testing.assert_array_equal(out, np.clip(x, low, high))
    np.testing.assert_array_equal(grad, np.where((x > low) & (x < high), upstream, 0.0))


SLICES = [([1, -3], [1000, -1], [1, 3], [1, 1]), ([5, 0], [-1000, 10], [2, 3], [-1, 2]), ([-1], [-1000], [0], [-2]),
          ([2, 1], [4, 3], None, None), ([3], [0], [-1], [-1]), ([0, 1], [2, 2 ** 62], [2, -1], [1, 2]), ([7], [3], [1], [1])]


@pytest.mark.parametrize("opset", [10, 13])
@pytest.mark.parametrize("starts,ends,axes,steps", SLICES)
def test_slice_equals_onnxruntime_without_warnings(opset, starts, ends, axes, steps):
    """Slice with clamped, negative and huge bounds, negative steps, axes omitted: equal to onnxruntime,
    and no warning (onnx2torch's list-of-slices indexing warns on every call; torch will refuse it)."""
    import warnings

    import onnx2torch
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from explainer.convert import converters  # noqa: F401  (ours in onnx2torch's registry)

    names = ["x", "s", "e"] + (["a"] if axes is not None else []) + (["st"] if steps is not None else [])
    values = [starts, ends] + ([axes] if axes is not None else []) + ([steps] if steps is not None else [])
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in zip(names[1:], values)]
    graph = helper.make_graph([helper.make_node("Slice", names, ["y"], name="slice")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 7, 8, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    x = np.random.default_rng(0).standard_normal((6, 7, 8, 9)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = onnx2torch.convert(model)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, expected)


# --- ScatterND: ours at every version, with its reductions ------------------------------------------

def _scatter_model(data_shape, indices, updates_shape, reduction, opset, indices_input=False):
    """data, updates (and ``indices`` when ``indices_input``) as inputs -> one ScatterND -> y."""
    from onnx import TensorProto

    attrs = {} if opset < 16 else {"reduction": reduction}
    inputs = [helper.make_tensor_value_info("d", TensorProto.FLOAT, data_shape)]
    inputs += [helper.make_tensor_value_info("i", TensorProto.INT64, list(indices.shape))] if indices_input else []
    inputs += [helper.make_tensor_value_info("u", TensorProto.FLOAT, updates_shape)]
    graph = helper.make_graph([helper.make_node("ScatterND", ["d", "i", "u"], ["y"], name="scatter", **attrs)], "g",
                              inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [] if indices_input else [numpy_helper.from_array(indices, "i")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _scatter_indices(rng, data_shape, k, count, unique):
    """``count`` index tuples into the first ``k`` dimensions (distinct when ``unique``, else with
    repeats), about half written negative, laid out as (2, count // 2, k)."""
    lead = data_shape[:k]
    positions = rng.choice(int(np.prod(lead)), count, replace=False) if unique else \
        rng.integers(0, min(int(np.prod(lead)), 4), count)
    if not unique:
        assert len(set(positions.tolist())) < count  # repeats, combined by the reduction
    index = np.stack(np.unravel_index(positions, lead), -1).astype(np.int64)
    negative = rng.random(index.shape) < 0.5
    index = np.where(negative, index - np.array(lead), index)
    return index.reshape(2, count // 2, k)


SCATTER_CASES = [(shape, k, reduction, opset)
                 for shape in ([5, 6], [3, 4, 5], [2, 3, 4, 5]) for k in sorted({1, 2, len(shape)})
                 for reduction, opset in (("none", 11), ("none", 13), ("none", 16), ("add", 16), ("mul", 16),
                                          ("none", 18), ("add", 18), ("mul", 18), ("max", 18), ("min", 18))]


@pytest.mark.parametrize("shape,k,reduction,opset", SCATTER_CASES,
                         ids=[f"r{len(c[0])}-k{c[1]}-{c[2]}-{c[3]}" for c in SCATTER_CASES])
def test_scatter_nd_equals_onnxruntime_without_warnings(shape, k, reduction, opset):
    """ScatterND for data of rank 2-4, index tuples of 1, 2 and all dimensions (negative ones too, with
    repeats where a reduction combines them), at each version and reduction: within 1e-6 of
    onnxruntime, and no warning converting or running it (onnx2torch's own indexes with a list, which
    torch deprecates, and refuses every reduction)."""
    import warnings

    import onnx2torch

    from explainer.convert import converters  # noqa: F401  (ours in onnx2torch's registry)

    rng = np.random.default_rng(SCATTER_CASES.index((shape, k, reduction, opset)))
    count = min(6, int(np.prod(shape[:k])) // 2 * 2) if reduction == "none" else 6  # distinct where they overwrite
    indices = _scatter_indices(rng, shape, k, count, unique=reduction == "none")
    updates_shape = [*indices.shape[:-1], *shape[k:]]
    model = _scatter_model(shape, indices, updates_shape, reduction, opset)
    data = rng.standard_normal(shape).astype(np.float32)
    shift = {"max": 2.0, "min": -2.0}.get(reduction, 0.0)  # max and min: most updates win, some lose
    updates = (3 * rng.standard_normal(updates_shape) + shift).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"d": data, "u": updates})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = onnx2torch.convert(model)
        got = module(torch.from_numpy(data), torch.from_numpy(updates)).numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-6
    assert np.abs(expected - data).max() > 0.1  # the updates landed


def test_scatter_nd_batch_in_the_indices():
    """Indices that carry the batch (one row of a table written per image), fed at run time: one
    converted module serves batches of 1 and 3, equal to onnxruntime."""
    import onnx2torch

    from explainer.convert import converters  # noqa: F401

    rng = np.random.default_rng(21)
    model = _scatter_model(["N", 4, 3], np.zeros((1, 1, 2), np.int64), ["N", 1, 3], "add", 16, indices_input=True)
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.input[2].type.tensor_type.shape.dim[0].dim_param = "N"
    module = onnx2torch.convert(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        data = rng.standard_normal((n, 4, 3)).astype(np.float32)
        updates = rng.standard_normal((n, 1, 3)).astype(np.float32)
        indices = np.stack([np.arange(n), rng.integers(0, 4, n)], -1).reshape(n, 1, 2).astype(np.int64)
        expected = session.run(None, {"d": data, "i": indices, "u": updates})[0]
        got = module(*(torch.from_numpy(a) for a in (data, indices, updates))).numpy()
        assert np.abs(got - expected).max() <= 1e-6


def test_scatter_nd_gradients_hand_computed():
    """d/d data and d/d updates of sum(out * upstream), on (3, 4) data with rows 2 and 0 written
    (k = 1): none passes upstream to the data outside the written rows and to the updates inside them;
    add passes it to the data everywhere and to the updates; mul multiplies it by the other factor."""
    import onnx2torch

    from explainer.convert import converters  # noqa: F401

    rng = np.random.default_rng(22)
    rows = np.array([[2], [0]], np.int64)
    data = torch.from_numpy(rng.standard_normal((3, 4))).float()
    updates = torch.from_numpy(rng.standard_normal((2, 4))).float()
    upstream = torch.from_numpy(rng.standard_normal((3, 4))).float()
    written = torch.tensor([1.0, 0.0, 1.0])[:, None]
    at_rows = upstream[[2, 0]]
    factor = torch.ones(3, 4).index_copy(0, torch.tensor([2, 0]), updates)  # what mul multiplies each entry by
    expected = {"none": ((1 - written) * upstream, at_rows),
                "add": (upstream, at_rows),
                "mul": (upstream * factor, at_rows * data[[2, 0]])}
    for reduction, (d_data, d_updates) in expected.items():
        module = onnx2torch.convert(_scatter_model([3, 4], rows, [2, 4], reduction, 16))
        d, u = data.clone().requires_grad_(True), updates.clone().requires_grad_(True)
        (module(d, u) * upstream).sum().backward()
        torch.testing.assert_close(d.grad, d_data, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(u.grad, d_updates, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatter_nd_gradients_against_finite_differences(reduction):
    """torch.autograd.gradcheck (central differences in float64) w.r.t. the data and the updates, on
    (2, 3, 4) data with pairs (k = 2) written, repeated ones included where a reduction combines them
    (max and min on values without ties, where their gradient is defined)."""
    import onnx2torch

    from explainer.convert import converters  # noqa: F401

    indices = np.array([[[0, 1], [1, -1]], [[0, 1], [1, 0]]] if reduction != "none" else
                       [[[0, 1], [1, -1]], [[0, 2], [1, 0]]], np.int64)
    module = onnx2torch.convert(_scatter_model([2, 3, 4], indices, [2, 2, 4], reduction, 18))
    rng = np.random.default_rng(23)
    data = torch.from_numpy(rng.standard_normal((2, 3, 4))).requires_grad_(True)
    updates = torch.from_numpy(rng.standard_normal((2, 2, 4))).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda d, u: module(d, u), (data, updates))


def test_scatter_nd_reductions_through_the_library():
    """Through ``convert_graph`` (the attribute check, the passes): add at version 16 and max at 18 are
    converted and equal onnxruntime; max at version 16, which that version does not define, is refused
    by the converter with the reduction named."""
    rng = np.random.default_rng(24)
    inits = [("i", np.array([[0, 1], [0, 1], [0, 2]], np.int64)),
             ("u", rng.standard_normal((3, 4, 4)).astype(np.float32))]
    for reduction, opset in (("add", 16), ("max", 18), ("mul", 18)):
        _check(single_op("ScatterND", {"reduction": reduction}, shape=[1, 3, 4, 4], inits=inits, opset=opset))
    with pytest.raises(NotImplementedError, match="ScatterND-16 with reduction='max' has no converter"):
        convert_graph(single_op("ScatterND", {"reduction": "max"}, shape=[1, 3, 4, 4], inits=inits, opset=16), "image")


ELEMENTS_CASES = [(shape, axis, reduction, opset)
                  for shape, axis in (([5, 6], 0), ([5, 6], -1), ([2, 3, 4], 1), ([2, 3, 4, 5], 2))
                  for reduction, opset in (("none", 11), ("none", 13), ("add", 16), ("mul", 16), ("max", 18),
                                           ("min", 18))]


@pytest.mark.parametrize("shape,axis,reduction,opset", ELEMENTS_CASES,
                         ids=[f"r{len(c[0])}-axis{c[1]}-{c[2]}-{c[3]}" for c in ELEMENTS_CASES])
def test_scatter_elements_equals_onnxruntime_and_passes_gradients(shape, axis, reduction, opset):
    """ScatterElements (no converter in onnx2torch; Hugging Face BEiT's dynamo export writes its class
    token with one): data of rank 2-4, an axis (negative too), indices negative and positive (repeated
    where a reduction combines them), at each version and reduction: within 1e-6 of onnxruntime; the
    gradient reaches data and updates."""
    from onnx import TensorProto

    import onnx2torch

    from explainer.convert import converters  # noqa: F401

    rng = np.random.default_rng(ELEMENTS_CASES.index((shape, axis, reduction, opset)))
    ax = axis % len(shape)
    updates_shape = list(shape)
    updates_shape[ax] = 2
    if reduction == "none":  # distinct targets along the axis: a permutation's first two, per position
        order = np.argsort(rng.random(shape), axis=ax)
        indices = np.take(order, [0, 1], axis=ax)
    else:  # repeats, combined by the reduction
        indices = rng.integers(0, 2, updates_shape)
    indices = np.where(rng.random(updates_shape) < 0.5, indices - shape[ax], indices).astype(np.int64)
    attrs = {"axis": axis, **({"reduction": reduction} if opset >= 16 else {})}
    graph = helper.make_graph([helper.make_node("ScatterElements", ["d", "i", "u"], ["y"], name="scatter", **attrs)],
                              "g", [helper.make_tensor_value_info("d", TensorProto.FLOAT, shape),
                                    helper.make_tensor_value_info("u", TensorProto.FLOAT, updates_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(indices, "i")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    data = rng.standard_normal(shape).astype(np.float32)
    updates = (3 * rng.standard_normal(updates_shape) + {"max": 2.0, "min": -2.0}.get(reduction, 0.0)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"d": data, "u": updates})[0]
    module = onnx2torch.convert(model)
    d, u = torch.from_numpy(data).requires_grad_(True), torch.from_numpy(updates).requires_grad_(True)
    got = module(d, u)
    assert np.abs(got.detach().numpy() - expected).max() <= 1e-6
    assert np.abs(expected - data).max() > 0.1  # the updates landed
    got.sum().backward()
    assert u.grad is not None and float(u.grad.abs().sum()) > 0 and d.grad is not None


COL2IM_CASES = [((6, 7), (3, 3), [1, 1], [1, 1, 1, 1], [1, 1]), ((8, 8), (2, 2), [2, 2], [0, 0, 0, 0], [1, 1]),
                ((9, 7), (3, 2), [1, 2], [1, 0, 1, 0], [2, 1]), ((10, 10), (3, 3), [3, 3], [0, 0, 0, 0], [2, 2])]


@pytest.mark.parametrize("image,block,strides,pads,dilations", COL2IM_CASES, ids=[str(i) for i in range(len(COL2IM_CASES))])
def test_col2im_equals_onnxruntime_and_passes_gradients(image, block, strides, pads, dilations):
    """Col2Im (none in onnx2torch; VOLO's outlook attention, Hugging Face MobileViTV2's dynamo export):
    blocks of several sizes, strides, symmetric pads and dilations summed back into images, within 1e-5
    of onnxruntime; the gradient reaches the blocks. Asymmetric pads are refused by name."""
    from onnx import TensorProto

    import onnx2torch

    from explainer.convert import converters  # noqa: F401

    rng = np.random.default_rng(COL2IM_CASES.index((image, block, strides, pads, dilations)))
    c = 2
    counts = [(image[i] + pads[i] + pads[i + 2] - dilations[i] * (block[i] - 1) - 1) // strides[i] + 1 for i in (0, 1)]
    shape = [1, c * block[0] * block[1], counts[0] * counts[1]]

    def model(p):
        node = helper.make_node("Col2Im", ["x", "image", "block"], ["y"], name="fold", strides=strides, pads=p,
                                dilations=dilations)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(np.asarray(image, np.int64), "image"),
                                   numpy_helper.from_array(np.asarray(block, np.int64), "block")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)

    x = rng.standard_normal(shape).astype(np.float32)
    expected = ort.InferenceSession(model(pads).SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    assert expected.shape == (1, c, *image)
    t = torch.from_numpy(x).requires_grad_(True)
    got = onnx2torch.convert(model(pads))(t)
    assert np.abs(got.detach().numpy() - expected).max() <= 1e-5
    got.sum().backward()
    assert float(t.grad.abs().sum()) > 0
    with pytest.raises(NotImplementedError, match=r"Col2Im with pads=\[1, 1, 0, 0\]"):
        onnx2torch.convert(model([1, 1, 0, 0]))


# --- recurrent layers (converters/recurrent.py) ---------------------------------------------------------

def _recurrent(op, direction, layout, states, outputs, *, seed=0, **attrs):
    """One LSTM / GRU / RNN node on a (time 5, batch 3, features 4) sequence (batch first for layout 1),
    hidden 6, random weights and biases, initial states given or absent."""
    rng = np.random.default_rng(seed)
    d, h, i, t, n = 2 if direction == "bidirectional" else 1, 6, 4, 5, 3
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    inits = [("W", 0.5 * rng.standard_normal((d, gates * h, i))), ("R", 0.5 * rng.standard_normal((d, gates * h, h))),
             ("B", 0.5 * rng.standard_normal((d, 2 * gates * h)))]
    extra = []
    state = [n, d, h] if layout else [d, n, h]
    if states:
        extra = [""]  # sequence_lens absent
        inits += [("h0", rng.standard_normal(state))] + ([("c0", rng.standard_normal(state))] if op == "LSTM" else [])
    inits = [(name, value.astype(np.float32)) for name, value in inits]
    node = helper.make_node(op, ["x"] + [name for name, _ in inits[:3]] + extra + [name for name, _ in inits[3:]],
                            ["Y", "Y_h", "Y_c"][:outputs], hidden_size=h, direction=direction, layout=layout, **attrs)
    graph = helper.make_graph([node], "rnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            [n, t, i] if layout else [t, n, i])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in node.output],
                              [numpy_helper.from_array(v, k) for k, v in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


RECURRENT_CASES = [(op, direction, layout, states, outputs)
                   for op in ("LSTM", "GRU", "GRU-reset-before", "RNN")
                   for direction in ("forward", "reverse", "bidirectional")
                   for layout in (0, 1) for states in (False, True) for outputs in (1, 3 if op == "LSTM" else 2)]


@pytest.mark.parametrize("op,direction,layout,states,outputs", RECURRENT_CASES)
def test_recurrent_layers(op, direction, layout, states, outputs):
    """Every direction, both layouts, initial states given or zero, Y and the final states: equal to
    onnxruntime (layout 0) or to ONNX's reference implementation (layout 1, which onnxruntime refuses),
    and the gradient reaches the sequence. GRU: linear_before_reset 1 (torch's) and 0 (the default)."""
    from onnx.reference import ReferenceEvaluator

    extra = {"GRU": {"linear_before_reset": 1}, "GRU-reset-before": {}}.get(op, {})
    model = _recurrent(op.split("-")[0], direction, layout, states, outputs, **extra)
    x = np.random.default_rng(1).standard_normal([d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim])
    x = x.astype(np.float32)
    expected = ReferenceEvaluator(model).run(None, {"x": x}) if layout else _ort_named(model, x, "x")
    module, _ = convert_graph(model, "x")
    got = module(torch.from_numpy(x).requires_grad_())
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert tuple(g.shape) == e.shape
        assert np.abs(g.detach().numpy() - e).max() <= 1e-5 * np.abs(e).max()
    sum(g.sum() for g in got).backward()


def _ort_named(model, x, name):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {name: x})


@pytest.mark.parametrize("op,attrs,named", [
    ("LSTM", {"clip": 1.0}, "clip"), ("LSTM", {"input_forget": 1}, "input_forget"),
    ("LSTM", {"activations": ["Sigmoid", "Relu", "Tanh"]}, "activations"),
])
def test_recurrent_refusals_name_the_attribute(op, attrs, named):
    """What torch's fused modules do not compute is refused by name, never converted into another
    function."""
    model = _recurrent(op, "forward", 0, False, 1, **attrs)
    # the attribute check's ConversionError, or the converter's NotImplementedError (which the torch
    # engine reports as a ConversionError naming the node)
    with pytest.raises((ConversionError, NotImplementedError), match=named):
        convert_graph(model, "x")


# --- control flow (converters/control_flow.py) ----------------------------------------------------------

def _body(nodes, inputs, outputs):
    return helper.make_graph(nodes, "body", inputs, outputs)


def _vi(name, elem=TensorProto.FLOAT, shape=None):
    return helper.make_tensor_value_info(name, elem, shape)


def _control_flow_model(kind: str):
    """image (2, 3, 4, 5) -> one control-flow construct -> its outputs, all of which are checked:
    loop-trip: a Loop of 4 iterations carrying v <- v * 0.9 + image (read from around the body) and
    scanning tanh(v); loop-cond: no trip count, the body stops once the counter reaches 3 (TensorFlow's
    while loops); if: a condition computed from the image choosing between two branches that read it."""
    inits, nodes = [], []
    if kind.startswith("loop"):
        step = [helper.make_node("Mul", ["v_in", "decay"], ["m"]), helper.make_node("Add", ["m", "image"], ["v_out"]),
                helper.make_node("Tanh", ["v_out"], ["scan"])]
        if kind == "loop-cond":
            step += [helper.make_node("Add", ["i", "one"], ["next"]), helper.make_node("Less", ["next", "three"], ["c_out"])]
            inits += [numpy_helper.from_array(np.array(1, np.int64), "one"),
                      numpy_helper.from_array(np.array(3, np.int64), "three")]
        else:
            step.append(helper.make_node("Identity", ["c_in"], ["c_out"]))
        body = _body(step, [_vi("i", TensorProto.INT64, []), _vi("c_in", TensorProto.BOOL, []), _vi("v_in")],
                     [_vi("c_out", TensorProto.BOOL, []), _vi("v_out"), _vi("scan")])
        inits += [numpy_helper.from_array(np.array(0.9, np.float32), "decay"),
                  numpy_helper.from_array(np.array(True), "go"),
                  numpy_helper.from_array(np.zeros((2, 3, 4, 5), np.float32), "v0")]
        trips = "" if kind == "loop-cond" else "trips"
        if trips:
            inits.append(numpy_helper.from_array(np.array(4, np.int64), "trips"))
        nodes.append(helper.make_node("Loop", [trips, "go", "v0"], ["y0", "y1"], body=body))
        outputs = ["y0", "y1"]
    else:
        then = _body([helper.make_node("Mul", ["image", "two"], ["t"]), helper.make_node("Relu", ["t"], ["then_out"])],
                     [], [_vi("then_out")])
        other = _body([helper.make_node("Neg", ["image"], ["else_out"])], [], [_vi("else_out")])
        inits.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
        nodes += [helper.make_node("ReduceMean", ["image"], ["mean"], keepdims=0),
                  helper.make_node("Greater", ["mean", "zero"], ["cond"]),
                  helper.make_node("If", ["cond"], ["y0"], then_branch=then, else_branch=other)]
        inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
        outputs = ["y0"]
    graph = helper.make_graph(nodes, kind, [_vi("image", shape=[2, 3, 4, 5])], [_vi(o) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("kind", ["loop-trip", "loop-cond", "if"])
@pytest.mark.parametrize("shift", [0.5, -0.5])
def test_control_flow_equals_onnxruntime(kind, shift):
    """Loop (a trip count, or a condition computed in the body; carried values and stacked scan
    outputs) and If (both outcomes of a condition computed from the image; branches reading from
    around them): the converted module equals onnxruntime and passes a gradient back to the image."""
    model = _control_flow_model(kind)
    x = (np.random.default_rng(2).standard_normal((2, 3, 4, 5)) + shift).astype(np.float32)
    expected = _ort(model, x)
    module, _ = convert_graph(model, "image")
    image = torch.from_numpy(x).requires_grad_()
    got = module(image)
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    assert [tuple(g.shape) for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        assert np.abs(g.detach().numpy() - e).max() <= 1e-5 * np.abs(e).max()
    sum(g.sum() for g in got).backward()
    assert image.grad is not None and float(image.grad.abs().sum()) > 0


@pytest.mark.parametrize("batch_axis,time_axis,lengths", [(1, 0, [5, 5, 5]), (1, 0, [2, 5, 1]), (0, 1, [3, 1])])
def test_reverse_sequence_equals_onnxruntime(batch_axis, time_axis, lengths):
    shape = [5, 3, 4] if time_axis == 0 else [2, 5, 4]
    model = single_op("ReverseSequence", {"batch_axis": batch_axis, "time_axis": time_axis}, shape=shape,
                      inits=[("lengths", np.array(lengths, np.int64))], opset=17)
    _check(model, shape)


def _gate(x: torch.Tensor) -> torch.Tensor:
    if bool(x.mean() > 0):
        return torch.relu(x * 2.0)
    return torch.tanh(x)


class _Gated(torch.nn.Module):
    def __init__(self, shift: float, gate):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc, self.gate = torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Linear(6, 4), gate
        with torch.no_grad():
            self.conv.bias += shift

    def forward(self, x):
        return self.fc(self.gate(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("shift", [50.0, -50.0])
def test_scripted_if_from_torchs_exporter(shift, tmp_path):
    """A data-dependent branch (``torch.jit.script``) exported by torch's legacy exporter: an If whose
    condition comes from the image, on the value path only through its branches. It runs batches (the
    branches' output shapes declared at batch 1 are dropped), the gradient methods run (the condition
    selects, it has no gradient to give), and the converted module's scores and gradient equal the torch
    module's, whichever branch the image takes."""
    import warnings

    from explainer.runtime.torch_engine import torch_engine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated, yet what writes an If from torch
        model, path = _Gated(shift, torch.jit.script(_gate)).eval(), tmp_path / "gated.onnx"
        torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, opset_version=17)
    assert "If" in [n.op_type for n in onnx_load(path).graph.node]
    with warnings.catch_warnings():  # the branches declare their outputs at the exported batch: dropped
        warnings.simplefilter("error", explainer.errors.BatchFallbackWarning)
        net = explainer.load(str(path), preprocessing="none")
    assert net.max_batch is None
    pixels = torch.from_numpy(np.random.default_rng(3).integers(0, 60, (1, 3, 16, 16)).astype(np.float32))
    pixels.requires_grad_()
    took_relu = bool(model.conv(pixels).mean() > 0)
    assert took_relu == (shift > 0)
    ours = torch_engine(net).pixel_model(pixels)[0, 1]
    ours.backward()
    got, pixels.grad = pixels.grad.clone(), None
    expected = model(pixels)[0, 1]
    expected.backward()
    assert abs(float(ours) - float(expected)) <= 1e-5 * max(abs(float(expected)), 1e-3)
    assert float((got - pixels.grad).abs().max()) <= 1e-5 * float(pixels.grad.abs().max())


def onnx_load(path):
    import onnx

    return onnx.load(str(path))


@pytest.mark.parametrize("directions,axes", [((0, 0), (1, 0)), ((1, 0), (1, -1)), ((0, 1), (-3, 2))])
def test_scan_equals_onnxruntime(directions, axes):
    """Scan (older converters' recurrent graphs): a state carried over the slices of two scan inputs
    (the image along its width, forwards or backwards, and a weight table read along another axis), a
    body reading a weight from around it, two scan outputs stacked along their axes and directions."""
    rng = np.random.default_rng(4)
    table = rng.standard_normal((9, 5)).astype(np.float32)  # scanned along axis 0: 9 steps of (5,)
    body = _body([helper.make_node("Mul", ["x_t", "gain"], ["scaled"]),  # x_t: (2, 3, 4) slice of the image
                  helper.make_node("ReduceMean", ["scaled"], ["mean"], axes=[2], keepdims=0),
                  helper.make_node("Add", ["state_in", "mean"], ["summed"]),
                  helper.make_node("Tanh", ["summed"], ["state_out"]),
                  helper.make_node("ReduceSum", ["w_t"], ["w_sum"], keepdims=1),
                  helper.make_node("Mul", ["state_out", "w_sum"], ["y_t"])],
                 [_vi("state_in", shape=[2, 3]), _vi("x_t", shape=[2, 3, 4]), _vi("w_t", shape=[5])],
                 [_vi("state_out", shape=[2, 3]), _vi("y_t"), _vi("summed")])
    image_axis = 3  # the image's width (9 steps): axis 3 of (2, 3, 4, 9)
    node = helper.make_node("Scan", ["s0", "image", "table"], ["final", "ys", "sums"], body=body,
                            num_scan_inputs=2, scan_input_axes=[image_axis, 0],
                            scan_input_directions=list(directions), scan_output_axes=list(axes),
                            scan_output_directions=[directions[0], 1 - directions[1]])
    graph = helper.make_graph([node], "scan", [_vi("image", shape=[2, 3, 4, 9])],
                              [_vi("final"), _vi("ys"), _vi("sums")],
                              [numpy_helper.from_array(np.zeros((2, 3), np.float32), "s0"),
                               numpy_helper.from_array(table, "table"),
                               numpy_helper.from_array(np.array(0.7, np.float32), "gain")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    _check(model, [2, 3, 4, 9])


# --- sequences (converters/sequences.py) -----------------------------------------------------------

def _sequence_model(split, keepdims, insert_at, erase_at, at, axis, new_axis):
    """image (2, 6, 4, 5) -> SplitToSequence along axis 1 (``split``: None, a scalar or sizes) -> a
    tensor of the pieces' shape (the image's first piece doubled, SequenceAt 0) inserted at ``insert_at``
    -> the piece at ``erase_at`` erased -> ConcatFromSequence(axis, new_axis); outputs: that, the piece
    at ``at``, and the length as float times the mean (a length selects, it carries no gradient)."""
    inits, nodes = [], []
    split_inputs = ["image"]
    if split is not None:
        inits.append(numpy_helper.from_array(np.array(split, np.int64), "split"))
        split_inputs.append("split")
    nodes.append(helper.make_node("SplitToSequence", split_inputs, ["pieces"], axis=1, keepdims=keepdims))
    nodes += [helper.make_node("SequenceAt", ["pieces", "zero"], ["first"]),
              helper.make_node("Add", ["first", "first"], ["doubled"])]
    inits.append(numpy_helper.from_array(np.array(0, np.int64), "zero"))
    insert = ["pieces", "doubled"]
    if insert_at is not None:
        inits.append(numpy_helper.from_array(np.array(insert_at, np.int64), "insert_at"))
        insert.append("insert_at")
    nodes.append(helper.make_node("SequenceInsert", insert, ["more"]))
    erase = ["more"]
    if erase_at is not None:
        inits.append(numpy_helper.from_array(np.array(erase_at, np.int64), "erase_at"))
        erase.append("erase_at")
    nodes.append(helper.make_node("SequenceErase", erase, ["fewer"]))
    inits.append(numpy_helper.from_array(np.array(at, np.int64), "at"))
    nodes += [helper.make_node("ConcatFromSequence", ["fewer"], ["joined"], axis=axis, new_axis=new_axis),
              helper.make_node("SequenceAt", ["fewer", "at"], ["picked"]),
              helper.make_node("SequenceLength", ["fewer"], ["length"]),
              helper.make_node("Cast", ["length"], ["length_f"], to=TensorProto.FLOAT),
              helper.make_node("ReduceMean", ["joined"], ["mean"], keepdims=0),
              helper.make_node("Mul", ["length_f", "mean"], ["scaled"])]
    graph = helper.make_graph(nodes, "sequences", [_vi("image", shape=[2, 6, 4, 5])],
                              [_vi("joined"), _vi("picked"), _vi("scaled")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("split,keepdims,insert_at,erase_at,at,axis,new_axis", [
    (None, 0, None, None, -1, 1, 1),     # pieces of one, squeezed; stacked back on axis 1
    (None, 0, None, None, 2, -1, 1),     # the same stacked on a new last axis
    (None, 1, 0, 2, 0, 1, 0),            # pieces of one kept; inserted first; concatenated
    (4, 1, -1, -2, 1, -3, 0),            # pieces of 4 (the last of 2); negative positions and axis
    ([1, 2, 3], 1, 3, None, -1, 1, 0),   # sizes given; inserted at the end, erased from it
])
def test_sequence_ops_equal_onnxruntime(split, keepdims, insert_at, erase_at, at, axis, new_axis):
    """SplitToSequence (no split, a scalar, sizes; keepdims), SequenceAt, SequenceInsert and SequenceErase
    (no position, negative positions), ConcatFromSequence (concatenated or stacked, negative axes) and
    SequenceLength: the converted module equals onnxruntime and passes a gradient back to the image."""
    _check(_sequence_model(split, keepdims, insert_at, erase_at, at, axis, new_axis), [2, 6, 4, 5])


def test_sequence_construct_equals_onnxruntime():
    """SequenceEmpty then SequenceInsert at the end, and SequenceConstruct of three tensors, stacked."""
    nodes = [helper.make_node("SequenceEmpty", [], ["empty"], dtype=TensorProto.FLOAT),
             helper.make_node("Relu", ["image"], ["a"]), helper.make_node("Neg", ["image"], ["b"]),
             helper.make_node("SequenceInsert", ["empty", "a"], ["one"]),
             helper.make_node("SequenceInsert", ["one", "b"], ["two"]),
             helper.make_node("SequenceConstruct", ["a", "b", "image"], ["three"]),
             helper.make_node("ConcatFromSequence", ["two"], ["stacked"], axis=-1, new_axis=1),
             helper.make_node("ConcatFromSequence", ["three"], ["joined"], axis=0),
             helper.make_node("ReduceSum", ["stacked"], ["s"], keepdims=0),
             helper.make_node("Mul", ["joined", "s"], ["out"])]
    graph = helper.make_graph(nodes, "construct", [_vi("image", shape=[2, 3, 4])], [_vi("out"), _vi("stacked")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    _check(model, [2, 3, 4])


class _Rows(torch.nn.Module):
    """Scripted: a list of the rows' means built in a loop, stacked (a Loop carrying a sequence)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8 * 16, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))

    def head(self, f):
        rows: list[torch.Tensor] = []
        for i in range(f.shape[2]):
            rows.append(f[:, :, i, :].mean(dim=2))
        return self.fc(torch.stack(rows, dim=2).flatten(1))


class _Parts(torch.nn.Module):
    """Scripted: the channels split in pieces, summed in a loop over them (SplitToSequence, SequenceAt,
    SequenceLength)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8, 5)

    def forward(self, x):
        f = torch.relu(self.conv(x))
        parts = torch.split(f, 4, dim=1)
        acc = parts[0] * 0
        for p in parts:
            acc = acc + p
        return self.fc(torch.cat([acc, parts[-1]], 1).mean((2, 3)))


def _export_scripted(source, path):
    """``source()`` in eval mode, scripted and exported by torch's legacy exporter to ``path`` (opset 17,
    a 16 x 16 image): what writes sequences and Loops from torch. Returns the eager module."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated, yet what writes sequences from torch
        model = source().eval()
        torch.onnx.export(torch.jit.script(model), (torch.randn(1, 3, 16, 16),), str(path), dynamo=False,
                          opset_version=17)
    return model


@pytest.mark.parametrize("source", [_Rows, _Parts])
def test_scripted_lists_from_torchs_exporter(source, tmp_path):
    """Scripted code building or splitting lists, exported by torch's legacy exporter (sequences carried
    through Loops): the file runs batches, and the converted module's scores and gradient equal the
    torch module's."""
    from explainer.runtime.torch_engine import torch_engine

    path = tmp_path / "lists.onnx"
    model = _export_scripted(source, path)
    ops = {n.op_type for n in onnx_load(path).graph.node}
    assert ops & {"SequenceEmpty", "SplitToSequence"} and "Loop" in ops
    net = explainer.load(str(path), preprocessing="none")
    assert net.max_batch is None
    pixels = torch.from_numpy(np.random.default_rng(5).integers(0, 60, (2, 3, 16, 16)).astype(np.float32))
    np.testing.assert_allclose(net.predict(pixels.permute(0, 2, 3, 1).numpy().astype(np.uint8)),
                               torch.softmax(model(pixels), 1).detach().numpy(), rtol=1e-4, atol=1e-6)
    pixels.requires_grad_()
    ours = torch_engine(net).pixel_model(pixels)[:, 1].sum()
    ours.backward()
    got, pixels.grad = pixels.grad.clone(), None
    expected = model(pixels)[:, 1].sum()
    expected.backward()
    ours, expected = float(ours.detach()), float(expected.detach())
    assert abs(ours - expected) <= 1e-5 * max(abs(expected), 1e-3)
    assert float((got - pixels.grad).abs().max()) <= 1e-5 * float(pixels.grad.abs().max())


def test_a_head_holding_a_loop_is_explained_in_python(tmp_path):
    """The head after the default layer holds the Loop that builds the list (the walk from the layer to
    the scores follows what the Loop's body reads around it): Recipro-CAM runs that head on the masked
    copies in two stages and equals a torch Recipro-CAM on the source module (each location of the
    layer kept alone, the module's own head, softmax); Grad-CAM takes the torch module and says why; the
    export refuses it by name."""
    from explainer.errors import UnsupportedHeadOpError

    path = tmp_path / "rows.onnx"
    model = _export_scripted(_Rows, path)
    net = explainer.load(str(path), preprocessing="none")
    layer = explainer.gradcam_layers(net)[0]
    assert net.layer(layer).op_type == "Relu"
    assert "Loop" in explainer.gradcam_engine(net).describe()
    with pytest.raises(UnsupportedHeadOpError, match="Loop.*control flow.*feature_layer after"):
        explainer.export_explained(net, str(tmp_path / "x.onnx"), method="recipro_cam")
    pixels = np.random.default_rng(6).integers(0, 255, (16, 16, 3)).astype(np.uint8)
    x = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        f = torch.relu(model.conv(x))
        _, _, h, w = f.shape
        masks = torch.eye(h * w).reshape(h * w, 1, h, w)  # each location kept alone
        probabilities = model.head(f * masks).softmax(1)[:, 2].reshape(h, w).double()
    expected = ((probabilities - probabilities.min()) / (probabilities.max() - probabilities.min())).numpy()
    from explainer.methods.recipro_cam import low_resolution

    got = low_resolution(net, pixels.astype(np.float32), net.layer(layer), [2], kernel="point")[0]
    assert explainer.recipro_cam_engine(net).describe().startswith("two-stage")
    np.testing.assert_allclose(got, expected, atol=1e-5)
