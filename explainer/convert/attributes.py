"""Which attributes of each ONNX op the torch conversion honours, checked before converting: a node
carrying any other attribute at a value other than its default is refused with the node, the op and
the attribute named, never converted into a module that silently computes something else.

``HONOURED`` is read off the converters (onnx2torch's ``node_converters`` and ours in
``converters/``): op -> {attribute: ANY (every value is honoured) or a predicate on the value}. An
attribute not listed must be absent or at the default of the op's schema at the graph's opset (a
listed attribute with a predicate may be absent too: its default is what the converter assumes). An op
missing from the table may carry no attribute at a non-default value. ``check_attributes`` runs on
the normalised graph, after the passes that rewrite attributes the converters lack (``auto_pad`` to
explicit ``pads``, ``allowzero`` on Reshape targets that hold no 0).
"""
from __future__ import annotations

from typing import Callable

import onnx
from onnx import defs, helper

from ..errors import ConversionError
from ..graph import all_nodes, opset


class _Any:
    def __repr__(self) -> str:
        return "ANY"


#: every value of the attribute is honoured
ANY = _Any()


def one_of(*values) -> Callable:
    check = lambda value: value in values  # noqa: E731
    check.__doc__ = f"one of {values}"
    return check


def _all_ones(value) -> bool:
    return all(int(v) == 1 for v in value)


def _odd(value) -> bool:
    return int(value) % 2 == 1


_all_ones.__doc__ = "all 1"
_odd.__doc__ = "odd (torch's LocalResponseNorm centres an even window one channel off ONNX's)"
def _activations(op: str) -> Callable:
    defaults = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}[op]
    allowed = [defaults] + ([["Relu"]] if op == "RNN" else [])
    check = lambda value: any(list(value) in (a, a * 2) for a in allowed)  # noqa: E731  (one per direction)
    check.__doc__ = f"{' or '.join(map(str, allowed))} per direction"
    return check


_UNPADDED = one_of("NOTSET", "VALID")  # SAME_UPPER / SAME_LOWER are made explicit by the 'auto-pad' pass
_LEGACY = {"consumed_inputs": ANY}  # opset 1-6 bookkeeping with no effect on the result
_BROADCAST = {"broadcast": ANY, "axis": ANY}  # opset 1-6 broadcasting, onnx2torch's old_style_broadcast
_REDUCE = {"axes": ANY, "keepdims": ANY, "noop_with_empty_axes": ANY}
_CONV = {"group": ANY, "pads": ANY, "strides": ANY, "dilations": ANY, "kernel_shape": ANY, "auto_pad": _UNPADDED}

HONOURED: dict[str, dict[str, object]] = {
    # convolutions and pools
    "Conv": _CONV,
    "ConvTranspose": {**_CONV, "output_padding": ANY},  # output_shape: not honoured
    "ConvInteger": _CONV,
    "AveragePool": {"kernel_shape": ANY, "strides": ANY, "pads": ANY, "ceil_mode": ANY, "count_include_pad": ANY,
                    "auto_pad": _UNPADDED, "dilations": _all_ones},
    "MaxPool": {"kernel_shape": ANY, "strides": ANY, "pads": ANY, "ceil_mode": ANY, "dilations": ANY,
                "auto_pad": _UNPADDED, "storage_order": ANY},  # storage_order: the Indices output only (refused)
    "GlobalAveragePool": {}, "GlobalMaxPool": {},
    # normalisations (momentum updates running statistics in training mode only, which is refused)
    "BatchNormalization": {**_LEGACY, "epsilon": ANY, "momentum": ANY, "is_test": ANY},
    "InstanceNormalization": {**_LEGACY, "epsilon": ANY},
    "GroupNormalization": {"epsilon": ANY, "num_groups": ANY},
    "LayerNormalization": {"axis": ANY, "epsilon": ANY},
    "LRN": {"size": _odd, "alpha": ANY, "beta": ANY, "bias": ANY},
    # activations
    "LeakyRelu": {**_LEGACY, "alpha": ANY},
    "Elu": {**_LEGACY, "alpha": ANY},
    "Celu": {"alpha": ANY},
    "HardSigmoid": {**_LEGACY, "alpha": ANY, "beta": ANY},
    "Selu": {**_LEGACY},  # onnx2torch's nn.SELU has the default alpha and gamma only
    "Softmax": {"axis": ANY}, "LogSoftmax": {"axis": ANY},  # opset < 13 semantics (2-D coercion) kept
    "Gelu": {"approximate": one_of("none", "tanh")},
    **{op: dict(_LEGACY) for op in ("Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal",
                                     "Floor", "Ceil", "PRelu", "Max", "Min", "Sum", "Mean")},
    "Clip": {**_LEGACY, "min": ANY, "max": ANY},
    # arithmetic and logic
    **{op: {**_LEGACY, **_BROADCAST} for op in ("Add", "Sub", "Mul", "Div")},
    **{op: dict(_BROADCAST) for op in ("Pow", "And", "Or", "Xor", "Equal", "Less", "Greater")},
    "Gemm": {"alpha": ANY, "beta": ANY, "transA": ANY, "transB": ANY, "broadcast": ANY},
    "Mod": {"fmod": ANY},
    "Einsum": {"equation": ANY},
    "CumSum": {"exclusive": ANY, "reverse": ANY},
    # shapes and indexing
    "Flatten": {"axis": ANY},
    "Concat": {"axis": ANY},
    "Split": {"axis": ANY, "split": ANY, "num_outputs": ANY},
    "Pad": {"mode": one_of("constant", "reflect", "edge"), "pads": ANY},  # Pad-2's value: not honoured
    "Reshape": {**_LEGACY},  # allowzero=1 is refused (the 'reshape-allowzero' pass clears it where it is moot)
    "Squeeze": {"axes": ANY}, "Unsqueeze": {"axes": ANY},
    "Slice": {"starts": ANY, "ends": ANY, "axes": ANY},
    "Transpose": {"perm": ANY},
    "Gather": {"axis": ANY}, "GatherElements": {"axis": ANY},
    "GatherND": {},  # batch_dims != 0 is refused
    "Shape": {"start": ANY, "end": ANY},
    "DepthToSpace": {"blocksize": ANY, "mode": ANY},
    "Cast": {"to": ANY},  # saturate and round_mode only matter for float8 / float4 targets
    "Constant": {"value": ANY, "value_float": ANY, "value_floats": ANY, "value_int": ANY, "value_ints": ANY},
    "ConstantOfShape": {"value": ANY},
    "EyeLike": {"dtype": ANY, "k": ANY},
    "IsInf": {},  # onnx2torch's torch.isinf detects both signs: detect_negative/positive at their defaults only
    "Range": {},
    "Dropout": {**_LEGACY, "ratio": ANY, "seed": ANY, "is_test": ANY},  # the identity at inference
    "TopK": {"axis": ANY, "largest": ANY, "sorted": ANY},  # TopK-1's k attribute: not honoured
    "ArgMax": {"axis": ANY, "keepdims": ANY, "select_last_index": ANY},
    "ArgMin": {"axis": ANY, "keepdims": ANY, "select_last_index": ANY},
    **{op: dict(_REDUCE) for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                                     "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")},
    "Resize": {"mode": one_of("nearest", "linear", "cubic"),
               "coordinate_transformation_mode": one_of("half_pixel", "pytorch_half_pixel", "align_corners",
                                                        "asymmetric", "tf_half_pixel_for_nn", "half_pixel_symmetric"),
               "nearest_mode": ANY, "cubic_coeff_a": ANY, "exclude_outside": ANY, "antialias": ANY, "axes": ANY,
               "keep_aspect_ratio_policy": one_of("stretch", "not_larger", "not_smaller")},
    "ScatterND": {"reduction": one_of("none", "add", "mul", "max", "min")},  # max, min: version 18 only
    "ScatterElements": {"axis": ANY, "reduction": one_of("none", "add", "mul", "max", "min")},  # the same
    "Col2Im": {"dilations": ANY, "pads": ANY, "strides": ANY},  # 2 spatial dims, symmetric pads: else refused
    "RoiAlign": {"mode": ANY, "output_height": ANY, "output_width": ANY, "sampling_ratio": ANY,
                 "spatial_scale": ANY, "coordinate_transformation_mode": ANY},
    "NonMaxSuppression": {"center_point_box": ANY},
    # recurrent (converters/recurrent.py: torch's fused modules; peepholes and partial sequence_lens refused)
    "LSTM": {"direction": ANY, "hidden_size": ANY, "layout": ANY, "activations": _activations("LSTM")},
    "GRU": {"direction": ANY, "hidden_size": ANY, "layout": ANY, "activations": _activations("GRU"),
            "linear_before_reset": ANY},
    "RNN": {"direction": ANY, "hidden_size": ANY, "layout": ANY, "activations": _activations("RNN")},
    # control flow (converters/control_flow.py: the subgraphs converted, their nodes checked here too)
    "Loop": {"body": ANY}, "If": {"then_branch": ANY, "else_branch": ANY},
    "Scan": {"body": ANY, "num_scan_inputs": ANY, "scan_input_axes": ANY, "scan_input_directions": ANY,
             "scan_output_axes": ANY, "scan_output_directions": ANY},
    "ReverseSequence": {"batch_axis": ANY, "time_axis": ANY},
    # sequences as lists (converters/sequences.py; a list has no element type)
    "SequenceEmpty": {"dtype": ANY}, "ConcatFromSequence": {"axis": ANY, "new_axis": ANY},
    "SplitToSequence": {"axis": ANY, "keepdims": ANY},
    # quantization (converters/quantization.py; blocked quantization is refused)
    "QuantizeLinear": {"axis": ANY, "output_dtype": ANY, "saturate": ANY},
    "DequantizeLinear": {"axis": ANY, "output_dtype": ANY},
}


def _value(attr: onnx.AttributeProto):
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    return value


def _default(schema, name: str):
    """The schema's default of attribute ``name``; ``_NONE`` when it has none (required, or optional
    without one: absent is then the only value a converter can assume)."""
    attr = schema.attributes.get(name) if schema is not None else None
    if attr is None or not attr.default_value.name:
        return _NONE
    return _value(attr.default_value)


_NONE = object()


def unhonoured(node: onnx.NodeProto, version: int) -> tuple[str, object, str] | None:
    """(attribute, value, what is honoured) for the first attribute of ``node`` that its converter does
    not honour, or None."""
    try:
        schema = defs.get_schema(node.op_type, max_inclusive_version=version, domain=node.domain)
    except Exception:  # an op onnx does not know has no converter either: onnx2torch says so
        schema = None
    honoured = HONOURED.get(node.op_type, {})
    for attr in node.attribute:
        value = _value(attr)
        rule = honoured.get(attr.name)
        if rule is ANY:
            continue
        if rule is not None:
            if rule(value):
                continue
            return attr.name, value, rule.__doc__ or "other values"
        default = _default(schema, attr.name)
        if default is not _NONE and _same(value, default):
            continue
        return attr.name, value, "its default only" if default is not _NONE else "nothing: it must be absent"
    return None


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return float(a) == float(b)
    return a == b


def check_attributes(model: onnx.ModelProto, names: dict[str, str] | None = None) -> None:
    """Raise ConversionError naming the first node (by its original name, through ``names``: safe name
    -> original) with an attribute value the conversion does not honour."""
    from onnx2torch.node_converters.registry import get_converter

    from . import converters  # noqa: F401  (ours join the registry)

    names = names or {}
    for node in all_nodes(model.graph):  # subgraphs' nodes too: onnx2torch converts them as well
        version = opset(model, node.domain)
        try:
            get_converter(node.op_type, version, node.domain or "")
        except NotImplementedError:
            continue  # no converter at all: onnx2torch says so, naming the op
        found = unhonoured(node, version)
        if found is None:
            continue
        attr, value, allowed = found
        name = names.get(node.name, node.name or (node.output[0] if node.output else ""))
        raise ConversionError(
            f"node {name!r} ({node.op_type}) has {attr}={value!r}, which the torch conversion does not "
            f"honour (it honours {allowed}); converting it would compute another function, so gradient "
            "methods are refused for this model. Occlusion and LIME (onnxruntime) still work.")
