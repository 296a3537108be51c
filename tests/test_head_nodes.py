"""``graph.head_nodes``: the one walk that finds the head (the nodes from a feature tensor to the scores)
for export's ``Head`` (a copy inside the graph) and Recipro-CAM's ``head_cut`` (a model of its own),
and ``structure.image_reads``, which of the tensors a head reads come from the image."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from explainer.export.head import Head
from explainer.graph import head_nodes, subgraph_reads
from explainer.methods.recipro_cam import head_cut
from explainer.model.structure import image_dependent, image_reads


def _graph() -> onnx.GraphProto:
    """A ViT-like head: the feature (a LayerNorm of the residual stream) and the stream around it (a
    skip connection), a Reshape target computed from Shape(image), a weight behind an Identity, a
    Softmax output."""
    def const(name, value):
        return numpy_helper.from_array(np.asarray(value), name)

    nodes = [helper.make_node("Reshape", ["x", "shape0"], ["tokens"], name="n0"),
             helper.make_node("Add", ["tokens", "pos"], ["stream"], name="n1"),
             helper.make_node("LayerNormalization", ["stream", "g", "b"], ["feature"], name="n2", axis=-1),
             helper.make_node("MatMul", ["feature", "W"], ["attn"], name="n3"),
             helper.make_node("Add", ["stream", "attn"], ["stream2"], name="n4"),  # around the feature
             helper.make_node("Shape", ["x"], ["xshape"], name="n5"),  # the image's batch size
             helper.make_node("Gather", ["xshape", "zero"], ["batch"], name="n6", axis=0),
             helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"], name="n7"),
             helper.make_node("Concat", ["batch1", "minus1"], ["target"], name="n8", axis=0),
             helper.make_node("Reshape", ["stream2", "target"], ["flat"], name="n9"),
             helper.make_node("Identity", ["Wh"], ["Wh_id"], name="n10"),  # a weight shared under two names
             helper.make_node("MatMul", ["flat", "Wh_id"], ["logits"], name="n11"),
             helper.make_node("Softmax", ["logits"], ["probs"], name="n12", axis=-1),
             helper.make_node("ReduceMean", ["stream"], ["pooled"], name="n13")]  # not on the way to the scores
    inits = [const("shape0", [1, 16, 3]), const("pos", np.zeros((16, 3), np.float32)),
             const("g", np.ones(3, np.float32)), const("b", np.zeros(3, np.float32)),
             const("W", np.eye(3, dtype=np.float32)), const("zero", np.int64(0)), const("axes0", [0]),
             const("minus1", [-1]), const("Wh", np.ones((48, 5), np.float32))]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("pooled", TensorProto.FLOAT, None)], initializer=inits)
    return graph


def _names(nodes):
    return [n.name for n in nodes]


def test_export_head_is_what_the_feature_reaches_and_reads_the_rest_from_the_graph():
    graph = _graph()
    nodes, reads = head_nodes(graph, "feature", "probs")
    assert _names(nodes) == ["n3", "n4", "n9", "n11", "n12"]
    assert reads == ["W", "Wh_id", "feature", "stream", "target"]
    assert image_reads(graph, reads) == ["feature", "stream"]  # the residual stream: masked with the feature
    head = Head(graph, "feature", "probs")
    assert _names(head.nodes) == _names(nodes) and head.found
    assert head.inputs == set(reads) and head.tensors == {"attn", "stream2", "flat", "logits", "probs"}
    # roots: where the head starts besides the feature (their producers are not in it, as the feature's)
    rooted = Head(graph, "feature", "probs", roots=("xshape",))
    assert _names(rooted.nodes) == ["n3", "n4", "n6", "n7", "n8", "n9", "n11", "n12"]
    assert rooted.inputs == {"W", "Wh_id", "feature", "stream", "xshape", "zero", "axes0", "minus1"}
    # a feature the scores do not depend on: no head
    assert not Head(graph, "pooled", "probs").found and Head(graph, "pooled", "probs").inputs == set()


def test_recipro_head_cut_computes_constants_and_keeps_shape_of_the_image():
    """The two-stage head, a model of its own: the weight's Identity and the Reshape target are computed
    in it, Shape(image) stays in it without the image (rewritten by ``head_of``), the scores are reached
    through both the Softmax output and its logits; the residual stream is its other input."""
    graph = _graph()
    net = SimpleNamespace(model=helper.make_model(graph), input=SimpleNamespace(name="x"),
                          structure=SimpleNamespace(image_dependent=frozenset(image_dependent(graph, "x"))),
                          output=SimpleNamespace(name="probs", softmax_input="logits"))
    nodes, side = head_cut(net, "feature")
    assert _names(nodes) == ["n3", "n4", "n5", "n6", "n7", "n8", "n9", "n10", "n11", "n12"]
    assert side == ["stream"]
    # on the stream itself: the head reads the image only through it
    nodes, side = head_cut(net, "stream")
    assert _names(nodes) == ["n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9", "n10", "n11", "n12"] and side == []


def test_subgraph_reads_are_the_names_read_from_around_the_subgraph():
    branch = helper.make_graph([helper.make_node("Mul", ["outer", "inner_w"], ["t"]),
                                helper.make_node("Relu", ["t"], ["y"])], "branch", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                               initializer=[numpy_helper.from_array(np.ones(1, np.float32), "inner_w")])
    node = helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=branch)
    assert subgraph_reads(node) == ["outer", "outer"]


def test_integer_values_run_the_head_at_the_given_shapes_and_never_raise():
    """``integer_values`` (the Shape and Reshape-target values ``select_early`` reads) runs a head on
    zeros: at the shapes given for its inputs, where a symbolic axis taken as 1 cannot run (a Hugging
    Face SegFormer's and SwinV2's token heads: onnxruntime's Gemm refused the ranks, a raw error left
    ``recipro_cam``); where the head cannot run at all, nothing is read (no raise)."""
    from explainer.export.head import integer_values

    c = 4
    tokens = helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", "T", c])
    nodes = [helper.make_node("Shape", ["tokens"], ["shape"]),
             helper.make_node("Reshape", ["tokens", "pairs"], ["paired"]),  # needs an even token count
             helper.make_node("ReduceMean", ["paired"], ["scores"], axes=[1], keepdims=0)]
    graph = helper.make_graph(nodes, "head", [tokens], [helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(np.asarray([0, -1, 2 * c], np.int64), "pairs")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert integer_values(model) == {}  # T taken as 1: the Reshape cannot pair the tokens
    values = integer_values(model, {"tokens": (1, 6, c)})
    assert values, "ran"
    np.testing.assert_array_equal(values["shape"], [1, 6, c])
