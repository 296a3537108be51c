"""Control flow: ONNX Loop, Scan and If, whose subgraphs are converted by onnx2torch like any graph and
run by a module that iterates (Loop, Scan) or chooses (If) in Python, so gradients pass through every
iteration and the chosen branch; and ReverseSequence, which TensorFlow's backward recurrent layers write
around their while loops.

A subgraph reads names from the graph around it (TensorFlow's while loops read the sequence they
step through): each such name becomes an extra input of the converted subgraph, fed by the node's
module. Loop: ``M`` (trip count) and ``cond`` optional, loop-carried values, scan outputs stacked on a
new first axis (a loop that never runs has no scan values to stack, and is refused when it has scan
outputs). Scan: states carried over the slices of its scan inputs, along their axes and directions,
its outputs' slices stacked along theirs. If: the condition read when the module runs; both branches
are converted."""
from __future__ import annotations

import contextvars

import onnx
import torch
from onnx import helper
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

from ...graph import outer_reads
from . import register


def _elem_type(name: str, graph) -> int:
    if name in graph.initializers:
        return graph.initializers[name].proto.data_type
    info = graph.value_info.get(name)
    if info is not None and info.type.tensor_type.elem_type:
        return info.type.tensor_type.elem_type
    return onnx.TensorProto.FLOAT


def subgraph_module(body: onnx.GraphProto, graph, opset_imports) -> tuple[torch.nn.Module, list[str]]:
    """(the torch module of ``body``, the outer names it reads, which follow its own inputs)."""
    import onnx2torch

    outer = list(dict.fromkeys(outer_reads(body)))
    copy = onnx.GraphProto()
    copy.CopyFrom(body)
    copy.input.extend(helper.make_tensor_value_info(name, _elem_type(name, graph), None) for name in outer)
    computed = {o for n in copy.node for o in n.output}
    for out in copy.output:  # onnx2torch takes outputs from nodes: a value passed through gets an Identity
        if out.name not in computed:
            copy.node.append(helper.make_node("Identity", [out.name], [out.name + "_out"]))
            out.name += "_out"
    model = helper.make_model(copy, opset_imports=opset_imports)
    module = onnx2torch.convert(model)
    for p in module.parameters():
        p.requires_grad_(False)
    return module, outer


def _flat(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


class Loop(torch.nn.Module):
    """ONNX Loop; its inputs: the trip count and the condition where the node has them, the carried
    values' initial values, then what the body reads from around it."""

    def __init__(self, body: torch.nn.Module, carried: int, scans: int, trip_count: bool, condition: bool):
        super().__init__()
        self.body, self.carried, self.scans = body, carried, scans
        self.has_trip_count, self.has_condition = trip_count, condition

    def forward(self, *values):
        values = list(values)
        trip_count = values.pop(0) if self.has_trip_count else None
        condition = values.pop(0) if self.has_condition else None
        carried, outer = values[:self.carried], values[self.carried:]
        limit = None if trip_count is None else int(trip_count.reshape(()))
        going = True if condition is None else bool(condition.reshape(()))
        scans: list[list] = [[] for _ in range(self.scans)]
        step = 0
        while going and (limit is None or step < limit):
            out = _flat(self.body(torch.tensor(step, dtype=torch.int64),
                                  torch.tensor(going, dtype=torch.bool), *carried, *outer))
            going = bool(out[0].reshape(()))
            carried = out[1:1 + self.carried]
            for k in range(self.scans):
                scans[k].append(out[1 + self.carried + k])
            step += 1
        if self.scans and not step:
            raise NotImplementedError("a Loop with scan outputs that runs no iteration has no converter "
                                      "(the scan outputs' shape is unknown)")
        results = list(carried) + [torch.stack(s) for s in scans]
        return tuple(results) if len(results) > 1 else results[0]


class If(torch.nn.Module):
    def __init__(self, then: torch.nn.Module, other: torch.nn.Module, then_reads: int):
        super().__init__()
        self.then, self.other, self.then_reads = then, other, then_reads

    def forward(self, condition, *outer):
        if bool(condition.reshape(())):
            return self.then(*outer[:self.then_reads])
        return self.other(*outer[self.then_reads:])


def _graph(node, name: str) -> onnx.GraphProto:
    return next(a.g for a in node.proto.attribute if a.name == name)


def _loop_converter(node, graph):
    body = _graph(node, "body")
    trip_count, condition, initial = node.input_values[0], node.input_values[1], list(node.input_values[2:])
    carried = len(initial)
    scans = len(body.output) - 1 - carried
    module, outer = subgraph_module(body, graph, _opsets(node))
    present = tuple(name for name in (trip_count, condition) if name)
    return OperationConverterResult(
        torch_module=Loop(module, carried, scans, bool(trip_count), bool(condition)),
        onnx_mapping=OnnxMapping(inputs=(*present, *initial, *outer), outputs=node.output_values))


def _if_converter(node, graph):
    opsets = _opsets(node)
    then, then_reads = subgraph_module(_graph(node, "then_branch"), graph, opsets)
    other, other_reads = subgraph_module(_graph(node, "else_branch"), graph, opsets)
    return OperationConverterResult(
        torch_module=If(then, other, len(then_reads)),
        onnx_mapping=OnnxMapping(inputs=(node.input_values[0], *then_reads, *other_reads),
                                 outputs=node.output_values))


#: the opset imports of the model being converted (onnx2torch passes converters the graph alone): a
#: subgraph's nodes are converted at the model's opset, as onnxruntime runs them
OPSETS: contextvars.ContextVar = contextvars.ContextVar("opsets", default=None)


def _opsets(node) -> list:
    opsets = OPSETS.get()
    if opsets is None:
        raise NotImplementedError(f"{node.operation_type}: the model's opset is unknown (convert it through "
                                  "explainer.runtime.torch_engine, which sets it)")
    return list(opsets)


class Scan(torch.nn.Module):
    """ONNX Scan (9 and later): the body run once per slice of the scan inputs (along their axes, in
    their directions), the states carried, each scan output's slices stacked along its axis."""

    def __init__(self, body: torch.nn.Module, states: int, in_axes, in_reversed, out_axes, out_reversed):
        super().__init__()
        self.body, self.states = body, states
        self.in_axes, self.in_reversed = list(in_axes), list(in_reversed)
        self.out_axes, self.out_reversed = list(out_axes), list(out_reversed)

    def forward(self, *values):
        count = len(self.in_axes)
        states, sequences = list(values[:self.states]), values[self.states:self.states + count]
        outer = values[self.states + count:]
        axes = [a % x.dim() for a, x in zip(self.in_axes, sequences)]
        length = sequences[0].shape[axes[0]]
        outputs: list[list] = [[] for _ in self.out_axes]
        for t in range(length):
            slices = [x.select(a, length - 1 - t if back else t)
                      for x, a, back in zip(sequences, axes, self.in_reversed)]
            out = _flat(self.body(*states, *slices, *outer))
            states = out[:self.states]
            for k, piece in enumerate(out[self.states:]):
                outputs[k].append(piece)
        scanned = [torch.stack(pieces[::-1] if back else pieces, dim=a % (pieces[0].dim() + 1))
                   for pieces, a, back in zip(outputs, self.out_axes, self.out_reversed)]
        results = list(states) + scanned
        return tuple(results) if len(results) > 1 else results[0]


def _scan_converter(node, graph):
    body = _graph(node, "body")
    count = int(node.attributes["num_scan_inputs"])
    states = len(node.input_values) - count
    scans = len(body.output) - states
    if not count:
        raise NotImplementedError("a Scan without scan inputs has no converter")
    module, outer = subgraph_module(body, graph, _opsets(node))
    a = node.attributes
    return OperationConverterResult(
        torch_module=Scan(module, states, a.get("scan_input_axes", [0] * count),
                          a.get("scan_input_directions", [0] * count), a.get("scan_output_axes", [0] * scans),
                          a.get("scan_output_directions", [0] * scans)),
        onnx_mapping=OnnxMapping(inputs=(*node.input_values, *outer), outputs=node.output_values))


class ReverseSequence(torch.nn.Module):
    def __init__(self, batch_axis: int, time_axis: int):
        super().__init__()
        self.batch_axis, self.time_axis = batch_axis, time_axis

    def forward(self, x, lengths):
        steps = x.shape[self.time_axis]
        if bool((lengths == steps).all()):
            return x.flip(self.time_axis)
        pieces = []
        for b in range(x.shape[self.batch_axis]):
            row = x.select(self.batch_axis, b)
            t = self.time_axis - (self.time_axis > self.batch_axis)
            n = int(lengths[b])
            pieces.append(torch.cat([row.narrow(t, 0, n).flip(t), row.narrow(t, n, steps - n)], dim=t))
        return torch.stack(pieces, dim=self.batch_axis)


def _reverse_sequence_converter(node, graph):
    return OperationConverterResult(
        torch_module=ReverseSequence(int(node.attributes.get("batch_axis", 1)), int(node.attributes.get("time_axis", 0))),
        onnx_mapping=OnnxMapping(inputs=tuple(node.input_values), outputs=node.output_values))


register("Loop", 11)(_loop_converter)
register("Scan", 9)(_scan_converter)
register("If", 11)(_if_converter)
register("ReverseSequence", 10)(_reverse_sequence_converter)
