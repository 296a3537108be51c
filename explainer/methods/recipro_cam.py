"""Recipro-CAM (Byun & Lee 2022, arXiv 2209.14074) and, on token layers, ViT-ReciproCAM (Byun & Lee
2023, arXiv 2310.02588): CAMs without gradients, from one forward pass and one re-run of the head.

The image runs once to the feature layer (an extra output of the onnxruntime session). The *head*, the
subgraph from the feature tensor to the scores, is extracted from the runtime graph and runs in its
own onnxruntime session on ``h * w`` copies of the feature tensor, copy ``k`` keeping only spatial
location ``k``: the map at ``k`` is the target class's score of that copy. All labels share the runs.

Masks (``kernel``): ``"point"`` keeps location ``k`` alone, zeroing the others (the paper's and
OpenVINO XAI's CNN Recipro-CAM); ``"gaussian"`` keeps its 3 x 3 neighbourhood weighted by
[[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16, cut at the border and not renormalised (OpenVINO XAI's
ViTReciproCAM default); ``"auto"``: point on feature maps, gaussian on tokens.

Token layers (ViT, DeiT, ...): the same method, dispatched on the layer's layout. Class and
distillation tokens are kept unmasked in every copy; the patch tokens are masked. The default layer is
Grad-CAM's, on a ViT the first LayerNorm of the last block (``norm1``); the head from it also reads the
block's input through the residual connection, and that tensor is masked the same way, so the LayerNorm
normalises the unmasked tokens and both its output and the residual stream are masked: what OpenVINO
XAI's ViTReciproCAM does (masks after the block's input Add and after its LayerNorm, last block).
Generally: every tensor the head reads from the image other than the feature layer must have the
feature layer's token layout (it is masked alike); on a feature map (C, h, w) or a channels-last grid
the head must read the image through the layer alone (a layer inside a residual block is refused with
``HeadSplitError``, naming the nearest layer that splits the graph).

Scores (``scores``): ``"probabilities"`` (the paper's softmax of the re-run scores, default) or
``"logits"`` (the pre-softmax scores; for a graph that outputs only probabilities, their logarithm):
OpenVINO XAI 1.1.0 takes the logits (the input of a trailing Softmax where there is one). Each class's
map is then scaled to [0, 1] (min-max, as the paper; OpenVINO XAI scales to 0..255), upsampled to the
image's size (bicubic, as every CAM here) and clamped at 0, as the exported graph does (the bicubic
filter may overshoot 1 by a few percent between locations). A constant map is all zeros.

Speed: where a token head reads one token (a ViT's class token, ``Gather(axis=1)``), a copy of the head
picks that token as early as the ops allow (``select_early``): back through the final norm, the last
block's MLP, projection, residual Adds and norms, and into its attention, whose query is picked (the
keys and values still come from every token), following the token axis through Transposes and
Reshapes (targets held as constants, or computed from Shapes as a dynamic-batch export writes them:
their values read once on a run of zeros, the token entry then set to 1 in the graph). Those ops then
run on one token per masked copy instead of all of them: the same values
(checked once per head against the whole head, which is kept where they differ beyond float32
rounding); on ViT-Tiny the head takes about a third of the time. On a feature map that the head pools
globally first (GlobalAveragePool: ResNet, EfficientNet, ...), a point-masked copy pools to its
location's vector / (h*w): the head after the pool runs on those vectors (``pooled_head``; checked
once per head against the whole head on the masked maps), not on h*w masked maps.

In one session (``recipro_cam_engine``): on a feature map with point masks (CNNs) and on a token layer
with the Gaussian (ViTs, at float32) the whole method runs as one call of the classifier's graph with
the Recipro-CAM branch that ``export_explained`` writes (explainer/export/recipro_cam.py: the feature
layer, and on tokens the residual stream read with it, tiled with the h*w masks, a copy of the head on
the copies; on tokens the head that reads the class token early), on the classifier's own engine
(onnxruntime, or OpenVINO at the classifier's precision): no Python between the backbone and the head,
no copy of the feature tensor out of the runtime and back (ViT-Tiny, every class, 2026-12-07: 1.36-1.39x
faster than two stages on onnxruntime, 1.29-1.31x on OpenVINO f32, whose two-stage head of two inputs
runs on onnxruntime). Where the head pools the map globally (ResNet, EfficientNet) the branch is the pooled
vectors (a Reshape, Transpose and Div of the feature map, no masked copies) and the head after the pool
on them: about 1 % of ResNet-18's run (its Gemm), the rest the backbone. The session is the engine's
(``OrtEngine.session``), on OpenVINO compiled for one image. The branch returns the copies' raw scores (``COPY_SCORES``), which are turned into
probabilities or logits and scaled as the two-stage path does, and every class's map of probabilities
scaled in the graph (``EVERY_MAP``: the softmax and the scaling of 1,000 maps took about 0.5 ms of
Python a call), read instead where it equals the maps scaled here (``_branch_scales``: feature maps at
float32). The path is taken once the branch agrees
with the two-stage path on a random image: on feature maps their maps (every class, logits) within
1e-4 of the range (on EfficientNet-Lite0 and ResNet-18 they are bit-identical; tested to 1e-5); on
tokens the copies' raw scores within ``TOKEN_SCORES_TOLERANCE`` (1e-5) of their range (ViT-Tiny's are
equal on onnxruntime, 4e-7 apart on OpenVINO f32): a token map's class barely varies over the copies,
and its min-max scaling magnifies float32 rounding of another op order up to 10^4-fold. Token layers
with point masks or at bf16 / f16, feature maps with other kernels, a quantized graph's rounded scores, a
branch that cannot be written or opened or that disagrees, a ``batch_size`` below h*w or copies over the
run budget take the two-stage path described above; ``recipro_cam_engine(net)`` says which runs and
why, ``path=`` forces one.

Memory: the masked copies stream through the shared batching loop (``stream_probabilities``), a
batch per stream at a time, each batch bounded by the run budget: a copy counts as one image's run of
the whole graph (the head's intermediates are a subset) plus its masked feature tensors.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from .. import limits, registries
from ..errors import ExplainerError, HeadSplitError, InvalidParameterError, LayerNotFeatureMapError, ResourceLimitError
from ..export.engine import Decision
from ..export.head import integer_values, select_early
from ..graph import dims, head_nodes, infer_shapes, producers, reads, subgraphs
from ..model.structure import image_reads
from ..runtime.budget import IN_FLIGHT, peak_at
from ..runtime.feature_layers import default_feature_layer, location_masks
from ..runtime.ort_engine import OrtEngine
from ..runtime.perturb import stream_probabilities
from ._common import finish, images_and_labels, resize_map
from .registry import FORWARD_ONLY, BatchSize, Choice, Flag, LayerName, method, public

if TYPE_CHECKING:
    from ..model.layouts import FeatureLayout
    from ..runtime.classifier import Classifier, Layer

KERNELS = ("auto", "point", "gaussian")
SCORES = ("probabilities", "logits")


# masks (location_masks: explainer/runtime/feature_layers.py) ------------------------------------------
def mosaic(value: np.ndarray, layout: FeatureLayout, masks: np.ndarray) -> np.ndarray:
    """``value`` (1, *per-image shape) of ``layout`` times each of ``masks`` (n, h, w): (n, ...) in the
    tensor's own layout and dtype; leading (class) tokens kept."""
    n = len(masks)
    if layout.kind == "CHW":
        out = value.astype(np.float32) * masks[:, None]
    elif layout.kind == "HWC":
        out = value.astype(np.float32) * masks[..., None]
    else:
        out = np.repeat(value.astype(np.float32), n, axis=0)
        out[:, layout.prefix:] *= masks.reshape(n, -1, 1)
    return out.astype(value.dtype, copy=False)


# the head -----------------------------------------------------------------------------------------
@dataclass
class Head:
    """The subgraph from the feature layer (and the tensors masked with it) to the scores."""

    feature: str
    inputs: tuple[str, ...]  # the feature tensor first, then the other tensors masked like it
    layout: FeatureLayout
    outputs: tuple[str, ...]  # the graph's scores output, then the logits before its Softmax if any
    model: onnx.ModelProto
    engine: object  # OrtEngine of ``model``, or of its copy that reads the class token early (``select_early``)
    full_engine: object = None  # OrtEngine of ``model`` until the early-selecting copy is checked against it
    checked: bool = False
    #: (the global pool's output, OrtEngine of the head after it) where the head starts by pooling the
    #: feature map globally: point masks then need only each location's vector / (h*w) (``pooled_head``)
    pooled: tuple | None = None


def head_cut(net: Classifier, feature: str) -> tuple[list, list[str]]:
    """(head nodes in graph order, image-dependent tensors other than ``feature`` that they read): the
    nodes between ``feature`` and the scores (and the logits before their Softmax), ``graph.head_nodes``
    with what the two-stage head, a model of its own, needs beside export's copy inside the graph:
    tensors computed from constants alone (shapes, weights' Identities) are computed in the head too;
    the image-dependent ones around the feature are its other inputs (``image_reads``); a Shape of the
    image (the batch passes' batch size) stays in the head without the image, for ``head_of`` to
    rewrite (``_image_shape_nodes``)."""
    graph = net.model.graph
    flows = net.structure.image_dependent
    targets = [net.output.name] + ([net.output.softmax_input] if net.output.softmax_input else [])
    nodes, reads = head_nodes(graph, feature, targets,
                              take=lambda node, name: name not in flows and not _reads_image_shape(net, node))
    producer = producers(graph)
    shapes = {id(producer[t]) for t in reads if t in producer and _reads_image_shape(net, producer[t])}
    if shapes:
        kept = {id(n) for n in nodes} | shapes
        nodes = [n for n in graph.node if id(n) in kept]
    return nodes, [t for t in image_reads(graph, reads, flows) if t != feature]


def _reads_image_shape(net: Classifier, node) -> bool:
    """A Shape of the image input (the library's batch passes read the batch size there)."""
    return node.op_type == "Shape" and node.input[0] == net.input.name and not node.attribute


def _image_shape_nodes(net: Classifier, node, feature: str) -> list:
    """Nodes giving ``Shape(image)``'s output in the head: the image's shape with the head's batch (the
    masked copies), read from the feature tensor's first axis."""
    out = node.output[0]
    per_image = helper.make_tensor(f"{out}/per_image", onnx.TensorProto.INT64, [len(net.per_image_shape)],
                                   [int(d) for d in net.per_image_shape])
    return [helper.make_node("Shape", [feature], [f"{out}/feature_shape"]),
            helper.make_node("Constant", [], [f"{out}/zero"], value=helper.make_tensor("", onnx.TensorProto.INT64, [1], [0])),
            helper.make_node("Constant", [], [f"{out}/one"], value=helper.make_tensor("", onnx.TensorProto.INT64, [1], [1])),
            helper.make_node("Slice", [f"{out}/feature_shape", f"{out}/zero", f"{out}/one"], [f"{out}/batch"]),
            helper.make_node("Constant", [], [f"{out}/per_image"], value=per_image),
            helper.make_node("Concat", [f"{out}/batch", f"{out}/per_image"], [out], axis=0)]


def _splits(net: Classifier, layer) -> bool:
    """Whether the head can be split at ``layer``: every other tensor it reads from the image has the
    layer's token layout (none on a feature map)."""
    layout = net.layout(layer)
    if layout is None:
        return False
    side = head_cut(net, layer.output)[1]
    return all(s != net.input.name and layout.kind == "tokens" and net.layout(s) == layout for s in side)


def _nearest_split(net: Classifier, layer: Layer, layout: FeatureLayout) -> tuple[str | None, str]:
    """(name, where) of the nearest layer the head can be split at: after ``layer`` on a feature map (the
    output of the block it sits in), before it on tokens (the token stream before class-attention
    blocks, which read the patch tokens beside the class token); (None, "") when none is."""
    layers = [l for l in net.layers() if l.output in net.structure.image_dependent]
    names = [l.name for l in layers]
    at = names.index(layer.name) if layer.name in names else len(layers)
    after = layout.kind != "tokens"
    for candidate in (layers[at + 1:] if after else reversed(layers[:at])):
        try:
            if _splits(net, candidate):
                return candidate.name, "after" if after else "before"
        except Exception:  # noqa: BLE001 - a layer whose layout cannot be read is no candidate
            continue
    return None, ""


#: the heads made per Classifier (dropped with it) and feature tensor
_HEADS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.RLock()


def head_of(net: Classifier, layer: Layer, where: str = "recipro_cam") -> Head:
    """The net's head from ``layer`` (made once per layer, kept on the net); refuses layers that are
    not feature maps or that the scores bypass."""
    with _LOCK:
        cache = _HEADS.setdefault(net, {})
        if layer.output in cache:
            return cache[layer.output]
        layout = net.feature_map_layout(layer, where)
        if layout is None:
            raise LayerNotFeatureMapError(
                f"{where}: layer {layer.name!r} ({layer.op_type}) has no spatial dimensions (shape "
                f"{layer.shape} per image): Recipro-CAM masks one location of a feature map at a time. "
                "Pick a (C, H, W) map, a channels-last grid or tokens on the image's grid; "
                "feature_layer=None takes Grad-CAM's default layer.")
        nodes, side = head_cut(net, layer.output)
        bad = [s for s in side if s == net.input.name or layout.kind != "tokens" or net.layout(s) != layout]
        if bad:
            what = ("the image input itself" if bad[0] == net.input.name else
                    f"tensor {bad[0]!r}" + (f" ({net.layer(bad[0]).op_type})" if _is_layer(net, bad[0]) else ""))
            nearest, side_of = _nearest_split(net, layer, layout)
            fix = (f"pick a layer every path from the image to the scores passes through, e.g. "
                   f"feature_layer={nearest!r} (the nearest one {side_of} it)" if nearest else
                   "pick a layer every path from the image to the scores passes through (net.layers() "
                   "lists them)")
            if layer.name != _default_layer(net):
                fix += ", or feature_layer=None (the default layer)"
            raise HeadSplitError(
                f"{where}: the scores depend on the image other than through layer {layer.name!r}: the "
                f"head after it also reads {what}, around the layer (a skip connection or a second "
                f"branch), so masking the layer alone does not mask what the head sees. To go on: {fix}.")
        outputs = (net.output.name,) + ((net.output.softmax_input,) if net.output.softmax_input else ())
        nodes = [m for n in nodes for m in (_image_shape_nodes(net, n, layer.output) if _reads_image_shape(net, n) else [n])]
        model = _head_model(net, nodes, (layer.output, *side), outputs)
        key = f"{net.ort.model_key}|recipro:{layer.output}"

        def engine_of(graph, input_name, suffix=""):
            # the classifier's engine (OpenVINO at its precision too) where it takes the head's one input;
            # onnxruntime's CPU provider for a head with several inputs (a ViT's residual stream)
            if not side and net.ort.engine == "openvino":
                return net.ort.derived(graph, input_name, key + suffix)
            providers = net.ort.providers if net.ort.engine == "onnxruntime" else ["CPUExecutionProvider"]
            engine = OrtEngine(graph, input_name, providers, key + suffix)
            engine.optimisation = net.ort.optimisation  # the classifier's graph optimisations
            return engine

        engine = engine_of(model, layer.output)
        head = Head(layer.output, (layer.output, *side), layout, outputs, model, engine)
        # Reshape targets computed from Shapes (a dynamic-batch export's) read on one run of zeros
        early = None
        if layout.kind == "tokens":
            shapes = {t: (1, *net.layer(t).shape) for t in head.inputs if _is_layer(net, t) and net.layer(t).shape}
            early = select_early(model, layout, integer_values(model, shapes))
        if early is not None:
            head.full_engine, head.engine = engine, engine_of(early, layer.output, "|early")
        after_pool = pooled_head(model, layer.output) if layout.kind == "CHW" and not side else None
        if after_pool is not None:
            head.pooled = (after_pool[0], engine_of(after_pool[1], after_pool[0], "|pooled"))
        cache[layer.output] = head
        return head


def _is_layer(net: Classifier, name: str) -> bool:
    return any(n.output and n.output[0] == name for n in net.model.graph.node)


def _head_model(net: Classifier, nodes, inputs, outputs) -> onnx.ModelProto:
    m = net.model
    known = infer_shapes(m)

    def info(name: str, free_batch: bool):
        vi = known.get(name)
        elem = (vi.type.tensor_type.elem_type if vi is not None else 0) or onnx.TensorProto.FLOAT
        shape = None
        if free_batch and vi is not None and vi.type.tensor_type.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
            shape = ["N"] + dims[1:] if dims and None not in dims[1:] else None
        return helper.make_tensor_value_info(name, elem, shape)

    used = {i for n in nodes for i in reads(n)}  # a Loop's body reads weights from around it too
    graph = helper.make_graph(list(nodes), "recipro_cam_head", [info(i, True) for i in inputs],
                              [info(o, False) for o in outputs],
                              initializer=[t for t in m.graph.initializer if t.name in used])
    out = helper.make_model(graph, opset_imports=list(m.opset_import), ir_version=m.ir_version)
    out.functions.extend(m.functions)
    return out


def pooled_head(model: onnx.ModelProto, feature: str) -> tuple[str, onnx.ModelProto] | None:
    """(pool output, the head after it) where the feature map's only reader is a GlobalAveragePool: a copy
    keeping location (i, j) alone pools to that location's vector / (h*w), so point masks need the head
    after the pool only, on (h*w, C, 1, 1) vectors instead of (h*w, C, h, w) maps; None otherwise."""
    readers = [n for n in model.graph.node if feature in n.input]
    if len(readers) != 1 or readers[0].op_type != "GlobalAveragePool":
        return None
    pool = readers[0].output[0]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [n for n in out.graph.node if n.output[0] != pool]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    elem = out.graph.input[0].type.tensor_type.elem_type
    del out.graph.input[:]
    out.graph.input.append(helper.make_tensor_value_info(pool, elem, ["N", None, 1, 1]))
    return pool, out


# the in-graph path ----------------------------------------------------------------------------------
IN_GRAPH, TWO_STAGE = "in-graph", "two-stage"
PATHS = ("auto", IN_GRAPH, TWO_STAGE)
#: the explained graph's output holding the masked copies' scores (N*h*w, classes): export/recipro_cam.py
COPY_SCORES = "saliency_copy_scores"
#: its output holding every class's map (N, classes, h*w): the softmax of the copies' scores, each class
#: min-max scaled over the locations (``_in_graph_maps`` reads it where those are the maps asked for)
EVERY_MAP = "saliency_every_map"
#: the in-graph decisions and sessions per Classifier (dropped with it): {(feature, kernel): (choice, session,
#: whether the branch's scaled maps serve probabilities, the bytes of its run of one image)}
_GRAPHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
registries.register_classifier_cache("Recipro-CAM heads and in-graph sessions", _HEADS, _GRAPHS, lock=_LOCK)


class ReciproPath(Decision):
    """Where ``explainer.recipro_cam`` runs for a classifier, layer and kernel: ``"in-graph"`` (one session
    of the classifier's graph with the Recipro-CAM branch of ``export_explained``: the backbone, the h*w
    masked copies of the feature layer and the head in one call, on the classifier's engine) or
    ``"two-stage"`` (the backbone pass, then the head on the masked copies in its own session), with
    ``reason``; ``describe()`` gives both."""

    def __new__(cls, path: str, reason: str):
        return super().__new__(cls, path, reason, path == IN_GRAPH)


def _engine_name(net: Classifier) -> str:
    if net.ort.engine == "openvino":
        return f"OpenVINO {net.ort.precision}"
    return "onnxruntime"


def _not_in_graph(net: Classifier, layout: FeatureLayout, kernel: str) -> str | None:
    """Why the in-graph path does not run for this layout and kernel (None: it may)."""
    if layout.kind == "tokens":
        if _kernel(kernel, layout) != "gaussian":
            return f"kernel {kernel!r} on a token layer: the graph's branch masks tokens with the 3x3 Gaussian"
        precision = getattr(net.ort, "precision", "f32")
        if precision != "f32":
            return (f"token layer at {precision}: the branch's head would round at {precision} too (ViT-Tiny's "
                    "copies' scores 5e-3 of their range off float32's, near-flat classes' maps uncorrelated)")
    elif _kernel(kernel, layout) != "point":
        return f"kernel {kernel!r}: the graph's branch keeps single locations (point masks)"
    if net.gradient_scores != (net.output.softmax_input or net.output.name):
        return ("the graph's scores are rounded after the tensor the branch scores (a quantized output): "
                "the head's own outputs are taken in two stages")
    return None


def _open_in_graph(net: Classifier, layer: Layer) -> tuple:
    """(the session of ``net.model`` plus the Recipro-CAM branch at ``layer``, the bytes of its run of one
    image or None: ``budget.peak_at`` of that graph, the h*w copies included). The session is kept to
    its ``COPY_SCORES`` and ``EVERY_MAP`` outputs, on the classifier's engine (``net.ort.derived``: onnxruntime on its providers, or OpenVINO at
    its precision, there for a batch of one image), opened as the engine opens the classifier's own; zero
    Pads are already folded into their Convs in ``net.model`` (the ``fold-zero-pads`` pass)."""
    from ..export.writer import build_explained

    model = _only(build_explained(net, "recipro_cam", layer.name, 1, "feature", source=net.model, diagnostics=True,
                                  where="recipro_cam"), (COPY_SCORES, EVERY_MAP))
    if net.ort.engine != "onnxruntime":  # OpenVINO: compiled for one image (each call explains one): a static
        _one_image(model, net.input.name)  # shape took 2-9 % less CPU time than the dynamic batch (ResNet-18, Lite0)
    need = peak_at(model, net.input.name, [1, *net.per_image_shape]) if getattr(net.ort, "guard", None) else None
    if need is not None and need > limits.max_run_bytes():
        raise ResourceLimitError(f"recipro_cam: the graph with the {layer.name!r} copies needs about "
                                 f"{need / (1 << 20):,.1f} MiB for one image, over the run budget")
    engine = net.ort.derived(model, net.input.name, f"{net.ort.model_key}|recipro_in_graph:{layer.output}")
    return engine.session([]), need


def _one_image(model: onnx.ModelProto, input_name: str) -> None:
    """The model's image input fixed to a batch of 1, in place (``_in_graph_maps`` feeds one image)."""
    for value in model.graph.input:
        if value.name == input_name and value.type.tensor_type.shape.dim:
            first = value.type.tensor_type.shape.dim[0]
            first.ClearField("dim_param")
            first.dim_value = 1


def _only(model: onnx.ModelProto, keep: tuple[str, ...]) -> onnx.ModelProto:
    """``model`` with the outputs ``keep`` alone and the nodes they do not need dropped (the explained
    graph's maps, classes and the source's own outputs: an engine that computes every output would run
    them on each call)."""
    graph = model.graph
    if any(subgraphs(n) for n in graph.node):
        return model  # subgraphs read outer names beside their inputs: left whole
    producer = producers(graph)
    needed, todo = set(), list(keep)
    while todo:
        node = producer.get(todo.pop())
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        todo.extend(i for i in node.input if i)
    kept = [n for n in graph.node if id(n) in needed]
    outputs = [o for o in graph.output if o.name in keep]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.output[:]
    graph.output.extend(outputs)
    used = {i for n in kept for i in n.input}
    weights = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(weights)
    return model


def _why_not(exc: BaseException) -> str:
    text = str(exc)
    for prefix in ("export: ", "recipro_cam: ", "export: recipro_cam: "):
        text = text[len(prefix):] if text.startswith(prefix) else text
    return text.split(". ")[0].rstrip(".")[:300]


def _in_graph_entry(net: Classifier, layer: Layer, kernel: str) -> tuple:
    """(ReciproPath, session or None, whether the branch's scaled maps serve probabilities
    (``_branch_scales``), the bytes of the session's run or None) for ``layer`` and ``kernel``: decided once per classifier (the branch written and
    its session opened, or the reason it is not), then read from the per-classifier table."""
    layout = head_of(net, layer).layout
    key = (layer.output, _kernel(kernel, layout))
    with _LOCK:
        per_net = _GRAPHS.setdefault(net, {})
        if key in per_net:
            return per_net[key]
        reason = _not_in_graph(net, layout, kernel)
        if reason is not None:
            entry = (ReciproPath(TWO_STAGE, reason), None, False, None)
        else:
            copies = layout.grid[0] * layout.grid[1]
            need = None
            try:
                session, need = _open_in_graph(net, layer)
                reason = _disagreement(net, layer, session, need)
            except Exception as exc:  # noqa: BLE001 - a branch that cannot be written or opened: two stages
                session, reason = None, f"the graph's branch cannot be written or opened: {_why_not(exc)}"
            if reason is None:
                what = ("masked copies of the feature layer" if layout.kind != "tokens" else
                        "Gaussian-masked copies of the feature tokens" + (" and of the residual stream"
                                                                          if len(head_of(net, layer).inputs) > 1 else ""))
                entry = (ReciproPath(IN_GRAPH, f"one {_engine_name(net)} session: the backbone, {copies} {what} "
                                               "and the head"), session,
                         _branch_scales(net, head_of(net, layer), session, need), need)
                _close_two_stage(net, head_of(net, layer))
            else:
                entry = (ReciproPath(TWO_STAGE, reason), None, False, None)
        per_net[key] = entry
        return entry


def _close_two_stage(net: Classifier, head: Head) -> None:
    """The sessions the in-graph check opened for the two-stage path (the head's, the classifier's with
    the feature layer as an output) closed once the in-graph path is chosen: they hold their own copies
    of the weights (about 675 MB for a seeded AlexNet's head); a two-stage call asked for later (another
    kernel, ``path="two-stage"``) opens them again."""
    for engine in (head.engine, head.full_engine, head.pooled[1] if head.pooled else None):
        if engine is not None:
            engine.drop_sessions()
    net.ort.drop_sessions(list(head.inputs))


@public
def recipro_cam_engine(net: Classifier, feature_layer=None, kernel: str = "auto") -> ReciproPath:
    """Where ``explainer.recipro_cam`` runs for ``net`` at ``feature_layer`` (None: the default layer) with
    ``kernel``, and why: ``"in-graph"`` -- one session call of the classifier's graph with the exported
    Recipro-CAM branch (backbone, h*w masked copies, head), on the classifier's engine (onnxruntime, or
    OpenVINO at its precision) -- on feature maps with point masks and on token layers with the Gaussian
    (at float32), where the branch agrees with the two-stage path; else ``"two-stage"`` (the backbone
    pass, then the head on the masked copies in a session of its own), with the reason ("kernel
    'gaussian': ...", "token layer at bf16: ...", the branch's error or disagreement). Decided once per
    classifier, layer and kernel."""
    if kernel not in KERNELS:
        raise InvalidParameterError(f"recipro_cam_engine: kernel must be one of {KERNELS}; got {kernel!r}.")
    layer = net.layer(feature_layer if feature_layer is not None else _default_layer(net))
    return _in_graph_entry(net, layer, kernel)[0]


#: on token layers, how far apart (of their range over all copies and classes) the branch's copies' raw
#: scores may be from the two-stage head's: float32 rounding of another op order (ViT-Tiny's, five images:
#: equal on onnxruntime, at most 3.7e-7 of the range on OpenVINO f32)
TOKEN_SCORES_TOLERANCE = 1e-5


def _disagreement(net: Classifier, layer: Layer, session, need: int | None = None) -> str | None:
    """Once per classifier and layer: the branch's maps of a random image (every class, logits) against
    the two-stage path's; the reason the in-graph path is not taken (a run that fails, e.g. a head that
    reads the image's batch size where the copies have another, or maps more than 1e-4 of the range
    apart; at bf16 / f16, where the two graphs round apart, correlating below 0.99), else None. On token
    layers the copies' raw scores (logits) are compared instead, within ``TOKEN_SCORES_TOLERANCE`` of
    their range: a token map's class varies little over the copies (ViT-Tiny's least varying by 1e-4 of
    the scores' range), so min-max scaling magnifies float32 rounding there by up to 10^4 (maps up to
    2e-3 of their range apart on OpenVINO f32 where the raw scores are 4e-7 of theirs)."""
    head = head_of(net, layer)
    if not _copies_fit(net, head):
        return "the masked copies of one image exceed the run budget in one run: they stream in two stages"
    pixels = np.random.default_rng(0).uniform(0, 255, (1, *net.input_size, net.input.channels)).astype(np.float32)
    x = net.to_model_input(pixels)
    every = list(range(net.num_classes))
    if head.layout.kind == "tokens":
        return _token_disagreement(net, head, session, x, every, need)
    try:
        one = _in_graph_maps(net, head, session, x, every, "logits", need=need)
    except Exception as exc:  # noqa: BLE001
        return f"the graph's branch fails at run time: {_why_not(exc)}"
    two = maps_from_values(net, head, net.ort.run(x, list(head.inputs)), every, kernel="point", scores="logits")
    diff = float(np.abs(one - two).max())
    other = "the graph's branch gives other maps than the head"
    if getattr(net.ort, "precision", "f32") == "f32":
        return None if diff <= 1e-4 else f"{other} (by {diff:.1e} of the range)"
    # bf16 / f16: the two graphs round apart (a few percent of the range); a wrong branch would not correlate
    r = float(np.corrcoef(one.ravel(), two.ravel())[0, 1])
    return None if r >= 0.99 else f"{other} (r = {r:.4f} at {net.ort.precision})"


#: how far apart (of the [0, 1] range) the branch's scaled maps of probabilities may be from the maps scaled
#: here from the same call's copies' scores for the branch's to be read (``_branch_scales``): the two
#: softmaxes round apart by about 1e-8 of a probability, which min-max scaling magnifies where a class's
#: map barely varies (EfficientNet-Lite0's, a random image: 1.5e-5 at most; ResNet-18's: 1.1e-6); the same
#: bound as the in-graph path's own check against the two-stage path
BRANCH_SCALING_TOLERANCE = 1e-4


def _branch_scales(net: Classifier, head: Head, session, need: int | None = None) -> bool:
    """Once per classifier and layer, where the in-graph path runs: whether the branch's own scaled maps
    (``EVERY_MAP``) serve ``scores="probabilities"``, saving the softmax and the scaling of every class's
    map here (about 0.5 ms a call on 1,000 classes): on feature maps at float32, where the library's
    probabilities are the softmax of the scores the branch reads (a graph ending in a Softmax, or giving
    logits), and where they equal the maps scaled here from the same call's copies' scores on a random
    image within ``BRANCH_SCALING_TOLERANCE``; never on token layers (their maps barely vary: scaling
    magnifies the softmaxes' rounding there up to 10^4-fold)."""
    softmax_of_scores = net.output.softmax_input or not net.output.is_probability  # as ``scores_from_outputs``
    if head.layout.kind == "tokens" or not softmax_of_scores or getattr(net.ort, "precision", "f32") != "f32":
        return False
    pixels = np.random.default_rng(1).uniform(0, 255, (1, *net.input_size, net.input.channels)).astype(np.float32)
    try:
        raw, every = _run_copies(net, session, net.to_model_input(pixels), (COPY_SCORES, EVERY_MAP), need)
    except Exception:  # noqa: BLE001 - the copies' scores, scaled here, serve then
        return False
    if not np.all(np.isfinite(raw)):
        return False
    h, w = head.layout.grid
    here = normalise(_copy_scores(net, raw, "probabilities").astype(np.float64).T.reshape(-1, h, w))
    return float(np.abs(every[0].reshape(here.shape) - here).max()) <= BRANCH_SCALING_TOLERANCE


def _token_disagreement(net: Classifier, head: Head, session, x: np.ndarray, every: list,
                        need: int | None = None) -> str | None:
    """The branch's copies' raw scores of model input ``x`` against the two-stage head's on the same
    Gaussian-masked copies (``_disagreement`` on token layers)."""
    try:
        one = _copy_scores(net, _run_copies(net, session, x, need=need)[0], "logits").astype(np.float64)
    except Exception as exc:  # noqa: BLE001
        return f"the graph's branch fails at run time: {_why_not(exc)}"
    two = copy_scores(net, head, net.ort.run(x, list(head.inputs)), every, kernel="gaussian", scores="logits")
    if one.shape != two.shape:
        return f"the graph's branch gives {one.shape} copies' scores, the head {two.shape}"
    span = max(float(two.max() - two.min()), np.finfo(np.float32).tiny)
    diff = float(np.abs(one - two).max()) / span
    if diff <= TOKEN_SCORES_TOLERANCE:
        return None
    return f"the graph's branch gives other copies' scores than the head (by {diff:.1e} of their range)"


def _run_copies(net: Classifier, session, x: np.ndarray, outputs=(COPY_SCORES,),
                need: int | None = None) -> list[np.ndarray]:
    """The branch's ``outputs`` of model input ``x`` (1, ...): ``COPY_SCORES`` (h*w, classes), ``EVERY_MAP``
    (1, classes, h*w). The run counts ``need`` bytes among the runs in flight (the graph with the copies;
    None: the classifier's forward of ``x``)."""
    held = net.ort.held(x.shape) if need is None else IN_FLIGHT.hold(need)
    try:
        with held:
            return session.run(list(outputs), {net.input.name: x})
    except ExplainerError:
        raise
    except Exception as exc:
        raise net.ort.failure(exc, x.shape) from None


def _in_graph_maps(net: Classifier, head: Head, session, x: np.ndarray, indices, scores: str,
                   scaled: bool = False, need: int | None = None) -> np.ndarray:
    """(K, h, w) maps of model input ``x`` (1, ...) from one call of the explained graph's session: the
    branch's scaled maps of every class where ``scaled`` (``_branch_scales``) and the probabilities are
    asked for, else scaled here from the copies' scores."""
    h, w = head.layout.grid
    if scaled and scores == "probabilities":
        raw, every = _run_copies(net, session, x, (COPY_SCORES, EVERY_MAP), need)
        if not np.all(np.isfinite(raw)):
            net.scores_from_outputs([raw.reshape(len(raw), -1)])  # raises the library's NonFiniteOutputError
        _check_classes(indices, every.shape[1])
        return every[0, indices].reshape(len(indices), h, w).astype(np.float32)
    s = _copy_scores(net, _run_copies(net, session, x, need=need)[0], scores)
    _check_classes(indices, s.shape[1])
    return normalise(s[:, indices].astype(np.float64).T.reshape(len(indices), h, w))


def _check_classes(indices, classes: int) -> None:
    if classes <= max(indices):
        raise InvalidParameterError(f"recipro_cam: class {max(indices)} is out of range ({classes}).")


def _copies_fit(net: Classifier, head: Head) -> bool:
    """Whether the h*w masked copies of one image fit one run in the budget (as ``head_batch_size``)."""
    guard = getattr(net.ort, "guard", None)
    if guard is None:
        return True
    total = head.layout.grid[0] * head.layout.grid[1]
    feature = int(np.prod([d or 1 for d in (net.layer(head.feature).shape or (1,))], dtype=np.int64)) * 4
    per_copy = guard.estimate_for(net.per_image_shape).peak + feature * len(head.inputs)
    return limits.max_run_bytes() // max(per_copy, 1) >= total


def _check_path(path: str) -> None:
    if path not in PATHS:
        raise InvalidParameterError(f"recipro_cam: path must be one of {PATHS}; got {path!r}.")


def input_maps(net: Classifier, layer: Layer, x: np.ndarray, indices, *, kernel="auto", scores="probabilities",
               batch_size="auto", path="auto", verbose=False) -> np.ndarray:
    """(K, h, w) maps in [0, 1] of one model input ``x`` (1, ...): in one session of the explained graph
    where ``path`` allows and ``recipro_cam_engine`` says so (all copies in one run within the budget),
    else the backbone pass then the head on the copies."""
    head = head_of(net, layer)
    choice, session, scaled, need = (_in_graph_entry(net, layer, kernel) if path != TWO_STAGE
                                     else (None, None, False, None))
    if path == IN_GRAPH and session is None:
        raise InvalidParameterError(f"recipro_cam: the in-graph path cannot run at layer {layer.name!r}: "
                                    f"{choice.reason}; path='auto' takes the two-stage path there.")
    whole = batch_size == "auto" or int(batch_size) >= head.layout.grid[0] * head.layout.grid[1]
    if session is not None and (path == IN_GRAPH or whole):  # the copies' budget: checked at the decision
        return _in_graph_maps(net, head, session, x, indices, scores, scaled, need)
    values = net.ort.run(x, list(head.inputs))
    return maps_from_values(net, head, values, indices, kernel=kernel, scores=scores, batch_size=batch_size,
                            verbose=verbose)


def _copy_scores(net: Classifier, raw: np.ndarray, scores: str) -> np.ndarray:
    """The copies' scores as ``_scores_fn`` gives them, from the branch's scores ``raw`` (the Softmax's
    input where the graph has one, else its output)."""
    from ..runtime.classifier import softmax

    raw = raw.reshape(len(raw), -1)
    if not np.all(np.isfinite(raw)):
        net.scores_from_outputs([raw])  # raises the library's NonFiniteOutputError
    if net.output.softmax_input:
        return softmax(raw) if scores == "probabilities" else raw.astype(np.float32)
    if scores == "probabilities":
        return net.scores_from_outputs([raw])
    if net.output.is_probability:
        return np.log(np.maximum(raw.astype(np.float32), np.finfo(np.float32).tiny))
    return raw.astype(np.float32)


# the method ---------------------------------------------------------------------------------------
def _scores_fn(net: Classifier, head: Head, scores: str, single_thread: bool, engine=None):
    """feed → (n, K) float32 scores: probabilities, or logits (the log of probabilities for a graph
    that outputs only those), from ``engine`` (default: the head's)."""
    session = (engine or head.engine).session([], single_thread=single_thread)
    names = list(head.outputs)

    def run(feed: dict) -> np.ndarray:
        out = session.run(names, feed)
        if scores == "probabilities":
            return net.scores_from_outputs(out[:1])
        if len(out) > 1:  # the logits before the trailing Softmax
            raw = out[1].reshape(len(out[1]), -1)
            if not np.all(np.isfinite(raw)):
                net.scores_from_outputs([raw])  # raises the library's NonFiniteOutputError
            return raw.astype(np.float32)
        if net.output.is_probability:
            return np.log(np.maximum(net.scores_from_outputs(out[:1]), np.finfo(np.float32).tiny))
        raw = out[0].reshape(len(out[0]), -1)
        if not np.all(np.isfinite(raw)):
            net.scores_from_outputs([raw])
        return raw.astype(np.float32)

    return run


def head_batch_size(net: Classifier, head: Head, values: list[np.ndarray], batch_size) -> int:
    """Masked copies per run: 'auto' takes all h*w copies at once (one run; measured faster than the copies
    split over parallel one-core streams: the head's runs are short); any size is held to the run budget,
    a copy counting as one image's run of the whole graph plus its inputs. Runs beyond one stream over
    the parallel streams (``stream_probabilities``)."""
    total = head.layout.grid[0] * head.layout.grid[1]
    per_copy = net.ort.guard.estimate_for(net.per_image_shape).peak + sum(v[0].nbytes for v in values)
    budget = max(1, limits.max_run_bytes() // max(per_copy, 1))
    if batch_size == "auto":  # all copies in one run of the multi-threaded session when the budget allows
        batch_size = total
    return max(1, min(int(batch_size), budget, total, net.max_batch or total))


def low_resolution(net: Classifier, small: np.ndarray, layer: Layer, indices, *, kernel: str = "auto",
                   scores: str = "probabilities", batch_size="auto", path: str = "auto",
                   verbose: bool = False) -> np.ndarray:
    """(K, h, w) Recipro-CAM maps in [0, 1] at the layer's resolution for one network-size image
    (0..255 pixels); ``path``: "auto" (``recipro_cam_engine``), "in-graph" or "two-stage"."""
    _check_path(path)
    return input_maps(net, layer, net.to_model_input(small[None]), indices, kernel=kernel, scores=scores,
                      batch_size=batch_size, path=path, verbose=verbose)


def maps_from_values(net: Classifier, head: Head, values: list[np.ndarray], indices, *, kernel: str = "auto",
                     scores: str = "probabilities", batch_size="auto", verbose: bool = False) -> np.ndarray:
    """(K, h, w) maps in [0, 1] from one image's head inputs ``values`` (each (1, ...))."""
    h, w = head.layout.grid
    out = copy_scores(net, head, values, indices, kernel=kernel, scores=scores, batch_size=batch_size,
                      verbose=verbose)
    return normalise(out.T.reshape(len(indices), h, w))


def copy_scores(net: Classifier, head: Head, values: list[np.ndarray], indices, *, kernel: str = "auto",
                scores: str = "probabilities", batch_size="auto", verbose: bool = False) -> np.ndarray:
    """(h*w, K) float64: the classes' scores of the masked copies of one image's head inputs ``values``
    (each (1, ...)), before scaling."""
    layout = head.layout
    h, w = layout.grid
    masks = location_masks(layout.grid, _kernel(kernel, layout))
    batch = head_batch_size(net, head, values, batch_size)

    def make_batch(start, stop):  # depends on (start, stop) alone: batches are made in the streams
        return {name: mosaic(v, layout, masks[start:stop]) for name, v in zip(head.inputs, values)}

    if head.full_engine is not None and not head.checked:
        _check_early(head, make_batch(0, min(batch, 4)))
    engine = head.engine
    if head.pooled is not None and _kernel(kernel, layout) == "point":
        pool, pooled_engine = head.pooled[:2]
        feature = values[0][0]
        vectors = (feature.reshape(len(feature), h * w).T.astype(np.float32) / (h * w)).astype(feature.dtype)
        full_batch = make_batch

        def make_batch(start, stop):  # noqa: F811 - the pooled vectors of copies start..stop-1
            return {pool: vectors[start:stop, :, None, None]}

        if _pooled_agrees(head, lambda: (full_batch(0, min(batch, 4)), make_batch(0, min(batch, 4)))):
            engine = pooled_engine
        else:
            make_batch = full_batch
    out = np.empty((h * w, len(indices)), np.float64)
    for start, stop, s in stream_probabilities(net, make_batch, h * w, batch_size=batch, verbose=verbose,
                                               desc="Recipro-CAM",
                                               forward=lambda single: _scores_fn(net, head, scores, single, engine)):
        if s.shape[1] <= max(indices):
            raise InvalidParameterError(f"recipro_cam: class {max(indices)} is out of range ({s.shape[1]}).")
        out[start:stop] = s[:, indices]
    return out


def _pooled_agrees(head: Head, feeds) -> bool:
    """Once per head: the head after the pool on the pooled vectors gives the whole head's scores on the
    masked maps (within float32 rounding, 1e-5 of the largest score); else the pooled path is dropped.
    ``feeds()``: (masked maps, pooled vectors) of a few copies, made only for the check."""
    if head.pooled is None:
        return False
    if len(head.pooled) == 2:
        full, pooled = feeds()
        names = list(head.outputs)
        a = head.engine.session([]).run(names, full)
        b = head.pooled[1].session([]).run(names, pooled)
        scale = max(float(np.abs(a[0]).max()), 1e-30)
        same = all(float(np.abs(x.astype(np.float64) - y).max()) <= 1e-5 * scale for x, y in zip(a, b))
        head.pooled = (*head.pooled, same)
    return bool(head.pooled[2])


def _check_early(head: Head, feed: dict) -> None:
    """Once per head: the early-selecting copy's scores against the whole head's on a few masked copies;
    the whole head is kept where they differ beyond float32 rounding (1e-5 of the largest score)."""
    names = list(head.outputs)
    early = head.engine.session([]).run(names, feed)
    full = head.full_engine.session([]).run(names, feed)
    scale = max(float(np.abs(full[0]).max()), 1e-30)
    if any(float(np.abs(a.astype(np.float64) - b).max()) > 1e-5 * scale for a, b in zip(early, full)):
        head.engine = head.full_engine
    head.full_engine, head.checked = None, True


def normalise(cams: np.ndarray) -> np.ndarray:
    """Each (h, w) map min-max scaled to [0, 1]; a constant map becomes zeros. (Reduced over the
    flattened maps and computed in place on one working copy: the same values as over the two axes with
    temporaries, several times faster on 1,000 maps of 7 x 7.)"""
    flat = cams.reshape(*cams.shape[:-2], -1)
    low = flat.min(axis=-1, keepdims=True)
    span = flat.max(axis=-1, keepdims=True) - low
    varies = span > 0
    out = np.subtract(flat, low)
    out /= np.where(varies, span, 1)
    np.copyto(out, 0, where=~varies)
    return out.reshape(cams.shape).astype(np.float32)



def _default_layer(net: Classifier) -> str:
    """Grad-CAM's default layer (found once per net: ``default_feature_layer`` keeps it in ``net.runtime``)."""
    return default_feature_layer(net)[0]


def _kernel(kernel: str, layout: FeatureLayout) -> str:
    if kernel == "auto":
        return "gaussian" if layout.kind == "tokens" else "point"
    return kernel


@method("recipro_cam", kind=FORWARD_ONLY,
        options=dict(feature_layer=LayerName(help="the layer whose locations are kept one at a time "
                                                   "(default: Grad-CAM's default layer; on a ViT the "
                                                   "last block's first LayerNorm, its input masked too)"),
                     kernel=Choice(KERNELS, help="'point': one location kept; 'gaussian': its 3x3 "
                                                 "neighbourhood weighted 1-2-1; 'auto': point on feature "
                                                 "maps, gaussian on tokens (OpenVINO XAI's defaults)"),
                     scores=Choice(SCORES, help="'probabilities' (the paper's softmax) or 'logits' (the "
                                                "pre-softmax scores, as OpenVINO XAI 1.1.0)"),
                     batch_size=BatchSize(help="masked copies per head run ('auto': all h*w copies in one "
                                               "run, within the run budget)"),
                     verbose=Flag()),
        answers="how strongly the class is predicted from each location of the feature layer kept alone",
        returns="maps at the image's size, >= 0: each class's map min-max scaled to [0, 1] at the layer's "
                "resolution, then upsampled",
        cost="one forward pass to the feature layer, then the head (layer → scores) on h*w masked copies "
             "of it (all labels share them)",
        reference="an independent torch Recipro-CAM on the source module (tests/test_recipro_cam.py); "
                  "OpenVINO XAI's ReciproCAM/ViTReciproCAM on the same file (benchmarks/recipro_cam.py)", order=35)
def recipro_cam(net: Classifier, image, label, *, feature_layer=None, kernel="auto", scores="probabilities",
                batch_size="auto", verbose=True):
    """Recipro-CAM map(s): (H, W) for one label, (K, H, W) for several, at the image's size."""
    return _recipro_cam(net, image, label, "auto", feature_layer=feature_layer, kernel=kernel, scores=scores,
                        batch_size=batch_size, verbose=verbose)


def recipro_cam_on(path: str, net: Classifier, image, label, **options):
    """``recipro_cam`` on a path forced: "in-graph" (refused where ``recipro_cam_engine`` says two-stage),
    "two-stage" or "auto" (what ``recipro_cam`` does); for checks: both paths give the same maps."""
    _check_path(path)
    return _recipro_cam(net, image, label, path, **recipro_cam.method.validate(net, options, "recipro_cam"))


def _recipro_cam(net: Classifier, image, label, path: str, *, feature_layer, kernel, scores, batch_size, verbose):
    where = "recipro_cam"
    layer = net.layer(feature_layer if feature_layer is not None else _default_layer(net))
    head_of(net, layer, where)  # the layer's refusals first
    pixels, is_batch, indices, several = images_and_labels(net, image, label, where)
    maps = []
    for p in pixels:
        # in one session of the explained graph, or one backbone pass then the head (recipro_cam_engine)
        cam = input_maps(net, layer, net.to_model_input(net.fit_pixels(p)[None]), indices, kernel=kernel,
                         scores=scores, batch_size=batch_size, path=path, verbose=verbose)
        maps.append(np.maximum(resize_map(cam, p.shape[:2]), 0.0))
    return finish(maps, is_batch, several, where)
