"""Converters for ONNX ops onnx2torch lacks or converts into another function, registered into its
registry at import, one small file per op family (in the style of onnx2torch's own
``node_converters``): activations, control flow (Loop, Scan, If: their subgraphs converted; ReverseSequence),
normalization (ranks from the tensor, never from inferred shapes),
pooling (the same), quantization, recurrent (LSTM, GRU, RNN over torch's fused modules), reduce, resize
(every coordinate mode exactly, antialiasing), sequences (as Python lists: what scripted list code
exports to), scatter (ScatterND at every version with its reductions,
without torch's deprecated list indexing; ScatterElements), shaping (Flatten, CumSum, DepthToSpace,
Split-18, Slice, Col2Im). Which attributes each converter honours is in ``../attributes.py``.

``register(op, version)`` adds one converter and refuses a second for the same (op, version), unless
``replaces`` says why onnx2torch's own is replaced;
``delegate`` registers a newer version of an op onto onnx2torch's converter of an older one, for the
nodes that use none of what the newer version added (anything else is refused with the attribute
named); ``_versions.py`` does the same for every version bump that only added tensor types.

Discovery and duplicates follow the rule of the library's three registries (``explainer.registries``):
every module of this package (those whose names start with "_" excepted) is found by one ``pkgutil``
scan and imported, in name order, when the package is; each registers its converters with ``register``
as it is imported; a second converter for an (op, version) raises ``ValueError`` naming both places.
``_versions`` runs last, explicitly: it aliases newer versions onto every converter registered before it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter

from ...registries import duplicate, import_modules, modules, place

#: (op type, since version) -> where the converter comes from: "ours" or "alias of <op>-<version>"
CONVERTERS: dict[tuple[str, int], str] = {}
_FUNCTIONS: dict[tuple[str, int], Callable] = {}  # (op type, since version) -> our converter (for messages)

#: Ops whose converter reads its first input's shape from ``graph.value_info``, where shape inference can
#: have lost it (a Reshape-5/13 with a computed target leaves everything after it without a rank):
#: ``torch_engine`` completes those shapes by measurement before converting. onnx2torch's
#: BatchNormalization, InstanceNormalization, AveragePool, MaxPool, GlobalAveragePool and
#: LayerNormalization read them; ours (normalization.py, pooling.py) take the rank from the node or from
#: the tensor at run time, so no converter in use does now (tests/test_converters.py keeps it so).
SHAPE_READERS: frozenset[str] = frozenset()


def register(op: str, version: int, origin: str = "ours", replaces: str = ""):
    """Decorator registering ``fn(node, graph)`` as the converter of ``op`` ``version``. A second
    converter for the same (op, version) is refused, unless ``replaces`` says why onnx2torch's own one
    is replaced."""
    def wrap(fn: Callable):
        key = OperationDescription("", op, version)
        if (op, version) in CONVERTERS or (key in _CONVERTER_REGISTRY and not replaces):
            first = place(_FUNCTIONS[(op, version)]) if (op, version) in _FUNCTIONS else "onnx2torch's own converter"
            raise duplicate(f"a converter for {op}-{version}", first, place(fn))
        if replaces:
            del _CONVERTER_REGISTRY[key]
        add_converter(operation_type=op, version=version)(fn)
        CONVERTERS[(op, version)] = f"{origin}, replacing onnx2torch's: {replaces}" if replaces else origin
        _FUNCTIONS[(op, version)] = fn
        return fn

    return wrap


def decoded_attributes(node) -> dict:
    """An onnx2torch node's attributes with ONNX's byte strings (alone or in lists) as str."""
    def text(v):
        return v.decode() if isinstance(v, bytes) else v

    return {k: [text(x) for x in v] if isinstance(v, list) else text(v) for k, v in node.attributes.items()}


def base_converter(op: str, version: int) -> Callable:
    return _CONVERTER_REGISTRY[OperationDescription("", op, version)]


def delegate(op: str, version: int, base: int, accept: dict[str, Callable] | None = None,
             absent_inputs: tuple[int, ...] = ()) -> None:
    """``op``-``version`` converted as ``op``-``base`` when each attribute named in ``accept`` is absent
    or passes its check (the newer version's additions at their defaults) and the inputs at
    ``absent_inputs`` are not given."""
    accept = accept or {}
    convert_base = base_converter(op, base)

    def convert(node, graph):
        for name, ok in accept.items():
            value = node.attributes.get(name)
            if isinstance(value, bytes):
                value = value.decode()
            if value is not None and not ok(value):
                raise NotImplementedError(f"{op}-{version} with {name}={value!r} has no converter")
        for index in absent_inputs:
            if len(node.input_values) > index and node.input_values[index]:
                raise NotImplementedError(f"{op}-{version} with input {index} given has no converter")
        return convert_base(node, graph)

    register(op, version, origin=f"{op}-{base} (new attributes at their defaults)")(convert)


# the converters of this package's modules first, then ``_versions`` aliases newer versions onto them
import_modules(__name__, modules(Path(__file__).parent))
from . import _versions  # noqa: E402,F401
