"""Newer versions of ops onnx2torch converts in an older version.

Explicit delegates first, for bumps that added attributes or inputs: a node using none of them is
converted as the older version. Then every remaining bump that kept the attributes and the inputs
(ONNX added tensor types: Reshape-19/21, Shape-19/21, Equal-19, ConstantOfShape-20, Identity-19, ...)
is an alias of the newest older version onnx2torch has.
"""
from __future__ import annotations

from onnx import defs
from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription

from . import base_converter, delegate, register


def _newer_versions(op: str, base: int) -> list[int]:
    return sorted({s.since_version for s in defs.get_all_schemas_with_history()
                   if s.name == op and s.domain in ("", "ai.onnx") and s.since_version > base
                   and not _have(op, s.since_version)})


def _have(op: str, version: int) -> bool:
    return OperationDescription("", op, version) in _CONVERTER_REGISTRY


def _is(value):
    return lambda v: v == value


def _all_ones(v) -> bool:
    return all(int(x) == 1 for x in v)


for _v in _newer_versions("Cast", 13):  # saturate/round_mode matter for float8 and float4 targets only
    delegate("Cast", _v, 13, {"saturate": _is(1), "round_mode": _is("up")})
for _v in _newer_versions("Pad", 13):  # 18: an axes input; 19: mode "wrap" (refused by Pad-13's modes)
    delegate("Pad", _v, 13, absent_inputs=(3,))
for _v in _newer_versions("AveragePool", 11):  # 19: dilations
    delegate("AveragePool", _v, 11, {"dilations": _all_ones})


def _signature(schema) -> tuple:
    return (sorted(schema.attributes), len(schema.inputs), len(schema.outputs),
            [i.option for i in schema.inputs])


def _alias_type_only_bumps() -> None:
    versions: dict[str, list] = {}
    for schema in defs.get_all_schemas_with_history():
        if schema.domain in ("", "ai.onnx"):
            versions.setdefault(schema.name, []).append(schema)
    for op, schemas in versions.items():
        schemas.sort(key=lambda s: s.since_version)
        for older, newer in zip(schemas, schemas[1:]):
            if (_have(op, newer.since_version) or not _have(op, older.since_version)
                    or _signature(older) != _signature(newer)):
                continue
            base = base_converter(op, older.since_version)
            register(op, newer.since_version, origin=f"{op}-{older.since_version} (types added)")(
                lambda node, graph, base=base: base(node, graph))


_alias_type_only_bumps()
