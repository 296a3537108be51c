"""``ExportContext``: the graph being written, its feature and score tensors, and helpers that add
nodes, constants and opset-dependent spellings with unique names (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

PREFIX = "explain/"


@dataclass
class ExportContext:
    graph: onnx.GraphProto
    opset: int
    feature: str
    layout: Any  # explainer.model.layouts.FeatureLayout
    scores: str
    num_classes: int
    classes: str = ""
    top_k: int = 1
    head: Any = None  # export.head.Head
    #: full shapes and dtypes of the head's tensors, measured on onnxruntime (batch of ``measured_batch``)
    shapes: dict = field(default_factory=dict)
    dtypes: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)  # measured values of small integer tensors
    #: the axes of each measured tensor whose extent follows the batch (measured at two batch sizes; a
    #: tensor missing here is treated as unknown: its shape is read at run time)
    dynamic: dict = field(default_factory=dict)
    #: gradients that are a broadcast (Expand) of a smaller tensor: {expanded: (small, forward tensor,
    #: its axes spread over)}, recorded by the rules of sums and means (``rules._spread``)
    broadcasts: dict = field(default_factory=dict)
    measured_batch: int = 1
    ir_version: int = 8
    #: the tensor the branch reads for the feature (equal in value to ``feature``, kept apart from it so
    #: that onnxruntime optimises the source's nodes as before); set by the writer
    feature_branch: str = ""
    #: None in exported files; a dict where the library asks builders for extra tensors (name -> tensor)
    diagnostics: dict | None = None
    needed_opset: int = 0
    _used: set = field(default_factory=set)
    _counter: int = 0

    def __post_init__(self):
        self._used = {t for n in self.graph.node for t in list(n.input) + list(n.output)}
        self._used |= {t.name for t in self.graph.initializer} | {i.name for i in self.graph.input}
        self._used |= {o.name for o in self.graph.output}

    # names and nodes -------------------------------------------------------------------------
    def name(self, hint: str = "t") -> str:
        while True:
            self._counter += 1
            candidate = f"{PREFIX}{hint}_{self._counter}"
            if candidate not in self._used:
                self._used.add(candidate)
                return candidate

    def node(self, op: str, inputs, n_outputs: int = 1, outputs=None, domain: str = "", **attrs):
        if outputs is None:
            outputs = [self.name(op.lower()) for _ in range(n_outputs)]
        else:
            self._used.update(outputs)
        self.graph.node.append(helper.make_node(op, list(inputs), list(outputs), name=self.name(op + "_node"),
                                                domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else list(outputs)

    def const(self, value, hint: str = "c", dtype=None) -> str:
        array = np.asarray(value, dtype=dtype) if dtype is not None else np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        name = self.name(hint)
        if self.ir_version < 4:  # initializers must then be graph inputs too: a Constant node instead
            self.graph.node.append(helper.make_node("Constant", [], [name], name=self.name("Constant_node"),
                                                    value=numpy_helper.from_array(array, name)))
        else:
            self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def scalar(self, value: float, like: str | None = None) -> str:
        dtype = self.np_dtype(like) if like is not None else np.float32
        return self.const(np.asarray(value, dtype=dtype), "s")

    def require_opset(self, version: int, why: str) -> None:
        from ..errors import UnsupportedModelError

        if self.opset < version:
            raise UnsupportedModelError(
                f"export: {why} needs ONNX opset {version}; the model is opset {self.opset}. Convert it "
                f"first (onnx.version_converter.convert_version(model, {version})) and load that.")

    # types and shapes --------------------------------------------------------------------------
    def np_dtype(self, tensor: str):
        return self.dtypes.get(tensor, np.dtype(np.float32))

    def elem_type(self, tensor: str) -> int:
        return helper.np_dtype_to_tensor_dtype(np.dtype(self.np_dtype(tensor)))

    def shape(self, tensor: str) -> tuple | None:
        return self.shapes.get(tensor)

    def rank(self, tensor: str) -> int:
        shape = self.shape(tensor)
        if shape is None:
            from ..errors import UnsupportedModelError
            raise UnsupportedModelError(f"export: the rank of tensor {tensor!r} of the head is unknown.")
        return len(shape)

    # opset-dependent spellings -----------------------------------------------------------------
    def reduce(self, op: str, x: str, axes, keepdims: int = 1) -> str:
        axes = [int(a) for a in axes]
        as_input = self.opset >= 18 or (op == "ReduceSum" and self.opset >= 13)
        if as_input:
            return self.node(op, [x, self.const(np.asarray(axes, np.int64), "axes")], keepdims=keepdims)
        return self.node(op, [x], axes=axes, keepdims=keepdims)

    def unsqueeze(self, x: str, axes) -> str:
        if self.opset >= 13:
            return self.node("Unsqueeze", [x, self.const(np.asarray(axes, np.int64), "axes")])
        return self.node("Unsqueeze", [x], axes=list(axes))

    def squeeze(self, x: str, axes) -> str:
        if self.opset >= 13:
            return self.node("Squeeze", [x, self.const(np.asarray(axes, np.int64), "axes")])
        return self.node("Squeeze", [x], axes=list(axes))

    def shape_of(self, x: str, start: int | None = None, end: int | None = None) -> str:
        s = self.node("Shape", [x])
        if start is None and end is None:
            return s
        return self.slice(s, [0 if start is None else start], [2 ** 62 if end is None else end], [0])

    def slice(self, x: str, starts, ends, axes, steps=None) -> str:
        if self.opset >= 10:
            inputs = [x, self.const(np.asarray(starts, np.int64), "starts"), self.const(np.asarray(ends, np.int64), "ends"),
                      self.const(np.asarray(axes, np.int64), "axes")]
            if steps is not None:
                inputs.append(self.const(np.asarray(steps, np.int64), "steps"))
            return self.node("Slice", inputs)
        return self.node("Slice", [x], starts=list(starts), ends=list(ends), axes=list(axes))

    def pad(self, x: str, pads) -> str:
        if self.opset >= 11:
            return self.node("Pad", [x, self.const(np.asarray(pads, np.int64), "pads")])
        return self.node("Pad", [x], pads=list(pads))

    def kshape(self, g: str, like: str) -> str:
        """The shape (K, *shape of ``like``) with K read from ``g``'s first axis."""
        return self.node("Concat", [self.shape_of(g, 0, 1), self.shape_of(like)], axis=0)

    def reshape(self, x: str, shape: str) -> str:
        return self.node("Reshape", [x, shape])

    def known(self, tensor: str, like: str) -> None:
        """``tensor`` has ``like``'s measured shape, dtype, value and batch axes (a copy of it)."""
        for table in (self.shapes, self.dtypes, self.values, self.dynamic):
            if like in table:
                table[tensor] = table[like]

    def static_shape(self, like: str, lead: bool = True) -> np.ndarray | None:
        """``like``'s measured shape as a Reshape target: (0, *shape) with ``lead`` (0: the leading K
        axis copied from the reshaped tensor), the one axis that follows the batch as -1; None where
        the shape is unknown or more than one axis follows the batch (then it is read at run time)."""
        shape, dynamic = self.shapes.get(like), self.dynamic.get(like)
        if shape is None or dynamic is None or len(dynamic) > 1 or any(int(d) <= 0 for d in shape):
            return None
        target = [-1 if i in dynamic else int(d) for i, d in enumerate(shape)]
        return np.asarray(([0] if lead else []) + target, np.int64)

    def reshape_like(self, g: str, like: str, read: str | None = None) -> str:
        """``g`` (K, ...) reshaped to (K, *shape of ``like``): a constant target where the measured
        shapes tell it (no Shape node reading a tensor, which would keep its producer alive), else
        read at run time from ``read`` (default ``like``: a tensor of the same shape)."""
        target = self.static_shape(like)
        if target is None:
            return self.reshape(g, self.kshape(g, read or like))
        return self.reshape(g, self.const(target, "shape"))

    def expand_shape(self, like: str, spread_axes, read: str | None = None) -> str:
        """The Expand target that spreads a gradient (K, *shape of ``like`` with 1 on ``spread_axes``)
        over ``like``'s shape: constant (1 on the axes that follow the batch: the gradient has them in
        full already) where the measured shapes tell it, else read at run time from ``read`` (default
        ``like``)."""
        shape, dynamic = self.shapes.get(like), self.dynamic.get(like)
        if shape is None or dynamic is None or set(dynamic) & set(spread_axes):
            return self.shape_of(read or like)
        return self.const(np.asarray([1 if i in dynamic else int(d) for i, d in enumerate(shape)], np.int64), "shape")

    # the feature layer as (N, C, h, w) -----------------------------------------------------------
    def to_chw(self, t: str, lead: int = 0) -> str:
        """A tensor of the feature's layout with ``lead`` extra leading axes → (*lead, N, C, h, w)."""
        kind = self.layout.kind
        if kind == "CHW":
            return t
        base = list(range(lead))
        if kind == "HWC":
            return self.node("Transpose", [t], perm=base + [lead + p for p in (0, 3, 1, 2)])
        h, w = self.layout.grid
        c, prefix = self.layout.channels, self.layout.prefix
        spatial = self.slice(t, [prefix], [2 ** 62], [lead + 1]) if prefix else t
        lead_shape = self.shape_of(t, 0, lead + 1)  # (*lead, N)
        grid = self.node("Concat", [lead_shape, self.const(np.asarray([h, w, c], np.int64), "grid")], axis=0)
        spatial = self.reshape(spatial, grid)
        return self.node("Transpose", [spatial], perm=base + [lead + p for p in (0, 3, 1, 2)])

    def feature_chw(self) -> str:
        if not hasattr(self, "_feature_chw"):
            self._feature_chw = self.to_chw(self.feature_branch or self.feature)
        return self._feature_chw

    # the gradient of the explained classes' scores ---------------------------------------------------
    def gradient(self) -> str:
        """(K, N, *feature shape): the gradient of each explained class's score (one slice per class
        of ``ctx.classes``) with respect to the feature tensor, emitted by differentiating the head."""
        if not hasattr(self, "_gradient"):
            self._gradient = self._differentiate()
        return self._gradient

    def gradient_chw(self) -> str:
        """``gradient()`` laid out as (K, N, C, h, w)."""
        if not hasattr(self, "_gradient_chw"):
            self._gradient_chw = self.to_chw(self.gradient(), lead=1)
        return self._gradient_chw

    def spatial_constant(self, g: str) -> str | None:
        """Where ``g`` (K, N, C, h, w: ``gradient_chw()``) is the same at every location (the gradient
        of a global average pool, of a mean over the grid), the (K, N, C, 1, 1) tensor it was spread
        from; else None. Its spatial mean is that tensor."""
        if self.layout is None or self.layout.kind != "CHW" or g not in self.broadcasts:
            return None
        small, x, axes = self.broadcasts[g]
        shape = self.shapes.get(self.feature)
        return small if x == self.feature and shape is not None and len(shape) == 4 and sorted(axes) == [2, 3] \
            else None

    def float32(self, t: str, like: str | None = None) -> str:
        """``t`` cast to float32 when ``like`` (default: the feature) is another float type."""
        if np.dtype(self.np_dtype(like or self.feature)) == np.float32:
            return t
        return self.node("Cast", [t], to=onnx.TensorProto.FLOAT)

    def _differentiate(self) -> str:  # replaced by the writer, which knows the head's copy
        raise NotImplementedError

    def early_head(self):
        """On a token layer, the head that picks the class token as early as the ops allow
        (``export.head.early_head``: a ViT's last block then runs its MLP and attention queries on one
        token; its scores checked against the whole head's), or None where that does not apply; built
        once, on first use."""
        if not hasattr(self, "_early_head"):
            self._early_head = self._read_early()
        return self._early_head

    def _read_early(self):  # replaced by the writer, which can run the source graph
        return None
