"""Incremental inference for occlusion: the graph split at cut tensors after spatially local ops, each
masked image's change recomputed only where it can reach (Krypton, Nakandala et al., SIGMOD 2019).

An occluded image differs from the clean one only inside the mask. Along a prefix of spatially local
ops (Conv, pools, BatchNorm, activations, elementwise ops, constant Pad, channel Concat, ...) a
position of a tensor depends on a window of the image fixed by the ops' attributes: position ``i`` of
a tensor with *geometry* ``(stride S, offset O, field R)`` (per spatial axis) reads image rows
``i*S + O .. i*S + O + R - 1``. So the prefix runs once on the clean image, and for each mask only on
a crop that covers the mask's projective field plus the receptive-field margin; the recomputed rows
are pasted into a copy of the clean cut tensor and the rest of the graph (the suffix) runs on it.
Cuts can be chained: each later stage runs on a crop of the previous cut (pasted into its clean copy),
so the margin added at each stage is that stage's own receptive field, not the whole prefix's.

Exactness. A crop ``[c, c + L)`` of a stage's input, computed with the stage's own padding, gives the
full computation's value at every output position whose field lies inside the crop, or whose field
leaves it only where the crop's border is the tensor's border, provided ``c`` is a multiple of the
stage's cumulative stride (so the crop's grid lines up with the full one at every layer) and
``L = H - k*S`` (so every intermediate tensor of the crop is the full one less ``k*S/s`` rows: the
branches of a block that agree at full size agree on the crop, and a crop that ends at the border ends
exactly where the full computation does). Crops of one run all have the same size; near the borders
they are shifted inwards. Size-dependent padding (``auto_pad=SAME_*``) is written out as the explicit
pads of the full size. A plan is checked once against the stages run on whole masked images.

Bit for bit, not only mathematically: onnxruntime picks kernels by static shapes and fuses ops
(a Conv with the activation or residual Add after it; Transposes moved across neighbours), so a split
graph can round differently from the whole one. Stage sessions therefore declare their input's static
shape (the clean pass runs at the full size, as in the plain graph), the suffix keeps every output of
the graph, cuts that would break a fusion are avoided (``fusion_safe``), and a chain of cuts is used
by "auto" only when its suffix reproduces the plain path's scores on the clean image bit for bit; each
plan is also checked once against its stages run on whole masked images.

The stages and the suffix are extracted subgraphs run in onnxruntime sessions of the project's
``OrtEngine`` (same providers, options and single-thread streams as the plain path). The cost model:
a static estimate (per node: multiply-adds and elements moved, from attributes and shapes; a stage
costs its work times the share of its input its crop covers) ranks the chains of up to three cuts;
the best exact ones race the plain path on the first batches of the real work (every result is exact,
so measuring costs no extra forward passes), and the fastest is kept per model, mask geometry, batch
size and machine (in memory and in the cache folder). Graphs without a local prefix worth cutting,
short jobs and graphs where the plain path measured faster keep the plain path, with the reason in
``last_decision(net).reason``.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import numpy as np
import onnx
from onnx import helper

from ..graph import attribute, constant_value, dims, infer_shapes, opset, producers

if TYPE_CHECKING:
    from .classifier import Classifier

_log = logging.getLogger("explainer")

#: ops whose output at a position depends only on their first input at that position (and on inputs
#: that do not vary over the image's positions)
POINTWISE = {"Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Selu",
             "Celu", "Gelu", "Mish", "Softplus", "Softsign", "ThresholdedRelu", "Exp", "Log", "Sqrt", "Neg",
             "Abs", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Erf", "Sin", "Cos", "Cast", "Identity",
             "Dropout", "BatchNormalization", "LRN", "QuantizeLinear", "DequantizeLinear", "Not", "IsNaN",
             "IsInf", "CastLike", "Shrink"}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal",
               "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "BitShift"}
CONVS = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}  # op -> index of the weight input
POOLS = {"MaxPool", "AveragePool", "LpPool"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum"}


class Axis(NamedTuple):
    """Along one spatial axis, position i reads source rows i*stride + offset .. + field - 1."""
    stride: int
    offset: int
    field: int


class Geometry(NamedTuple):
    axes: tuple[int, int]  # where the (height, width) axes of the source are in this tensor
    rank: int
    h: Axis
    w: Axis


class NotLocal(Exception):
    """A node whose output is not a spatially local function of its image-dependent inputs."""


# analysis -----------------------------------------------------------------------------------------
class _Index:
    """The graph's nodes, producers, constants and inferred shapes, read once."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.producer = producers(g)
        self.inits = {t.name: t for t in g.initializer}
        self.shapes = infer_shapes(model)
        self.opset = opset(model)

    def const(self, name: str):
        if not name:
            return None
        return constant_value(self.model.graph, name)

    def shape(self, name: str) -> list | None:
        if name in self.inits:
            return list(self.inits[name].dims)
        vi = self.shapes.get(name)
        if vi is None or not vi.type.tensor_type.HasField("shape"):
            value = self.const(name)
            return None if value is None else list(np.shape(value))
        return dims(vi)

    def elem_type(self, name: str) -> int:
        if name in self.inits:
            return self.inits[name].data_type
        vi = self.shapes.get(name)
        return (vi.type.tensor_type.elem_type if vi is not None else 0) or onnx.TensorProto.FLOAT


def _union(geos: Sequence[Geometry], node) -> Geometry:
    first = geos[0]
    for g in geos[1:]:
        if g.axes != first.axes or g.rank != first.rank or g.h.stride != first.h.stride or g.w.stride != first.w.stride:
            raise NotLocal(f"{node.op_type} node {node.name!r} combines tensors of different grids")

    def merge(axes: list[Axis]) -> Axis:
        lo = min(a.offset for a in axes)
        hi = max(a.offset + a.field for a in axes)
        return Axis(axes[0].stride, lo, hi - lo)

    return Geometry(first.axes, first.rank, merge([g.h for g in geos]), merge([g.w for g in geos]))


def _spatially_constant(index: _Index, name: str, out: Geometry, node) -> None:
    """Refuse a non-image input of an elementwise op that varies over the image's positions."""
    shape = index.shape(name)
    if shape is None:
        raise NotLocal(f"{node.op_type} node {node.name!r}: the shape of its input {name!r} is unknown")
    for axis in out.axes:
        k = axis - (out.rank - len(shape))  # numpy broadcasting aligns on the right
        if 0 <= k < len(shape) and shape[k] != 1:
            raise NotLocal(f"{node.op_type} node {node.name!r}: input {name!r} of shape {shape} varies over "
                           "the image's positions")


def _window(node, index: _Index, geo: Geometry, kernel: Sequence[int], full_size: dict) -> tuple[Geometry, list | None]:
    """The output geometry of a Conv or pool with ``kernel`` on a tensor of geometry ``geo``, and the
    explicit pads that replace a size-dependent ``auto_pad`` (None when there is none)."""
    if geo.axes != (2, 3) or geo.rank != 4 or len(kernel) != 2:
        raise NotLocal(f"{node.op_type} node {node.name!r} is not a 2-D window over NCHW feature maps")
    strides = list(attribute(node, "strides", [1, 1]))
    dilations = list(attribute(node, "dilations", [1, 1]))
    pads = list(attribute(node, "pads", [0, 0, 0, 0]))
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    explicit = None
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        size = full_size.get(node.input[0])
        if not size or None in size[2:]:
            raise NotLocal(f"{node.op_type} node {node.name!r}: auto_pad={auto_pad} on an input of unknown size")
        pads = [0, 0, 0, 0]
        for k in range(2):
            n = size[2 + k]
            out = -(-n // strides[k])
            total = max(0, (out - 1) * strides[k] + (kernel[k] - 1) * dilations[k] + 1 - n)
            small, big = total // 2, total - total // 2
            pads[k], pads[2 + k] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
        explicit = pads
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    if min(pads) < 0 or min(strides) < 1:
        raise NotLocal(f"{node.op_type} node {node.name!r} has negative pads")
    axes = []
    for k, a in enumerate((geo.h, geo.w)):
        axes.append(Axis(a.stride * strides[k], a.offset - pads[k] * a.stride,
                         a.field + (kernel[k] - 1) * dilations[k] * a.stride))
    return Geometry(geo.axes, 4, *axes), explicit


def _ints(index: _Index, node, position: int, attr: str | None = None):
    if attr is not None and index.opset < 18 and attribute(node, attr) is not None:
        return [int(v) for v in attribute(node, attr)]
    if len(node.input) > position and node.input[position]:
        value = index.const(node.input[position])
        if value is None:
            raise NotLocal(f"{node.op_type} node {node.name!r}: {attr or 'its parameters'} computed at run time")
        return [int(v) for v in np.ravel(value)]
    return None


def _node_geometry(node, index: _Index, geo: dict, full_size: dict) -> tuple[dict, list | None]:
    """{output: Geometry} of one node whose image-dependent inputs all have a geometry; raises NotLocal."""
    op = node.op_type
    dep = [i for i in node.input if i in geo]
    first = geo[dep[0]]
    if node.domain not in ("", "ai.onnx"):
        raise NotLocal(f"{op} node {node.name!r} of domain {node.domain!r} is not analysed")

    def others_constant(skip=()):
        for k, name in enumerate(node.input):
            if name and name not in geo and k not in skip:
                _spatially_constant(index, name, first, node)

    if op in POINTWISE:
        if node.input[0] not in geo or len(dep) > 1:
            raise NotLocal(f"{op} node {node.name!r} takes the image in a parameter input")
        if op == "BatchNormalization" and len([o for o in node.output if o]) > 1:
            raise NotLocal(f"BatchNormalization node {node.name!r} runs in training mode")
        if op in ("QuantizeLinear", "DequantizeLinear"):
            axis = attribute(node, "axis", 1) % first.rank
            scale = index.shape(node.input[1]) if len(node.input) > 1 else []
            if scale and int(np.prod(scale)) > 1 and axis in first.axes:
                raise NotLocal(f"{op} node {node.name!r} quantizes per spatial position")
        elif op != "LRN":
            others_constant(skip=(0,))
        if op == "LRN" and 1 in first.axes:
            raise NotLocal(f"LRN node {node.name!r} normalises across a spatial axis")
        return {node.output[0]: first}, None
    if op in ELEMENTWISE:
        geos = [geo[i] for i in dep]
        rank = max([g.rank for g in geos] + [len(index.shape(i) or []) for i in node.input if i and i not in geo])
        if any(g.rank != rank for g in geos):
            raise NotLocal(f"{op} node {node.name!r} broadcasts an image-dependent tensor")
        out = _union(geos, node)
        others_constant()
        return {node.output[0]: out}, None
    if op in CONVS:
        if node.input[0] not in geo or len(dep) > 1:
            raise NotLocal(f"{op} node {node.name!r} has image-dependent weights")
        kernel = attribute(node, "kernel_shape")
        if kernel is None:
            w = index.shape(node.input[CONVS[op]])
            if not w or None in w[2:]:
                raise NotLocal(f"{op} node {node.name!r}: kernel size unknown")
            kernel = w[2:]
        out, explicit = _window(node, index, first, list(kernel), full_size)
        return {node.output[0]: out}, explicit
    if op in POOLS:
        if len([o for o in node.output if o]) > 1:
            raise NotLocal(f"{op} node {node.name!r} returns the positions of its maxima")
        out, explicit = _window(node, index, first, list(attribute(node, "kernel_shape")), full_size)
        return {node.output[0]: out}, explicit
    if op == "Pad":
        mode = attribute(node, "mode", b"constant")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
            raise NotLocal(f"Pad node {node.name!r} pads in mode {mode!r} (only constant padding is local)")
        pads = _ints(index, node, 1, "pads")
        if len(node.input) > 2 and node.input[2] and node.input[2] in geo:
            raise NotLocal(f"Pad node {node.name!r} pads with an image-dependent value")
        axes = _ints(index, node, 3) if len(node.input) > 3 and node.input[3] else list(range(first.rank))
        axes = [a % first.rank for a in axes]
        begin, end = dict(zip(axes, pads[:len(axes)])), dict(zip(axes, pads[len(axes):]))
        for a in range(first.rank):
            if a not in first.axes and (begin.get(a, 0) or end.get(a, 0)):
                raise NotLocal(f"Pad node {node.name!r} pads a non-spatial axis")
            if begin.get(a, 0) < 0 or end.get(a, 0) < 0:
                raise NotLocal(f"Pad node {node.name!r} crops (negative pads)")
        h, w = first.h, first.w
        h = Axis(h.stride, h.offset - begin.get(first.axes[0], 0) * h.stride, h.field)
        w = Axis(w.stride, w.offset - begin.get(first.axes[1], 0) * w.stride, w.field)
        return {node.output[0]: Geometry(first.axes, first.rank, h, w)}, None
    if op == "Concat":
        axis = attribute(node, "axis") % first.rank
        if axis in first.axes:
            raise NotLocal(f"Concat node {node.name!r} concatenates along a spatial axis")
        if len(dep) != len([i for i in node.input if i]):
            raise NotLocal(f"Concat node {node.name!r} concatenates the image with constants")
        return {node.output[0]: _union([geo[i] for i in dep], node)}, None
    if op == "Split":
        if attribute(node, "axis", 0) % first.rank in first.axes:
            raise NotLocal(f"Split node {node.name!r} splits a spatial axis")
        return {o: first for o in node.output if o}, None
    if op == "Slice":
        axes = _ints(index, node, 3) if len(node.input) > 3 and node.input[3] else None
        if axes is None:
            n = len(_ints(index, node, 1, "starts") or [])
            axes = list(range(n))
        if any(a % first.rank in first.axes for a in axes):
            raise NotLocal(f"Slice node {node.name!r} slices a spatial axis")
        return {node.output[0]: first}, None
    if op == "Transpose":
        perm = list(attribute(node, "perm", list(range(first.rank - 1, -1, -1))))
        if perm[0] != 0:
            raise NotLocal(f"Transpose node {node.name!r} moves the batch axis")
        axes = (perm.index(first.axes[0]), perm.index(first.axes[1]))
        return {node.output[0]: Geometry(axes, first.rank, first.h, first.w)}, None
    if op == "LayerNormalization":
        axis = attribute(node, "axis", -1) % first.rank
        if any(a >= axis for a in first.axes):
            raise NotLocal(f"LayerNormalization node {node.name!r} normalises over spatial axes")
        others_constant(skip=(0,))
        return {node.output[0]: first}, None
    if op in REDUCE:
        axes = _ints(index, node, 1, "axes")
        if not attribute(node, "keepdims", 1) or axes is None or any(a % first.rank in first.axes for a in axes):
            raise NotLocal(f"{op} node {node.name!r} reduces over spatial axes")
        return {node.output[0]: first}, None
    if op == "MatMul":
        b = index.shape(node.input[1])
        if node.input[0] not in geo or len(dep) > 1 or b is None or len(b) != 2 or first.rank - 1 in first.axes:
            raise NotLocal(f"MatMul node {node.name!r} mixes spatial positions")
        return {node.output[0]: first}, None
    raise NotLocal(f"{op} node {node.name!r} is not spatially local")


@dataclass
class Analysis:
    """Which tensors are spatially local functions of ``source``, their geometry, and the first node
    that is not (the reason the local prefix ends there)."""
    geometry: dict[str, Geometry]
    explicit_pads: dict[str, list]  # node output -> pads replacing auto_pad
    reason: str | None


def analyse(index: _Index, nodes: Sequence[onnx.NodeProto], source: str, axes: tuple[int, int], rank: int,
            full_size: dict) -> Analysis:
    geo = {source: Geometry(axes, rank, Axis(1, 0, 1), Axis(1, 0, 1))}
    tainted: set[str] = set()
    explicit: dict[str, list] = {}
    reason = None
    for node in nodes:
        if any(i in tainted for i in node.input if i):
            tainted.update(o for o in node.output if o)
            continue
        if not any(i in geo for i in node.input if i):
            continue
        try:
            outs, pads = _node_geometry(node, index, geo, full_size)
            geo.update(outs)
            if pads is not None:
                explicit[node.output[0]] = pads
        except NotLocal as why:
            reason = reason or str(why)
            tainted.update(o for o in node.output if o)
    return Analysis(geo, explicit, reason)


def _needed(index: _Index, targets: Sequence[str], stop: set[str]) -> tuple[list, set[str]]:
    """The nodes computing ``targets`` from ``stop`` tensors, graph inputs and constants (in graph order),
    and the graph inputs (not initializers) they reach."""
    seen_nodes, seen, inputs = set(), set(), set()
    todo = list(targets)
    while todo:
        name = todo.pop()
        if not name or name in seen or name in stop:
            continue
        seen.add(name)
        node = index.producer.get(name)
        if node is None:
            if name not in index.inits:
                inputs.add(name)
            continue
        if id(node) not in seen_nodes:
            seen_nodes.add(id(node))
            todo.extend(node.input)
    return [n for n in index.nodes if id(n) in seen_nodes], inputs


# plans --------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """The local subgraph from ``source`` (the image or the previous cut) to the cut ``target``."""
    source: str
    target: str
    geometry: Geometry  # of target relative to source
    model: onnx.ModelProto
    engines: dict = field(default_factory=dict)  # source shape -> OrtEngine


@dataclass
class Decision:
    """Whether occlusion runs incrementally, why, and what the cost model estimated and measured.

    ``estimated_share``: the static estimate of the incremental work over the plain work (per mask);
    ``seconds_per_mask``: measured wall time per mask on one stream, by contender ("plain" and each
    chain of cuts, joined by " > "); ``parts``: for the chosen chain, the share of its time in the
    prefix stages (on crops), pasting, and the suffix."""
    incremental: bool
    reason: str
    cuts: tuple[str, ...] = ()
    crops: tuple = ()
    estimated_share: float | None = None
    seconds_per_mask: dict = field(default_factory=dict)
    parts: dict = field(default_factory=dict)
    candidates: list = field(default_factory=list)

    @property
    def measured_speedup(self) -> float | None:
        """Plain time per mask over the chosen chain's, as measured (None before it is measured)."""
        chain = " > ".join(self.cuts)
        if "plain" in self.seconds_per_mask and chain in self.seconds_per_mask:
            return self.seconds_per_mask["plain"] / self.seconds_per_mask[chain]
        return None

    def as_dict(self) -> dict:
        return dict(incremental=self.incremental, reason=self.reason, cuts=list(self.cuts),
                    crops=[list(c) for c in self.crops], estimated_share=self.estimated_share,
                    seconds_per_mask=dict(self.seconds_per_mask), parts=dict(self.parts),
                    candidates=list(self.candidates))

    @classmethod
    def from_dict(cls, d: dict) -> "Decision":
        return cls(bool(d["incremental"]), str(d["reason"]), tuple(d.get("cuts", ())),
                   tuple(tuple(c) for c in d.get("crops", ())), d.get("estimated_share"),
                   dict(d.get("seconds_per_mask", {})), dict(d.get("parts", {})), list(d.get("candidates", [])))


def _subgraph(index: _Index, nodes, source: str, targets: Sequence[str], explicit: dict, name: str,
              source_shape=None) -> onnx.ModelProto:
    m = index.model
    used = {i for n in nodes for i in n.input}
    rewritten = []
    for n in nodes:
        if n.output and n.output[0] in explicit:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            kept = [a for a in c.attribute if a.name not in ("auto_pad", "pads")]
            del c.attribute[:]
            c.attribute.extend(kept + [helper.make_attribute("pads", explicit[n.output[0]])])
            n = c
        rewritten.append(n)
    graph = helper.make_graph(
        rewritten, name, [helper.make_tensor_value_info(source, index.elem_type(source), source_shape)],
        [helper.make_tensor_value_info(t, index.elem_type(t), None) for t in targets],
        initializer=[t for t in m.graph.initializer if t.name in used])
    out = helper.make_model(graph, opset_imports=list(m.opset_import), ir_version=m.ir_version)
    out.functions.extend(m.functions)
    return out


class Split:
    """The graph of ``net`` cut into local stages and a suffix; sessions built lazily and kept."""

    def __init__(self, net):
        self.net = net
        self.index = _Index(net.model)
        spec = net.input
        axes = (2, 3) if spec.layout == "NCHW" else (1, 2)
        self.full_size = {k: dims(v) for k, v in self.index.shapes.items()}
        self.full_size[spec.name] = ([None, spec.channels, *spec.size] if spec.layout == "NCHW"
                                     else [None, *spec.size, spec.channels])
        self.analysis = analyse(self.index, self.index.nodes, spec.name, axes, 4, self.full_size)
        self.outputs = [net.output.name]
        self._stages: dict[tuple[str, str], Stage] = {}
        self._suffixes: dict[str, object] = {}
        self._lock = threading.Lock()
        self._deviation: dict = {}  # cut -> relative deviation of its suffix (suffix_deviation)
        #: (cuts, key) plans checked against the plain graph, once per process
        self.checked: set = set()
        self.candidates, self.reason = self._candidates()

    def _candidates(self) -> tuple[list[str], str]:
        """Local tensors every path from the image to the scores passes through, in graph order."""
        image = self.net.input.name
        local = [n.output[0] for n in self.index.nodes if n.output and n.output[0] in self.analysis.geometry]
        found = []
        for name in local:
            g = self.analysis.geometry[name]
            size = self.full_size.get(name)
            if g.rank != 4 or not size or len(size) != 4 or None in (size[g.axes[0]], size[g.axes[1]]):
                continue
            if size[g.axes[0]] * size[g.axes[1]] < 4:
                continue
            _, reached = _needed(self.index, self.outputs, {name})
            if image not in reached:
                found.append(name)
        if not found:
            why = self.analysis.reason or "no spatially local op follows the input"
            return [], f"no tensor after a spatially local prefix carries everything to the scores ({why})"
        return found, ""

    def stage(self, source: str, target: str) -> Stage:
        key = (source, target)
        with self._lock:
            if key not in self._stages:
                nodes, reached = _needed(self.index, [target], {source})
                if reached - {source}:
                    raise NotLocal(f"{target!r} depends on the image other than through {source!r}")
                g0 = self.analysis.geometry[source]
                analysis = analyse(self.index, nodes, source, g0.axes, g0.rank, self.full_size)
                if target not in analysis.geometry:
                    raise NotLocal(analysis.reason or f"{target!r} is not local in {source!r}")
                model = _subgraph(self.index, nodes, source, [target], analysis.explicit_pads,
                                  f"stage_{len(self._stages)}")
                self._stages[key] = Stage(source, target, analysis.geometry[target], model)
            return self._stages[key]

    def stage_engine(self, stage: Stage, shape: Sequence[int]):
        """The stage's engine for inputs of ``shape`` (the batch dim left free): onnxruntime picks its
        kernels by the static shapes, so the clean pass runs at the full size as the plain graph does."""
        shape = ("N",) + tuple(int(d) for d in shape[1:])
        with self._lock:
            if shape not in stage.engines:
                model = onnx.ModelProto()
                model.CopyFrom(stage.model)
                model.graph.input[0].CopyFrom(helper.make_tensor_value_info(
                    stage.source, model.graph.input[0].type.tensor_type.elem_type, list(shape)))
                key = f"{self.net.ort.model_key}|stage:{stage.source}->{stage.target}|{shape}"
                stage.engines[shape] = self.net.ort.derived(model, stage.source, key)
            return stage.engines[shape]

    def suffix_engine(self, cut: str):
        with self._lock:
            if cut not in self._suffixes:
                # every output of the graph, as in the plain session: one output fewer lets onnxruntime
                # fuse the tail differently (another rounding of the same scores)
                every = [o.name for o in self.index.model.graph.output]
                nodes, reached = _needed(self.index, every, {cut})
                if self.net.input.name in reached:
                    nodes, reached = _needed(self.index, self.outputs, {cut})
                    every = self.outputs
                shape = self.full_size.get(cut)
                shape = ["N"] + list(shape[1:]) if shape and None not in shape[1:] else None
                model = _subgraph(self.index, nodes, cut, every, {}, "suffix", shape)
                self._suffixes[cut] = self.net.ort.derived(model, cut, f"{self.net.ort.model_key}|suffix:{cut}")
            return self._suffixes[cut]

    def keep_suffixes(self, cuts) -> None:
        """Drop the suffix sessions of cuts other than ``cuts`` (each holds most of the weights)."""
        with self._lock:
            for cut in [c for c in self._suffixes if c not in set(cuts)]:
                del self._suffixes[cut]

    def suffix_deviation(self, runner: "Runner") -> float:
        """How far the suffix on the clean cut is from the plain graph's scores on the clean image
        (relative; 0.0: bit for bit), measured once per cut."""
        cut = runner.cuts[-1]
        memo = self._deviation
        if cut not in memo:
            name, image = self.net.output.name, runner.clean[0]
            plain = self.net.ort.session([], single_thread=True).run([name], {self.net.input.name: image})[0]
            suffix = self.suffix_engine(cut).session([], single_thread=True)
            ours = suffix.run([name], {cut: runner.clean[-1]})[0]
            scale = max(float(np.abs(plain).max()), 1e-30)
            memo[cut] = float(np.abs(ours.astype(np.float64) - plain).max()) / scale
        return memo[cut]


def split_of(net: Classifier) -> Split:
    """The net's Split, made once per Classifier (kept on it)."""
    if net.runtime.incremental_split is None:
        net.runtime.incremental_split = Split(net)
    return net.runtime.incremental_split


# per-mask geometry --------------------------------------------------------------------------------
def _affected(region: tuple[int, int], a: Axis, out_size: int) -> tuple[int, int]:
    """[lo, hi) of the output positions whose field meets source rows [region)."""
    r0, r1 = region
    if r1 <= r0:
        return 0, 0
    lo = max(0, -((-(r0 - a.offset - a.field + 1)) // a.stride))
    hi = min(out_size - 1, (r1 - 1 - a.offset) // a.stride)
    return (lo, hi + 1) if hi >= lo else (0, 0)


def _needed_rows(out: tuple[int, int], a: Axis, in_size: int) -> tuple[int, int]:
    lo = max(0, out[0] * a.stride + a.offset)
    hi = min(in_size - 1, (out[1] - 1) * a.stride + a.offset + a.field - 1)
    return lo, hi


def _crop_length(spans: Sequence[tuple[int, int]], stride: int, size: int) -> int:
    """The crop length L = size - k*stride (k as large as possible) holding every needed span
    [lo, hi] from a start aligned down to the stride."""
    need = max([hi - (lo // stride) * stride + 1 for lo, hi in spans if hi >= lo] + [1])
    return size - stride * max(0, (size - need) // stride)


def _start(lo: int, stride: int, length: int, size: int) -> int:
    c = (lo // stride) * stride
    return size - length if c + length > size else c


@dataclass
class AxisPlan:
    """Along one axis, for every mask position: per stage the crop start in the stage's source and the
    changed [lo, hi) of the stage's target."""
    starts: np.ndarray  # (positions, stages)
    regions: np.ndarray  # (positions, stages, 2)
    lengths: tuple[int, ...]  # crop length per stage


def plan_axis(windows: Sequence[tuple[int, int]], axes: Sequence[Axis], sizes: Sequence[int]) -> AxisPlan:
    """``windows``: the masks' [start, stop) along this axis; ``axes``: each stage's Axis; ``sizes``: the
    length of the image and of each cut (len(axes) + 1)."""
    n, k = len(windows), len(axes)
    regions = np.zeros((n, k, 2), np.int64)
    needs = [[None] * n for _ in range(k)]
    for p, win in enumerate(windows):
        region = win
        for s, a in enumerate(axes):
            out = _affected(region, a, sizes[s + 1])
            regions[p, s] = out
            needs[s][p] = _needed_rows(out, a, sizes[s]) if out[1] > out[0] else (0, -1)
            region = out
    lengths = tuple(_crop_length(needs[s], axes[s].stride, sizes[s]) for s in range(k))
    starts = np.zeros((n, k), np.int64)
    for s in range(k):
        for p in range(n):
            lo, hi = needs[s][p]
            starts[p, s] = _start(max(lo, 0), axes[s].stride, lengths[s], sizes[s])
    return AxisPlan(starts, regions, lengths)


# running ------------------------------------------------------------------------------------------
class Runner:
    """Occlusion masks → scores through the stages: made per (image, mask geometry, cuts)."""

    def __init__(self, split: Split, cuts: Sequence[str], canvas, rows, cols):
        net = split.net
        self.split, self.cuts, self.canvas = split, list(cuts), canvas
        sources = [net.input.name] + self.cuts[:-1]
        self.stages = [split.stage(s, t) for s, t in zip(sources, self.cuts)]
        self.positions = [(r, c) for r in rows for c in cols]
        # the clean tensors: the image, then each cut on the clean image
        self.clean = [canvas.base]
        for stage in self.stages:
            session = split.stage_engine(stage, self.clean[-1].shape).session([], single_thread=True)
            x = session.run([stage.target], {stage.source: self.clean[-1]})[0]
            self.clean.append(x)
        self.axes_of = [(2, 3) if canvas.channels_first else (1, 2)] + [st.geometry.axes for st in self.stages]
        hs = [c.shape[a[0]] for c, a in zip(self.clean, self.axes_of)]
        ws = [c.shape[a[1]] for c, a in zip(self.clean, self.axes_of)]
        self.rows = plan_axis(rows, [st.geometry.h for st in self.stages], hs)
        self.cols = plan_axis(cols, [st.geometry.w for st in self.stages], ws)
        self.crop_shapes = []
        for s, (lh, lw) in enumerate(zip(self.rows.lengths, self.cols.lengths)):
            shape, axes = list(self.clean[s].shape), self.axes_of[s]
            shape[axes[0]], shape[axes[1]] = lh, lw
            self.crop_shapes.append(tuple(shape))
        self._buffers = threading.local()
        self.row_index = {r: i for i, r in enumerate(rows)}
        self.col_index = {c: i for i, c in enumerate(cols)}

    @property
    def crops(self) -> tuple:
        return tuple(zip(self.rows.lengths, self.cols.lengths))

    def _take(self, x, axes, r0, r1, c0, c1):
        index = [slice(None)] * x.ndim
        index[axes[0]], index[axes[1]] = slice(r0, r1), slice(c0, c1)
        return x[tuple(index)]

    def first_inputs(self, positions) -> np.ndarray:
        """The masked image's crops for stage 0 (in the graph's input form)."""
        canvas, lh, lw = self.canvas, self.rows.lengths[0], self.cols.lengths[0]
        out = []
        for (r, c) in positions:
            i, j = self.row_index[r], self.col_index[c]
            r0, c0 = int(self.rows.starts[i, 0]), int(self.cols.starts[j, 0])
            crop = self._take(canvas.base[0], [a - 1 for a in self.axes_of[0]], r0, r0 + lh, c0, c0 + lw).copy()
            (m0, m1), (n0, n1) = r, c
            a0, a1, b0, b1 = max(m0, r0), min(m1, r0 + lh), max(n0, c0), min(n1, c0 + lw)
            if a1 > a0 and b1 > b0:
                fill = self._take(canvas.fill[0], [a - 1 for a in self.axes_of[0]], a0, a1, b0, b1)
                view = self._take(crop, [a - 1 for a in self.axes_of[0]], a0 - r0, a1 - r0, b0 - c0, b1 - c0)
                view[...] = fill
            out.append(crop)
        return np.stack(out)

    def _paste(self, base: np.ndarray, axes, offset: tuple[int, int], y: np.ndarray, y_axes, y_offset,
               region_r, region_c):
        """Write rows/cols [region) (coordinates of the full tensor) of ``y`` (a crop starting at
        ``y_offset``) into ``base`` (starting at ``offset``), where they overlap."""
        a0, a1 = max(region_r[0], offset[0]), min(region_r[1], offset[0] + base.shape[axes[0]])
        b0, b1 = max(region_c[0], offset[1]), min(region_c[1], offset[1] + base.shape[axes[1]])
        if a1 <= a0 or b1 <= b0:
            return
        src = self._take(y, y_axes, a0 - y_offset[0], a1 - y_offset[0], b0 - y_offset[1], b1 - y_offset[1])
        self._take(base, axes, a0 - offset[0], a1 - offset[0], b0 - offset[1], b1 - offset[1])[...] = src

    def sessions(self, single_thread: bool):
        split = self.split
        return ([split.stage_engine(st, shape).session([], single_thread=single_thread)
                 for st, shape in zip(self.stages, self.crop_shapes)],
                split.suffix_engine(self.cuts[-1]).session([], single_thread=single_thread))

    def cut_batch(self, positions, sessions, timing: list | None = None) -> np.ndarray:
        """The last cut tensor for the masks at ``positions``: the stages on crops, pasted into copies
        of the clean cut."""
        t0 = time.perf_counter()
        x = self.first_inputs(positions)
        if timing is not None:
            timing.append(("build", time.perf_counter() - t0))
        idx = [(self.row_index[r], self.col_index[c]) for r, c in positions]
        for s, (stage, session) in enumerate(zip(self.stages, sessions)):
            t1 = time.perf_counter()
            y = session.run([stage.target], {stage.source: x})[0]
            t2 = time.perf_counter()
            axes = stage.geometry.axes
            bax = [a - 1 for a in axes]
            clean = self.clean[s + 1]
            last = s + 1 == len(self.stages)
            if last:  # this thread's copies of the clean cut, with the last batch's pastes undone
                x, dirty = self._clean_copies(len(positions))
                for k, region_r, region_c in dirty:
                    self._paste(x[k], bax, (0, 0), clean[0], bax, (0, 0), region_r, region_c)
                dirty.clear()
            else:
                lh, lw = self.rows.lengths[s + 1], self.cols.lengths[s + 1]
                x = np.empty((len(positions),) + tuple(
                    lh if d == axes[0] else lw if d == axes[1] else clean.shape[d] for d in range(1, clean.ndim)),
                    clean.dtype)
            for k, (i, j) in enumerate(idx):
                y_offset = (int(self.rows.starts[i, s]) // stage.geometry.h.stride,
                            int(self.cols.starts[j, s]) // stage.geometry.w.stride)
                if last:
                    offset = (0, 0)
                else:
                    offset = (int(self.rows.starts[i, s + 1]), int(self.cols.starts[j, s + 1]))
                    x[k] = self._take(clean[0], bax, offset[0], offset[0] + x.shape[axes[0]],
                                      offset[1], offset[1] + x.shape[axes[1]])
                region_r, region_c = tuple(self.rows.regions[i, s]), tuple(self.cols.regions[j, s])
                self._paste(x[k], bax, offset, y[k], bax, y_offset, region_r, region_c)
                if last:
                    dirty.append((k, region_r, region_c))
            if timing is not None:
                timing.append(("stage", t2 - t1))
                timing.append(("paste", time.perf_counter() - t2))
        return x

    def _clean_copies(self, n: int):
        """(n copies of the clean last cut, the regions pasted into them since), kept per thread and
        batch size: restoring the pasted regions moves far less memory than copying the whole cut
        for every mask. Valid until this thread's next batch of the same size."""
        if not hasattr(self._buffers, "by_size"):
            self._buffers.by_size = {}
        buffers = self._buffers.by_size
        if n not in buffers:
            buffers[n] = (np.repeat(self.clean[-1], n, axis=0), [])
        return buffers[n]

    def forward(self, single_thread: bool) -> Callable:
        """positions → (N, K) probabilities; the ``forward`` of stream_probabilities."""
        stages, suffix = self.sessions(single_thread)
        split = self.split

        def run(positions, timing: list | None = None):
            x = self.cut_batch(positions, stages, timing)
            t = time.perf_counter()
            out = suffix.run(split.outputs, {self.cuts[-1]: x})
            if timing is not None:
                timing.append(("suffix", time.perf_counter() - t))
            return split.net.scores_from_outputs(out)

        return run

    def full_cut(self, positions) -> np.ndarray:
        """The last cut computed by the stages on whole masked images: the independent check."""
        x = self.canvas.copies(len(positions))
        for k, (r, c) in enumerate(positions):
            self.canvas.occlude_rectangle(x[k], r, c)
        for stage in self.stages:
            session = self.split.stage_engine(stage, x.shape).session([], single_thread=True)
            x = session.run([stage.target], {stage.source: x})[0]
        return x




# cost model ---------------------------------------------------------------------------------------
#: bumped whenever the analysis or the cost model changes: decisions remembered before are not reused
PLAN_VERSION = 1
#: work units: one multiply-add of a Conv is 1, one element an op reads or writes is MEMORY
MEMORY = 4.0
#: how many chains of cuts the static estimate sends to be measured
MEASURED_CHAINS = 2
#: how many of the best estimates are checked for an exact suffix, at most
TRIED_CHAINS = 4
#: "auto" sets up the split (sessions, checks, the race) only for at least this many masks: fewer run
#: the plain path, which the set-up would cost more than it saves (once decided, any count uses it)
MIN_MASKS = 128
#: the longest chain of cuts considered
MAX_STAGES = 3
#: a chain replaces the plain path only when it measured below this share of the plain time per mask
MARGIN = 0.95
#: timed batches per contender before the choice (the first batch of each is a warm-up, not counted)
SAMPLES = 3
#: static estimates above this share of the plain work are not worth measuring
HOPELESS = 0.9


def _node_work(index: _Index, node, full_size: dict) -> float:
    out = full_size.get(node.output[0]) if node.output else None
    if not out or len(out) < 2 or None in out[1:]:
        return 0.0
    elems = float(np.prod(out[1:]))
    if node.op_type in CONVS:
        w = index.shape(node.input[CONVS[node.op_type]])
        macs = elems * float(np.prod(w[1:])) if w and None not in w else 0.0
        return macs + MEMORY * elems
    if node.op_type in ("Relu", "Clip", "BatchNormalization", "Identity", "Dropout"):
        return MEMORY * elems / 4  # fused into the Conv before them by onnxruntime
    if node.op_type in POOLS:
        k = attribute(node, "kernel_shape", [1, 1])
        return MEMORY * elems * (1 + float(np.prod(k)) / 4)
    return MEMORY * elems


#: ops onnxruntime fuses into the Conv (or MatMul) before them; a cut between the two makes the split
#: graph round differently from the whole one
CONV_LIKE = {"Conv", "ConvInteger", "QLinearConv", "MatMul", "Gemm", "FusedConv"}
FUSED_AFTER = {"Add", "Sum", "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "BatchNormalization",
               "Mul", "Sub", "Div", "HardSwish", "Mish", "Gelu", "Elu", "Softplus"}


def fusion_safe(index: _Index, name: str, consumers: dict) -> bool:
    """Whether cutting at ``name`` leaves onnxruntime's fusions as in the whole graph: the tensor is
    not a Conv's output that an activation, BatchNorm or Add would be fused into, nor the residual
    input of an Add that would be fused into the Conv producing its other input."""
    producer = index.producer.get(name)
    users = consumers.get(name, [])
    if producer is not None and producer.op_type in CONV_LIKE and any(u.op_type in FUSED_AFTER for u in users):
        return False
    if producer is not None and producer.op_type in ("Add", "Sum") and any(u.op_type in FUSED_AFTER for u in users):
        inputs = [index.producer.get(i) for i in producer.input if i]
        if any(o is not None and o.op_type in CONV_LIKE for o in inputs):  # Conv + Add + activation
            return False
    # onnxruntime's transpose optimizer moves and cancels Transposes across their neighbours
    if (producer is not None and producer.op_type == "Transpose") or any(u.op_type == "Transpose" for u in users):
        return False
    for u in users:
        if u.op_type in ("Add", "Sum"):
            others = [index.producer.get(i) for i in u.input if i and i != name]
            if any(o is not None and o.op_type in CONV_LIKE for o in others):
                return False
    return True


def _relative(outer: Axis, inner: Axis) -> Axis | None:
    """The Axis of a cut relative to an earlier cut (both given relative to the image); None when
    the grids do not nest."""
    if inner.stride % outer.stride or (inner.offset - outer.offset) % outer.stride or \
            (inner.field - outer.field) % outer.stride:
        return None
    return Axis(inner.stride // outer.stride, (inner.offset - outer.offset) // outer.stride,
                (inner.field - outer.field) // outer.stride + 1)


@dataclass
class Estimate:
    cuts: tuple[str, ...]
    share: float  # estimated incremental work per mask / plain work per image
    crops: tuple


def estimates(split: Split, rows, cols) -> list[Estimate]:
    """The static cost model: for each candidate last cut, the cheapest chain of up to MAX_STAGES cuts
    ending there (best first). Work per node from its attributes and sizes (multiply-adds and
    elements moved); a stage costs its nodes' work times the share of its source that its crop covers
    (plus building the crop from the clean cut); the suffix costs its whole work plus the copy of the
    clean cut. Of candidate cuts with the same geometry only the last is kept (more work cropped)."""
    index, geo = split.index, split.analysis.geometry
    work = {id(n): _node_work(index, n, split.full_size) for n in index.nodes}
    total = sum(work[id(n)] for n in _needed(index, split.outputs, set())[0]) or 1.0
    from ..graph import consumers as consumers_of

    users = consumers_of(index.model.graph)
    safe = [t for t in split.candidates if fusion_safe(index, t, users)]
    candidates = safe or split.candidates
    kept: list[str] = []
    for name in candidates:
        if kept and geo[kept[-1]][2:] == geo[name][2:]:
            kept[-1] = name
        else:
            kept.append(name)
    image = split.net.input.name
    prefix = {image: 0.0}
    prefix.update({t: sum(work[id(n)] for n in _needed(index, [t], set())[0]) for t in kept})
    size = {t: (split.full_size[t][geo[t].axes[0]], split.full_size[t][geo[t].axes[1]]) for t in kept}
    size[image] = tuple(split.net.input.size)
    elems = {t: float(np.prod(split.full_size[t][1:])) for t in kept}
    elems[image] = 0.0
    # changed positions of each cut, straight from the image (a superset of what a chain gives)
    changed = {t: ([_affected(w, geo[t].h, size[t][0]) for w in rows],
                   [_affected(w, geo[t].w, size[t][1]) for w in cols]) for t in kept}

    def stage(s: str, t: str):
        h, w = _relative(geo[s].h, geo[t].h), _relative(geo[s].w, geo[t].w)
        if h is None or w is None:
            return None
        lh = _crop_length([_needed_rows(o, h, size[s][0]) for o in changed[t][0] if o[1] > o[0]], h.stride, size[s][0])
        lw = _crop_length([_needed_rows(o, w, size[s][1]) for o in changed[t][1] if o[1] > o[0]], w.stride, size[s][1])
        frac = lh * lw / (size[s][0] * size[s][1])
        return (prefix[t] - prefix[s]) * frac + MEMORY * elems[s] * frac, (lh, lw)

    # best[(t, depth)] = (cost, chain, crops) of the cheapest chain of ``depth`` cuts ending at t; the
    # inner cuts come from ``kept``, the last from every candidate (the suffix's rounding depends on it)
    for t in candidates:
        if t not in prefix:
            prefix[t] = sum(work[id(n)] for n in _needed(index, [t], set())[0])
            size[t] = (split.full_size[t][geo[t].axes[0]], split.full_size[t][geo[t].axes[1]])
            elems[t] = float(np.prod(split.full_size[t][1:]))
            changed[t] = ([_affected(w, geo[t].h, size[t][0]) for w in rows],
                          [_affected(w, geo[t].w, size[t][1]) for w in cols])
    best: dict = {}
    position = {t: k for k, t in enumerate(candidates)}
    for t in candidates:
        first = stage(image, t)
        if first is not None:
            best[(t, 1)] = (first[0], (t,), (first[1],))
        for depth in range(2, MAX_STAGES + 1):
            options = []
            for s in kept:
                if position[s] >= position[t]:
                    break
                prev = best.get((s, depth - 1))
                step = stage(s, t) if prev is not None else None
                if step is not None:
                    options.append((prev[0] + step[0], prev[1] + (t,), prev[2] + (step[1],)))
            if options:
                best[(t, depth)] = min(options, key=lambda o: o[0])
    found: dict[str, Estimate] = {}
    for (t, _), (cost, chain, crops) in best.items():
        share = (cost + total - prefix[t] + MEMORY * elems[t]) / total
        if t not in found or share < found[t].share:
            found[t] = Estimate(chain, share, crops)
    return sorted(found.values(), key=lambda e: e.share)


def _geometry(net: Classifier, rows, cols) -> str:
    import hashlib

    return hashlib.sha256(repr((tuple(net.input.size), tuple(rows), tuple(cols))).encode()).hexdigest()[:16]


def _prefix(net: Classifier, rows, cols) -> str:
    """What every cached entry of incremental occlusion is keyed by: the plan's version, the model, its
    providers, the machine's cores and the mask geometry."""
    return (f"v{PLAN_VERSION}|{net.ort.model_key}|{','.join(net.ort.providers)}|{os.cpu_count()}|"
            f"{_geometry(net, rows, cols)}")


def _key(net: Classifier, rows, cols, batch: int, mode) -> str:
    return f"{_prefix(net, rows, cols)}|b{batch}|s{net.ort.parallel_streams()}|{'auto' if mode == 'auto' else 'forced'}"


def record_decision(net: Classifier, decision: Decision) -> None:
    """Keep ``decision`` as the latest occlusion's on ``net`` (``last_decision``)."""
    net.runtime.incremental_last = decision


def last_decision(net: Classifier) -> Decision | None:
    """The decision the latest occlusion on ``net`` ran with (None before any)."""
    return net.runtime.incremental_last


class Occluder:
    """Occlusion's forward passes for one image: positions → (N, K) probabilities, on the plain path
    or incrementally, as decided (or, the first time, racing the contenders on the first batches of
    the real work: every result is exact, so measuring costs no extra forward passes)."""

    def __init__(self, net, canvas, rows, cols, batch: int, mode):
        self.net, self.canvas, self.mode = net, canvas, mode
        self.rows, self.cols = list(rows), list(cols)
        self.key = _key(net, rows, cols, batch, mode)
        self.decision = self._known()
        self.runners: dict[str, Runner] = {}
        self.contenders: list[str] = []
        self._times: dict[str, list[float]] = {}
        self._count = 0
        self._lock = threading.Lock()
        if self.decision is not None and self.decision.incremental:
            try:
                self._runner(self.decision.cuts)
            except Exception as exc:  # noqa: BLE001 - a stored decision this analysis cannot build (cuts
                # named by another version of it, or a graph that no longer splits there): decided again,
                # as if never stored; a stale cache costs a measurement, never the incremental path
                _log.debug("occlusion: the stored decision (cuts %s) cannot be built here (%s: %s); measuring "
                           "again", ", ".join(self.decision.cuts), type(exc).__name__, exc)
                net.runtime.incremental_decisions.pop(self.key, None)
                self.decision = None
        if self.decision is None:
            self._prepare()
        net.runtime.incremental_last = self.decision or Decision(
            True, f"measuring: the first batches alternate between {', '.join(self.contenders)} (too few "
            "batches to decide leave this decision open)", tuple(self.contenders[-1].split(" > ")),
            self.runners[self.contenders[-1]].crops, self.estimates[-1].share)

    # deciding ----------------------------------------------------------------------------------------
    def _known(self) -> Decision | None:
        from .. import cache

        memo = self.net.runtime.incremental_decisions
        if self.key in memo:
            return memo[self.key]
        stored = cache.read_json("incremental.json").get(self.key)
        if isinstance(stored, dict):
            try:
                memo[self.key] = Decision.from_dict(stored)
                return memo[self.key]
            except (KeyError, TypeError, ValueError):
                pass
        return None

    def _remember(self, decision: Decision, persist: bool = True) -> None:
        from .. import cache
        from ..errors import CacheError

        self.decision = decision
        self.net.runtime.incremental_decisions[self.key] = decision
        self.net.runtime.incremental_last = decision
        _log.debug("occlusion: %s", decision.reason)
        if persist:
            try:
                cache.update_json("incremental.json", self.key, decision.as_dict())
            except CacheError:  # a read-only cache costs a new measurement next time, not the result
                pass

    def _runner(self, cuts) -> Runner:
        name = " > ".join(cuts)
        if name not in self.runners:
            split = split_of(self.net)
            runner = Runner(split, cuts, self.canvas, self.rows, self.cols)
            checked = split.checked
            if (name, self.key) in checked:  # the check is of the plan, not of the image: once per process
                self.runners[name] = runner
                return runner
            positions = [(r, c) for r in self.rows for c in self.cols]
            probe = sorted({0, len(positions) // 2 + len(self.cols) // 2, len(positions) - 1})
            # float32: bit for bit in practice (1e-6 leaves room for a kernel that rounds a crop
            # otherwise); float16 only where asked for (incremental=True)
            low = runner.clean[-1].dtype == np.float16 or runner.clean[0].dtype == np.float16
            why = check(runner, [positions[i] for i in probe], 1e-6 if not low else 1e-3 if self.mode is True else 0.0)
            if why is not None:
                raise NotLocal(why)
            checked.add((name, self.key))
            self.runners[name] = runner
        return self.runners[name]

    def _prepare(self) -> None:
        """The contenders: the plain path ("auto" only) and the best chains of the static estimate."""
        split = split_of(self.net)
        if not split.candidates:
            self._remember(Decision(False, split.reason), persist=False)
            return
        masks = len(self.rows) * len(self.cols)
        if self.mode == "auto" and masks < MIN_MASKS:
            self._remember(Decision(False, f"{masks} masks: fewer than {MIN_MASKS}, too few to pay for setting "
                                    "up the split graph (incremental=True uses it anyway)"), persist=False)
            self.net.runtime.incremental_decisions.pop(self.key, None)  # a later call may measure
            return
        found = [e for e in estimates(split, self.rows, self.cols) if self.mode is True or e.share < HOPELESS]
        if not found:
            best = estimates(split, self.rows, self.cols)
            self._remember(Decision(False, f"the static cost model expects no gain: the best split does "
                                    f"{best[0].share:.0%} of the plain work per mask (cuts {', '.join(best[0].cuts)})"
                                    if best else "no chain of cuts nests on the image's grid",
                                    cuts=best[0].cuts if best else (), estimated_share=best[0].share if best else None)
                           )
            return
        # the best estimates whose suffix reproduces the plain path's scores on the clean image bit for
        # bit (onnxruntime fuses some ops across a cut otherwise, e.g. a Conv with the residual Add
        # after it: the same scores, rounded differently); inexact ones only where none is exact
        self.estimates, inexact, errors = [], [], []
        for e in found[:TRIED_CHAINS]:
            try:
                runner = self._runner(e.cuts)
                deviation = split.suffix_deviation(runner)
            except Exception as exc:  # a subgraph onnxruntime refuses, or a failed check: not a contender
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
                continue
            (self.estimates if deviation == 0.0 else inexact).append((e, deviation))
            if len(self.estimates) == MEASURED_CHAINS:
                break
        if not self.estimates and inexact:
            closest = min(inexact, key=lambda x: x[1])
            why = (f"no split among the {len(inexact)} best reproduces the plain path's scores bit for bit on the "
                   f"clean image (closest: {closest[1]:.1e} relative, cuts {', '.join(closest[0].cuts)}): "
                   "onnxruntime rounds the split graph otherwise")
            if self.mode == "auto":
                self._remember(Decision(False, why, estimated_share=closest[0].share))
                return
            self.estimates = [x for x in inexact[:MEASURED_CHAINS]]
        self.estimates = [e for e, _ in self.estimates]
        for name in [n for n in self.runners if n not in {" > ".join(e.cuts) for e in self.estimates}]:
            del self.runners[name]
        split.keep_suffixes({e.cuts[-1] for e in self.estimates})
        for e in self.estimates:
            self.contenders.append(" > ".join(e.cuts))
        if not self.contenders:
            self._remember(Decision(False, "the split graph does not run exactly (" + "; ".join(errors) + ")"),
                           persist=False)
            return
        if self.mode == "auto":
            self.contenders.insert(0, "plain")
        if len(self.contenders) == 1:  # nothing to race
            e = self.estimates[0]
            runner = self.runners[self.contenders[0]]
            self._remember(Decision(True, "incremental=True: the statically cheapest split", e.cuts, runner.crops,
                                    e.share), persist=False)
            return
        self._times = {c: [] for c in self.contenders}

    @property
    def racing(self) -> bool:
        return self.decision is None

    def _pick(self) -> str:
        with self._lock:
            if self.decision is not None:
                return " > ".join(self.decision.cuts) if self.decision.incremental else "plain"
            name = self.contenders[self._count % len(self.contenders)]
            self._count += 1
            return name

    def _record(self, name: str, seconds: float, count: int, parts: list | None) -> None:
        with self._lock:
            if self.decision is not None:
                return
            self._times[name].append(seconds / count)
            if parts is not None:
                self._parts = getattr(self, "_parts", {})
                self._parts.setdefault(name, []).append(parts)
            if all(len(t) > SAMPLES for t in self._times.values()):
                self._decide()

    def _decide(self) -> None:
        per_mask = {name: float(np.median(t[1:])) for name, t in self._times.items()}  # first: warm-up
        chains = [c for c in self.contenders if c != "plain"]
        best = min(chains, key=lambda c: per_mask[c])
        e = next(e for e in self.estimates if " > ".join(e.cuts) == best)
        runner = self.runners[best]
        parts = {}
        samples = getattr(self, "_parts", {}).get(best, [])
        if samples:
            total = {k: float(np.median([sum(t for n, t in s if n == k) for s in samples]))
                     for k in ("stage", "paste", "suffix", "build")}
            whole = sum(total.values()) or 1.0
            parts = {"prefix": total["stage"] / whole, "paste": (total["paste"] + total["build"]) / whole,
                     "suffix": total["suffix"] / whole}
        candidates = [dict(cuts=list(x.cuts), estimated_share=x.share,
                           crops=[list(c) for c in self.runners[" > ".join(x.cuts)].crops],
                           seconds_per_mask=per_mask.get(" > ".join(x.cuts)))
                      for x in self.estimates if " > ".join(x.cuts) in self.runners]
        if "plain" in per_mask:
            faster = per_mask[best] < MARGIN * per_mask["plain"]
            ratio = per_mask["plain"] / per_mask[best]
            reason = (f"measured {ratio:.2f}x faster than the plain forward pass (cuts {', '.join(e.cuts)})"
                      if faster else
                      f"the best split measured {per_mask[best] * 1e3:.2f} ms per mask against "
                      f"{per_mask['plain'] * 1e3:.2f} ms on the plain path (cuts {', '.join(e.cuts)}): not faster")
        else:
            faster, reason = True, f"incremental=True: the fastest measured split (cuts {', '.join(e.cuts)})"
        self._remember(Decision(faster, reason, e.cuts, runner.crops, e.share, per_mask, parts, candidates))

    def best_batch(self) -> int:
        """occlusion's ``batch_size="auto"`` on the decided split: the batch of mask positions with the
        highest throughput of this split's forward (crops, stages, pasting, suffix) on the parallel
        streams, measured by the plain path's helpers (``ort_engine.fastest_batch`` over
        ``stream_throughput``) once per model, mask geometry, split and machine, and remembered
        (``net.runtime.incremental_batches`` and ``batch_sizes.json``). At most what the memory budget
        allows the streams together and what gives every stream a batch."""
        from .. import cache
        from ..errors import CacheError
        from .ort_engine import BATCH_CANDIDATES, fastest_batch, stream_throughput

        net, cuts = self.net, self.decision.cuts
        streams = net.ort.parallel_streams()
        masks = len(self.rows) * len(self.cols)
        shared = net.ort.guard.max_batch(net.per_image_shape) // streams  # the streams' runs share the budget
        limit = max(1, min(net.resolve_batch_size(BATCH_CANDIDATES[-1], "occlusion_sensitivity", "onnxruntime"),
                           shared, masks // streams))
        key = f"{_prefix(net, self.rows, self.cols)}|{' > '.join(cuts)}|streams={streams}|incremental"
        memo = net.runtime.incremental_batches
        if key not in memo:
            known = cache.read_json("batch_sizes.json").get(key)
            if not (isinstance(known, int) and known >= 1):
                run = self._runner(cuts).forward(single_thread=streams > 1)
                positions = [(r, c) for r in self.rows for c in self.cols]

                def rate(size: int) -> float:  # masks spread over the image (border crops shift inwards)
                    batch = [positions[int(i)] for i in np.linspace(0, masks - 1, size)]
                    return stream_throughput(lambda: run(batch), size, streams)

                known = fastest_batch(rate, limit)
                try:
                    cache.update_json("batch_sizes.json", key, known)
                except CacheError:  # a read-only cache costs a new measurement next time, not the result
                    pass
            memo[key] = known
        return min(memo[key], limit)

    # running -----------------------------------------------------------------------------------------
    def forward(self, single_thread: bool) -> Callable:
        """positions → (N, K) probabilities; the ``forward`` of ``stream_probabilities``."""
        from .perturb import forward_fn

        canvas = self.canvas
        runs = {name: runner.forward(single_thread) for name, runner in self.runners.items()}
        if self.decision is None or not self.decision.incremental:
            plain_run = forward_fn(self.net, "onnxruntime", single_thread=single_thread)

            def plain(positions, parts=None):
                x = canvas.copies(len(positions))
                for k, (r, c) in enumerate(positions):
                    canvas.occlude_rectangle(x[k], r, c)
                return plain_run(x)

            runs["plain"] = plain

        def run(positions):
            name = self._pick()
            if self.decision is not None:
                return runs[name](positions)
            parts: list = []
            start = time.perf_counter()
            out = runs[name](positions, parts)
            self._record(name, time.perf_counter() - start, len(positions), parts if name != "plain" else None)
            return out

        return run


def check(runner: Runner, positions, tolerance: float) -> str | None:
    """None when the incremental cut equals the stages run on whole masked images for ``positions``,
    else why not."""
    stages, _ = runner.sessions(True)
    ours = runner.cut_batch(positions, stages).astype(np.float64)
    truth = runner.full_cut(positions).astype(np.float64)
    if ours.shape != truth.shape:
        return f"the incremental cut has shape {ours.shape}, the full one {truth.shape}"
    scale = max(float(np.abs(truth).max()), 1e-12)
    error = float(np.abs(ours - truth).max()) / scale
    if not error <= tolerance:
        return f"the incremental cut differs from the full computation (relative {error:.1e})"
    return None
