"""Renaming every node and tensor of a graph to generated identifiers before conversion.

onnx2torch turns node names into torch.fx module names, and torch.fx turns those into Python source
that it compiles. Renaming to ``n<i>`` / ``t<i>`` means no string from an untrusted graph reaches that
code, whatever it contains. Users keep addressing layers by their original ONNX names: the mapping is
kept in ``PassContext.renamed``.
"""
from __future__ import annotations

import onnx

from ..graph import subgraphs
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
        _rename_subgraphs(node, rename, f"n{i}")
    g.name = "graph"
    g.doc_string = ""
    model.doc_string = ""
    del model.metadata_props[:]
    ctx.renamed = {"tensors": tensors, "nodes": nodes}
    return len(tensors) + len(nodes)


def _rename_subgraphs(node: onnx.NodeProto, rename, prefix: str) -> None:
    """The same renaming inside ``node``'s subgraphs (an If's branches, a Loop's body), which onnx2torch
    converts too: the names they read from around them map as the graph's do (ONNX names are unique
    across scopes), theirs get fresh identifiers; their nodes are ``<prefix>_<i>``."""
    for j, sub in enumerate(subgraphs(node)):
        sub.name, sub.doc_string = f"{prefix}_graph{j}", ""
        for vi in list(sub.input) + list(sub.output) + list(sub.value_info):
            vi.name, vi.doc_string = rename(vi.name), ""
        for t in sub.initializer:
            t.name, t.doc_string = rename(t.name), ""
        for i, inner in enumerate(sub.node):
            inner.name, inner.doc_string = f"{prefix}_{i}", ""
            inner.input[:] = [rename(n) for n in inner.input]
            inner.output[:] = [rename(n) for n in inner.output]
            _rename_subgraphs(inner, rename, f"{prefix}_{i}")
