"""Source (path, bytes, ModelProto, registry name, None) → a checked ``onnx.ModelProto``.

Models come from outside, so loading refuses, before any session allocates memory: files over
``limits.MAX_MODEL_BYTES``, unparsable bytes, operators from non-standard domains, and graphs whose
weights or ConstantOfShape nodes declare more than ``limits.MAX_TENSOR_BYTES``. Weights stored beside
the model (the dynamo exporter's ``NAME.onnx.data``) are read from a path, and only from regular files
inside the model's own folder (no absolute paths, ``..`` or links leading out), at the offsets and sizes
the tensors declare.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from .. import limits
from ..errors import InvalidParameterTypeError, ModelLoadError, ResourceLimitError, UnsupportedModelError
from ..graph import all_nodes, constant_value, subgraphs

ALLOWED_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


@dataclass
class LoadedModel:
    proto: onnx.ModelProto
    name: str
    sha256: str
    registry_entry: object = None  # explainer.zoo.registry.ModelEntry when loaded by registry name


def load_model(source, *, allow_external_data: bool = True, names: Sequence[str] = ()) -> LoadedModel:
    """A path, bytes or an ``onnx.ModelProto`` → a checked ``LoadedModel``. Names of known models are
    resolved above this floor (``explainer.zoo.load_source``); ``names`` only words the error for a
    string that is neither a file nor one of them."""
    if isinstance(source, onnx.ModelProto):
        data = source.SerializeToString()
        return _finish(_in_memory(_parse(data, "the given ModelProto"), "ModelProto"),
                       source.graph.name or "model", data, None)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _finish(_in_memory(_parse(data, "the given bytes"), "bytes"), "model", data, None)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.exists():
            return _from_path(path, allow_external_data)
        raise ModelLoadError(
            f"{str(source)!r} is neither an existing file nor a registry name; registry names: "
            f"{', '.join(sorted(names))}.")
    raise InvalidParameterTypeError(
        "load: source must be None, a path, bytes, an onnx.ModelProto or a registry name; got "
        f"{type(source).__name__}.")


def from_built(proto: onnx.ModelProto, name: str) -> LoadedModel:
    """A model made in memory by its builder and held by nobody else: used as it is, not copied."""
    data = proto.SerializeToString()
    loaded = _finish(_in_memory(proto, "ModelProto"), name, data, None)
    del data
    loaded.name = name
    return loaded


def from_file(path, name: str) -> LoadedModel:
    """A known model's file (no external data), under its registry name."""
    loaded = _from_path(Path(path), allow_external_data=False)
    loaded.name = name
    return loaded


def _from_path(path: Path, allow_external_data: bool) -> LoadedModel:
    if path.is_dir():
        raise ModelLoadError(f"{str(path)!r} is a directory; pass the .onnx file inside it.")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{str(path)!r} is empty; the file is not an ONNX model.")
    if size > limits.MAX_MODEL_BYTES:
        raise ResourceLimitError(
            f"{str(path)!r} is {size} bytes, over limits.MAX_MODEL_BYTES={limits.MAX_MODEL_BYTES}.")
    data = path.read_bytes()
    proto = _parse(data, repr(str(path)))
    digest = hashlib.sha256(data)
    if _external_tensors(proto):
        if not allow_external_data:
            raise ModelLoadError(
                f"{str(path)!r} stores weights in external files and allow_external_data=False; pass "
                "allow_external_data=True (the default) to read them from the model's folder.")
        check_safe(proto)  # declared sizes within the budget before anything is read
        _load_external(proto, path.parent, digest)
    name = path.stem[:-5] if path.stem.endswith(".onnx") else path.stem
    return _finish(proto, name, data, None, digest.hexdigest())


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    if len(data) == 0:
        raise ModelLoadError(f"{what} is empty; it is not an ONNX model.")
    if len(data) > limits.MAX_MODEL_BYTES:
        raise ResourceLimitError(f"{what} is {len(data)} bytes, over limits.MAX_MODEL_BYTES.")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:
        raise ModelLoadError(f"{what} is not a valid ONNX model: cannot parse it ({exc}).") from None
    if not proto.graph.node:
        raise ModelLoadError(f"{what} is not an ONNX model with a graph (no nodes found); "
                             "the file is truncated, empty or of another format.")
    return proto


def _external_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Weights and Constant-node values stored in external files."""
    tensors = list(proto.graph.initializer) + [a.t for n in proto.graph.node for a in n.attribute
                                               if a.type == onnx.AttributeProto.TENSOR]
    return [t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]


def _in_memory(proto: onnx.ModelProto, what: str) -> onnx.ModelProto:
    external = _external_tensors(proto)
    if external:
        raise ModelLoadError(
            f"the given {what} refers to {len(external)} weight tensor(s) stored in external files (e.g. "
            f"{external[0].name!r}), which {what} cannot carry; pass the path of the .onnx file (with its "
            "weight files beside it), or load it with onnx.load(path) first.")
    return proto


def _load_external(proto: onnx.ModelProto, base: Path, digest) -> None:
    """Each external tensor's bytes read into it, from a regular file inside ``base``."""
    base = base.resolve()
    files: dict[Path, int] = {}
    for tensor in _external_tensors(proto):
        info = {e.key: e.value for e in tensor.external_data}
        rel = info.get("location", "")
        target = (base / rel).resolve()
        if not rel or os.path.isabs(rel) or ".." in Path(rel).parts or base not in target.parents:
            raise ModelLoadError(
                f"external data {rel!r} of tensor {tensor.name!r} points outside the model's folder; "
                "refused. Weight files must sit inside the folder of the .onnx file.")
        if not target.is_file():
            raise ModelLoadError(f"external data file {rel!r} of tensor {tensor.name!r} is missing (or not a "
                                 "regular file); copy it beside the .onnx file.")
        if target not in files:
            files[target] = target.stat().st_size
        size = files[target]
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else size - offset
        except ValueError:
            raise ModelLoadError(f"tensor {tensor.name!r} declares a non-numeric external offset or "
                                 "length.") from None
        if tensor.data_type == onnx.TensorProto.STRING:
            raise ModelLoadError(f"tensor {tensor.name!r} is a string tensor stored externally, which ONNX "
                                 "does not define; refused.")
        expected = _tensor_bytes(tensor)
        if offset < 0 or length < 0 or offset + length > size or length != expected:
            raise ModelLoadError(
                f"tensor {tensor.name!r} declares {length} bytes at offset {offset} of {rel!r} ({size} "
                f"bytes; its shape needs {expected}); the external data is truncated or inconsistent.")
        with open(target, "rb") as f:
            f.seek(offset)
            raw = f.read(length)
        digest.update(raw)
        tensor.raw_data = raw
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def _finish(proto: onnx.ModelProto, name: str, data: bytes, entry, sha256: str | None = None) -> LoadedModel:
    check_safe(proto)
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"model {name!r} is not valid ONNX: {str(exc).splitlines()[0]}") from None
    return LoadedModel(proto, name, sha256 or hashlib.sha256(data).hexdigest(), entry)


def check_safe(proto: onnx.ModelProto) -> None:
    """Refuse custom operator domains and declared tensors beyond the memory budget."""
    g = proto.graph
    for node in all_nodes(g):  # subgraphs too (an If's branches, a Loop's body: TensorFlow's while loops)
        if node.domain not in ALLOWED_DOMAINS:
            raise UnsupportedModelError(
                f"node {node.name or node.output[0]!r} uses operator {node.op_type!r} from domain "
                f"{node.domain!r}; only the standard domains {ALLOWED_DOMAINS} are supported.")
    graphs = [g] + [sub for node in all_nodes(g) for sub in subgraphs(node)]
    total = 0
    for graph in graphs:
        for t in graph.initializer:
            _check_stored(t, f"weight {t.name!r}" + ("" if graph is g else f" of subgraph {graph.name!r}"))
        total += sum(_tensor_bytes(t) for t in graph.initializer)
    for graph, node in ((graph, node) for graph in graphs for node in graph.node):
        if node.op_type == "ConstantOfShape" and node.input:
            shape = constant_value(graph, node.input[0])
            if shape is not None:
                shape = np.asarray(shape).ravel()
                if shape.dtype.kind not in "iu" or np.any(shape < 0):
                    raise UnsupportedModelError(
                        f"node {node.name or node.output[0]!r} (ConstantOfShape) asks for a tensor of shape "
                        f"{shape.tolist()}: a dim below zero is no shape; the graph is corrupt.")
                total += int(np.prod(shape.astype(np.float64))) * 4
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    _check_stored(a.t, f"the value of node {node.name or node.output[0]!r} (Constant)")
                    total += _tensor_bytes(a.t)
    if total > limits.MAX_TENSOR_BYTES:
        raise ResourceLimitError(
            f"the graph declares {total} bytes of weights and constants, over "
            f"limits.MAX_TENSOR_BYTES={limits.MAX_TENSOR_BYTES}; raise it only for a trusted model.")


def _check_stored(t: onnx.TensorProto, what: str) -> None:
    """Refuse a stored tensor whose dims are negative, whose element type ONNX does not define, or whose
    data holds another number of values than its dims declare (reading it would fail later, or read
    garbage)."""
    if any(d < 0 for d in t.dims):
        raise ModelLoadError(f"{what} declares a negative dim {list(t.dims)}; the file is corrupt.")
    if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type == onnx.TensorProto.STRING:
        return
    try:
        np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    except Exception:
        raise ModelLoadError(f"{what} has element type {t.data_type}, which ONNX does not define; the file "
                             "is corrupt.") from None
    count = int(np.prod(np.asarray(list(t.dims), dtype=np.float64)))
    if t.raw_data:
        stored, expected, unit = len(t.raw_data), _tensor_bytes(t), "bytes"
    else:
        try:
            field = onnx.helper.tensor_dtype_to_field(t.data_type)
        except Exception:
            return
        stored, unit = len(getattr(t, field)), "values"
        if t.data_type in _PACKED_4BIT:
            expected = (count + 1) // 2
        elif t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
            expected = 2 * count
        else:
            expected = count
        if stored == 0 and count == 0:
            return
    if stored != expected:
        raise ModelLoadError(
            f"{what} declares dims {list(t.dims)} of {onnx.helper.tensor_dtype_to_string(t.data_type)} "
            f"({expected} {unit}) but stores {stored} {unit}; the file is corrupt or truncated.")


_PACKED_4BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def _tensor_bytes(t: onnx.TensorProto) -> int:
    count = int(np.prod(np.asarray(list(t.dims), dtype=np.float64)))
    if t.data_type in _PACKED_4BIT:  # two values a byte
        return (count + 1) // 2
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        itemsize = 8
    return count * itemsize
