"""Tiny ONNX classifiers built in code, with numpy versions of what they compute (independent truth)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def _model(nodes, inputs, outputs, inits, opset=OPSET, **kw):
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=opset, **kw)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def weights(k=4, c=3, seed=0):
    rng = np.random.default_rng(seed)
    # scaled for 0..255 pixel inputs, so logits stay in a range where softmax is not saturated
    return ((0.01 * rng.standard_normal((k, c))).astype(np.float32), rng.standard_normal(k).astype(np.float32))


def linear_classifier(k=4, c=3, *, size=(8, 8), layout="NCHW", dtype=TensorProto.FLOAT, softmax=False,
                      batch=None, spatial_output=False, seed=0, normalise_div=False):
    """Conv1x1 -> Relu -> GlobalAveragePool -> Flatten (logits) [-> Softmax]; returns (model, numpy fn).

    The numpy function takes (N, C, H, W) float model input and returns the graph's output.
    """
    w, b = weights(k, c, seed)
    h, wd = size
    n = batch if batch is not None else "N"
    shape = [n, c, h, wd] if layout == "NCHW" else [n, h, wd, c]
    nodes, inits = [], [numpy_helper.from_array(w.reshape(k, c, 1, 1), "W"),
                        numpy_helper.from_array(b, "B")]
    x = "image"
    if dtype == TensorProto.UINT8:
        nodes.append(helper.make_node("Cast", ["image"], ["image_f"], to=TensorProto.FLOAT))
        x = "image_f"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [x], ["nchw"], perm=[0, 3, 1, 2]))
        x = "nchw"
    nodes += [helper.make_node("Conv", [x, "W", "B"], ["conv"], name="conv1"),
              helper.make_node("Relu", ["conv"], ["relu"], name="relu1"),
              helper.make_node("GlobalAveragePool", ["relu"], ["gap"], name="gap")]
    last = "gap"
    if not spatial_output:
        nodes.append(helper.make_node("Flatten", ["gap"], ["logits"], name="flatten"))
        last = "logits"
    out_shape = [n, k, 1, 1] if spatial_output else [n, k]
    if softmax:
        nodes.append(helper.make_node("Softmax", [last], ["prob"], name="softmax", axis=1))
        last = "prob"
    if normalise_div:  # probabilities without a Softmax node: exp(x) / sum(exp(x))
        nodes += [helper.make_node("Exp", [last], ["e"]),
                  helper.make_node("ReduceSum", ["e", "axes"], ["s"], keepdims=1),
                  helper.make_node("Div", ["e", "s"], ["prob"], name="normalise")]
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
        last = "prob"
    model = _model(nodes, [helper.make_tensor_value_info("image", dtype, shape)],
                   [helper.make_tensor_value_info(last, TensorProto.FLOAT, out_shape)], inits)

    def reference(x_nchw: np.ndarray) -> np.ndarray:
        conv = np.einsum("kc,nchw->nkhw", w, x_nchw.astype(np.float64)) + b[None, :, None, None]
        logits = np.maximum(conv, 0).mean(axis=(2, 3))
        if softmax or normalise_div:
            e = np.exp(logits - (0 if normalise_div else logits.max(1, keepdims=True)))
            logits = e / e.sum(1, keepdims=True)
        return logits.reshape(len(x_nchw), k, 1, 1) if spatial_output else logits

    return model, reference


def linear_classifier_gradient(x_nchw: np.ndarray, label: int, k=4, c=3, *, seed=0, floor=0.0) -> np.ndarray:
    """d logits[label] / d input of ``linear_classifier(k, c, seed=seed)`` by hand, (N, C, H, W): the
    score is the mean over pixels of relu(w . x + b) (or of max(w . x + b, floor) where a Clip at
    ``floor`` > 0 follows the Relu), so each pixel gets w[label] / (H W) where the unit is above its
    lower bound, and nothing where it is not."""
    w, b = weights(k, c, seed)
    conv = np.einsum("c,nchw->nhw", w[label].astype(np.float64), x_nchw.astype(np.float64)) + b[label]
    gate = (conv > floor).astype(np.float64)
    return w[label][None, :, None, None] * gate[:, None] / (x_nchw.shape[2] * x_nchw.shape[3])


def dense_classifier(k=4, c=3, *, size=(16, 16), seed=0) -> onnx.ModelProto:
    """Conv1x1 -> Relu -> Flatten -> Gemm: scores from every pixel's features, so the graph runs only
    at its input size (as VGG's and AlexNet's dense layers do)."""
    w, b = weights(k, c, seed)
    h, wd = size
    dense = (0.01 * np.random.default_rng(seed + 1).standard_normal((k, k * h * wd))).astype(np.float32)
    nodes = [helper.make_node("Conv", ["image", "W", "B"], ["conv"], name="conv1"),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu1"),
             helper.make_node("Flatten", ["relu"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "D", "B"], ["logits"], name="dense", transB=1)]
    inits = [numpy_helper.from_array(w.reshape(k, c, 1, 1), "W"), numpy_helper.from_array(b, "B"),
             numpy_helper.from_array(dense, "D")]
    return _model(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", c, h, wd])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])], inits)


def nhwc_uint8_softmax_variant(model: onnx.ModelProto, mean=127.0, std=128.0) -> onnx.ModelProto:
    """The same classifier behind an NHWC uint8 input with the normalisation inside the graph, and a
    Softmax on the output: what many production exports look like."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    old = g.input[0]
    h, w = [d.dim_value for d in old.type.tensor_type.shape.dim[2:]]
    new_in = helper.make_tensor_value_info("image_u8", TensorProto.UINT8, ["N", h, w, 3])
    g.initializer.extend([numpy_helper.from_array(np.array(mean, np.float32), "pre_mean"),
                          numpy_helper.from_array(np.array(std, np.float32), "pre_std")])
    pre = [helper.make_node("Cast", ["image_u8"], ["pre_f"], to=TensorProto.FLOAT, name="pre_cast"),
           helper.make_node("Transpose", ["pre_f"], ["pre_t"], perm=[0, 3, 1, 2], name="pre_transpose"),
           helper.make_node("Sub", ["pre_t", "pre_mean"], ["pre_s"], name="pre_sub"),
           helper.make_node("Div", ["pre_s", "pre_std"], [old.name], name="pre_div")]
    logits = g.output[0].name
    nodes = pre + list(g.node) + [helper.make_node("Softmax", [logits], ["probabilities"], axis=1,
                                                   name="softmax")]
    del g.node[:]
    g.node.extend(nodes)
    g.input.remove(old)
    g.input.insert(0, new_in)
    out = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 1000])
    del g.output[:]
    g.output.append(out)
    del m.metadata_props[:]
    onnx.checker.check_model(m)
    return m


# --- single ops and shapes that inference loses (tests/test_converters.py) ----------------------------

def single_op(op, attrs=None, *, shape=(1, 3, 8, 8), inits=(), extra_inputs=(), opset=17, outputs=1,
              domain_version=None) -> onnx.ModelProto:
    """``image`` (float, ``shape``) -> one ``op`` node -> its outputs ``y0``..; ``inits``: (name, array)
    pairs fed after the image (``extra_inputs``: names of further inputs, "" for an absent one, placed
    before the initialisers)."""
    inits = list(inits)
    node = helper.make_node(op, ["image", *extra_inputs, *[n for n, _ in inits]],
                            [f"y{i}" for i in range(outputs)], name=f"the_{op.lower()}", **(attrs or {}))
    graph = helper.make_graph([node], "single", [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(outputs)],
                              initializer=[numpy_helper.from_array(np.asarray(v), n) for n, v in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 18 else 10
    return model


def _bn_weights(c, rng, eps_sensitive=False):
    var = (rng.uniform(1e-4, 2e-3, c) if eps_sensitive else rng.uniform(0.5, 2.0, c)).astype(np.float32)
    return [rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32),
            (0.1 * rng.standard_normal(c)).astype(np.float32), var]


def rank_lost_classifier(op="BatchNormalization", attrs=None, *, k=4, size=(8, 8), opset=13, seed=0,
                         through="reshape") -> onnx.ModelProto:
    """image (N, 3, H, W) -> Conv 1x1 (k channels) -> a tensor of the same shape whose rank shape
    inference cannot tell -> ``op`` -> GlobalAveragePool -> Flatten -> Gemm (k scores).

    ``through="reshape"``: a Reshape to its own shape computed at run time (Shape -> Concat): a Reshape
    of opset <= 13 gives no shape at all for a computed target (timm's LeViT and PoolFormer, torchvision's
    Swin, exported at opset 11-13). ``"pad"``: a Pad whose pads are computed (zero here). The op has
    the weights it needs (BatchNormalization: scale, bias, mean, var; InstanceNormalization: scale, bias;
    Conv: k x k x 3 x 3)."""
    rng = np.random.default_rng(seed)
    h, w = size
    inits = [numpy_helper.from_array((0.01 * rng.standard_normal((k, 3, 1, 1))).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), "B"),
             numpy_helper.from_array(rng.standard_normal((k, k)).astype(np.float32), "D"),
             numpy_helper.from_array(np.zeros(k, np.float32), "DB")]
    nodes = [helper.make_node("Conv", ["image", "W", "B"], ["conv"], name="conv")]
    if through == "reshape":
        inits += [numpy_helper.from_array(np.array([0], np.int64), "zero"),
                  numpy_helper.from_array(np.array([2], np.int64), "two"),
                  numpy_helper.from_array(np.array([4], np.int64), "four")]
        nodes += [helper.make_node("Shape", ["conv"], ["shape"]),
                  helper.make_node("Slice", ["shape", "zero", "two"], ["head"]),
                  helper.make_node("Slice", ["shape", "two", "four"], ["tail"]),
                  helper.make_node("Concat", ["head", "tail"], ["target"], axis=0),
                  helper.make_node("Reshape", ["conv", "target"], ["lost"], name="reshape")]
    else:
        inits.append(numpy_helper.from_array(np.array(0, np.int64), "nought"))
        nodes += [helper.make_node("Shape", ["conv"], ["shape"]),
                  helper.make_node("Concat", ["shape", "shape"], ["twice"], axis=0),
                  helper.make_node("Mul", ["twice", "nought"], ["pads"]),
                  helper.make_node("Pad", ["conv", "pads"], ["lost"], name="pad")]
    extra = []
    if op == "BatchNormalization":
        extra = [f"{op}_{i}" for i in range(4)]
        inits += [numpy_helper.from_array(v, n) for v, n in zip(_bn_weights(k, rng), extra)]
    elif op == "Conv":
        extra = ["Conv_w"]
        inits.append(numpy_helper.from_array((0.3 * rng.standard_normal((k, k, 3, 3))).astype(np.float32), "Conv_w"))
    elif op in ("InstanceNormalization", "LayerNormalization"):
        extra = [f"{op}_{i}" for i in range(2)]
        c = k if op == "InstanceNormalization" else w
        inits += [numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), n) for n in extra]
    nodes += [helper.make_node(op, ["lost", *extra], ["normed"], name="the_op", **(attrs or {})),
              helper.make_node("GlobalAveragePool", ["normed"], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "D", "DB"], ["logits"], name="head")]
    return _model(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, h, w])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])], inits,
                  opset=[helper.make_opsetid("", opset)])


def keras_batchnorm_classifier(epsilon=1e-3, *, k=4, size=(8, 8), seed=0) -> onnx.ModelProto:
    """Conv 3x3 -> BatchNormalization (Keras' epsilon 1e-3, variances small enough that epsilon
    matters, kept as a node as tf2onnx keeps it) -> Relu -> GlobalAveragePool -> Flatten."""
    rng = np.random.default_rng(seed)
    h, w = size
    names = ["scale", "bias", "mean", "var"]
    inits = [numpy_helper.from_array((0.01 * rng.standard_normal((k, 3, 3, 3))).astype(np.float32), "W")]
    inits += [numpy_helper.from_array(v, n) for v, n in zip(_bn_weights(k, rng, eps_sensitive=True), names)]
    nodes = [helper.make_node("Conv", ["image", "W"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["conv", *names], ["bn"], name="bn", epsilon=epsilon,
                              momentum=0.99),
             helper.make_node("Relu", ["bn"], ["relu"], name="relu"),
             helper.make_node("GlobalAveragePool", ["relu"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["logits"], name="flatten")]
    return _model(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, h, w])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])], inits)


def with_recorded_shapes(model: onnx.ModelProto, how: str) -> onnx.ModelProto:
    """A copy whose ``value_info`` is: ``"none"`` (cleared, as tools that strip it leave it),
    ``"wrong-rank"`` (every intermediate recorded as rank 2) or ``"stale"`` (every intermediate
    recorded with the shape inference gives at another input size, rank kept)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    if how == "none":
        return m
    inferred = onnx.shape_inference.infer_shapes(m).graph.value_info
    for vi in inferred:
        t = vi.type.tensor_type
        rank = len(t.shape.dim) if t.HasField("shape") else 4
        shape = [7, 5] if how == "wrong-rank" else [d + 3 for d in range(2, rank + 2)]
        m.graph.value_info.append(helper.make_tensor_value_info(vi.name, t.elem_type, shape))
    return m


def seeded_set(architectures) -> list:
    """The seeded zoo's architectures as parameters: VGG-19 (548 MB, the same ops as AlexNet and ZFNet;
    about 50 s and a 2.3 GB step of memory at once) marked ``matrix``, which ``.ci/run`` runs after the
    main suite."""
    import pytest

    return [pytest.param(a, marks=pytest.mark.matrix) if a == "vgg19" else a for a in sorted(architectures)]


def loop_classifier(*, unrolled: bool = False, steps: int = 3, k: int = 5, c: int = 4, seed: int = 0,
                    body_domain: str = "", body_op: str = "Relu", trips: str = "constant") -> onnx.ModelProto:
    """image (N, 3, 8, 8) -> Conv 3x3 (c channels) -> a Loop of ``steps`` iterations, v <- Relu(v * S + T)
    (S, T: main-graph weights that only the body reads, as TensorFlow's while loops read theirs) -> Relu
    ("post") -> GlobalAveragePool -> Flatten -> Gemm (k logits). ``unrolled``: the same function with
    the iterations written out (no subgraph), the reference. ``body_domain``: the domain of the body's
    Relu (a custom one must be refused); ``body_op``: another op in its place (Floor has no gradient).
    ``trips``: the trip count "constant" (``steps``), "computed" (the image's height times ``steps`` // 8,
    from its shape at run time) or "none" (the loop runs while its condition holds)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((0.02 * rng.standard_normal((c, 3, 3, 3))).astype(np.float32), "conv_w"),
             numpy_helper.from_array(rng.uniform(0.5, 1.2, (1, c, 1, 1)).astype(np.float32), "S"),
             numpy_helper.from_array((0.3 * rng.standard_normal((1, c, 1, 1))).astype(np.float32), "T"),
             numpy_helper.from_array(rng.standard_normal((k, c)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), "fc_b")]
    nodes = [helper.make_node("Conv", ["image", "conv_w"], ["feat"], name="conv", pads=[1, 1, 1, 1])]
    if unrolled:
        v = "feat"
        for i in range(steps):
            nodes += [helper.make_node("Mul", [v, "S"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", "T"], [f"a{i}"]),
                      helper.make_node("Relu", [f"a{i}"], [f"v{i}"])]
            v = f"v{i}"
        nodes.append(helper.make_node("Identity", [v], ["looped"], name="loop"))
    else:
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
             helper.make_node("Mul", ["v_in", "S"], ["m"]), helper.make_node("Add", ["m", "T"], ["a"]),
             helper.make_node(body_op, ["a"], ["v_out"], name="body_activation", domain=body_domain)],
            "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                     helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                     helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
        inits += [numpy_helper.from_array(np.array(True), "keep_going")]
        if trips == "constant":
            inits.append(numpy_helper.from_array(np.array(steps, np.int64), "trips"))
        elif trips == "computed":
            inits += [numpy_helper.from_array(np.array(2, np.int64), "h_axis"),
                      numpy_helper.from_array(np.array(steps, np.int64), "steps"),
                      numpy_helper.from_array(np.array(8, np.int64), "eight")]
            nodes += [helper.make_node("Shape", ["image"], ["image_shape"]),
                      helper.make_node("Gather", ["image_shape", "h_axis"], ["height"], axis=0),
                      helper.make_node("Mul", ["height", "steps"], ["height_steps"]),
                      helper.make_node("Div", ["height_steps", "eight"], ["trips"])]
        nodes.append(helper.make_node("Loop", ["trips" if trips != "none" else "", "keep_going", "feat"], ["looped"],
                                      name="loop", body=body))
    nodes += [helper.make_node("Relu", ["looped"], ["post"], name="post"),
              helper.make_node("GlobalAveragePool", ["post"], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "loop_classifier",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])], inits)
    imports = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(body_domain, 1)] if body_domain else [])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    return model
