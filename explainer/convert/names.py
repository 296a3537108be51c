"""Renaming every node and tensor of a graph to generated identifiers before conversion.

onnx2torch turns node names into torch.fx module names, and torch.fx turns those into Python source
that it compiles. Renaming to ``n<i>`` / ``t<i>`` means no string from an untrusted graph reaches that
code, whatever it contains. Users keep addressing layers by their original ONNX names: the mapping is
kept in ``PassContext.renamed``.
"""
from __future__ import annotations

import onnx

from .passes import register


@register("safe-names", targets=("torch",), order=90)
def safe_names(model: onnx.ModelProto, ctx) -> int:
    g = model.graph
    tensors: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name:
            return name
        if name not in tensors:
            tensors[name] = f"t{len(tensors)}"
        return tensors[name]

    for vi in list(g.input) + list(g.output) + list(g.value_info):
        vi.name = rename(vi.name)
        vi.doc_string = ""
    for t in g.initializer:
        t.name = rename(t.name)
        t.doc_string = ""
    nodes: dict[str, str] = {}
    for i, node in enumerate(g.node):
        original = node.name or (node.output[0] if node.output else f"node{i}")
        nodes[original] = f"n{i}"
        node.name = f"n{i}"
        node.doc_string = ""
        for k, name in enumerate(node.input):
            node.input[k] = rename(name)
        for k, name in enumerate(node.output):
            node.output[k] = rename(name)
    g.name = "graph"
    g.doc_string = ""
    model.doc_string = ""
    del model.metadata_props[:]
    ctx.renamed = {"tensors": tensors, "nodes": nodes}
    return len(tensors) + len(nodes)
