"""ONNX LSTM, GRU and RNN (versions 7 and 14; 22 by alias) as torch's ``nn.LSTM`` / ``nn.GRU`` /
``nn.RNN``, one layer, forward, reverse or bidirectional, ``layout`` 0 (time first) or 1 (batch first),
initial states given or zero; the outputs Y (sequence, directions, batch, hidden), Y_h and Y_c as the
spec shapes them.

The weights must be initializers (they become the torch module's parameters); ONNX's gate order is
converted to torch's (LSTM: i, o, f, c to i, f, c, o; GRU: z, r, h to r, z, n). What torch's modules do not
compute is refused by name: peepholes, ``clip``, ``input_forget``, activations other than the default
(an RNN may use Tanh or Relu), and ``sequence_lens`` other than the full length (checked when the module
runs). A GRU with ``linear_before_reset=0`` (the spec's default; torch's GRU applies the reset gate after
the recurrent product) runs as a loop over the time steps (``ResetBeforeGRU``)."""
from __future__ import annotations

import torch
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

from . import decoded_attributes, register

#: the spec's default activations per direction, the only ones torch's modules compute
DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
_GATES = {"LSTM": (0, 2, 3, 1), "GRU": (1, 0, 2), "RNN": (0,)}  # torch's gate k is ONNX's gate _GATES[k]


def _reorder(weight: torch.Tensor, op: str) -> torch.Tensor:
    """(gates * hidden, ...) in ONNX's gate order -> torch's."""
    blocks = weight.chunk(len(_GATES[op]), dim=0)
    return torch.cat([blocks[g] for g in _GATES[op]], dim=0)


class Recurrent(torch.nn.Module):
    """One ONNX recurrent node over torch's fused module."""

    def __init__(self, op: str, module: torch.nn.RNNBase, layout: int, outputs: int, reverse: bool = False):
        super().__init__()
        self.op, self.rnn, self.layout, self.outputs, self.reverse = op, module, layout, outputs, reverse

    def forward(self, x, sequence_lens=None, initial_h=None, initial_c=None):
        if self.layout:  # (batch, sequence, input) -> time first
            x = x.transpose(0, 1)
        steps, batch = x.shape[0], x.shape[1]
        if sequence_lens is not None and sequence_lens.numel() and bool((sequence_lens != steps).any()):
            raise NotImplementedError(f"{self.op} with sequence_lens {sequence_lens.tolist()} shorter than the "
                                      f"sequence ({steps} steps) has no converter")
        directions, hidden = 2 if self.rnn.bidirectional else 1, self.rnn.hidden_size
        zeros = x.new_zeros(directions, batch, hidden)
        states = [zeros if s is None else (s.transpose(0, 1) if self.layout else s) for s in (initial_h, initial_c)]
        if self.reverse:  # direction="reverse": the forward module over the reversed sequence
            x = x.flip(0)
        if self.op == "LSTM":
            y, (h, c) = self.rnn(x, (states[0], states[1]))
        else:
            y, h = self.rnn(x, states[0])
            c = None
        if self.reverse:
            y = y.flip(0)
        y = y.reshape(steps, batch, directions, hidden)
        y = y.permute(1, 0, 2, 3) if self.layout else y.permute(0, 2, 1, 3)  # Y: (seq, dirs, batch, hidden)
        if self.layout:
            h = h.transpose(0, 1)
            c = None if c is None else c.transpose(0, 1)
        return (y, h, c)[:self.outputs] if self.outputs > 1 else y


class ResetBeforeGRU(torch.nn.Module):
    """ONNX's default GRU (``linear_before_reset=0``): the reset gate applied to the hidden state before
    its recurrent product, h~ = tanh(W_h x + R_h (r * h) + b), which torch's fused GRU does not compute;
    a loop over the time steps with ``nn.GRU``'s parameter names and gate order (r, z, n)."""

    def __init__(self, size: int, hidden: int, bidirectional: bool):
        super().__init__()
        self.hidden_size, self.bidirectional = hidden, bidirectional
        for suffix in ("_l0", "_l0_reverse")[:1 + bidirectional]:
            for name, shape in (("weight_ih", (3 * hidden, size)), ("weight_hh", (3 * hidden, hidden)),
                                ("bias_ih", (3 * hidden,)), ("bias_hh", (3 * hidden,))):
                self.register_parameter(name + suffix, torch.nn.Parameter(torch.zeros(shape)))

    def _run(self, x, h, suffix: str, backwards: bool):
        w, r = getattr(self, "weight_ih" + suffix), getattr(self, "weight_hh" + suffix)
        inputs = x @ w.T + getattr(self, "bias_ih" + suffix)  # (T, N, 3H): every step's input part at once
        (r_r, r_z, r_n), (b_r, b_z, b_n) = r.chunk(3), getattr(self, "bias_hh" + suffix).chunk(3)
        outputs = []
        for t in (range(x.shape[0] - 1, -1, -1) if backwards else range(x.shape[0])):
            i_r, i_z, i_n = inputs[t].chunk(3, dim=-1)
            reset = torch.sigmoid(i_r + h @ r_r.T + b_r)
            update = torch.sigmoid(i_z + h @ r_z.T + b_z)
            candidate = torch.tanh(i_n + (reset * h) @ r_n.T + b_n)
            h = (1 - update) * candidate + update * h
            outputs.append(h)
        return torch.stack(outputs[::-1] if backwards else outputs), h

    def forward(self, x, h0):
        y, h = self._run(x, h0[0], "_l0", False)
        if not self.bidirectional:
            return y, h[None]
        y_back, h_back = self._run(x, h0[1], "_l0_reverse", True)
        return torch.cat([y, y_back], dim=-1), torch.stack([h, h_back])


def recurrent_converter(op: str):
    def convert(node, graph):
        attrs = decoded_attributes(node)
        direction = attrs.get("direction", "forward")
        directions = 2 if direction == "bidirectional" else 1
        activations = attrs.get("activations")
        nonlinearity = "tanh"
        if activations is not None:
            wanted = list(DEFAULT_ACTIVATIONS[op]) * directions
            if op == "RNN" and activations in (["Relu"] * directions,):
                nonlinearity = "relu"
            elif list(activations) != wanted:
                raise NotImplementedError(f"{op} with activations={activations} has no converter (torch's "
                                          f"{op} computes {wanted})")
        for name in ("clip", "input_forget", "activation_alpha", "activation_beta"):
            if attrs.get(name):
                raise NotImplementedError(f"{op} with {name}={attrs[name]} has no converter")
        inputs = list(node.input_values) + [""] * 8
        x, w, r, b, lens, h0, c0, peepholes = inputs[:8]
        if op == "LSTM" and peepholes:
            raise NotImplementedError("LSTM with peepholes (input P) has no converter")
        if any(name not in graph.initializers for name in (w, r) + ((b,) if b else ())):
            raise NotImplementedError(f"{op} whose weights are computed in the graph has no converter (W, R and B "
                                      "must be initializers)")
        W, R = (graph.initializers[n].to_torch().float() for n in (w, r))
        hidden, size = R.shape[-1], W.shape[-1]
        if attrs.get("hidden_size", hidden) != hidden:
            raise NotImplementedError(f"{op} with hidden_size={attrs['hidden_size']} and R of {hidden} has no converter")
        gates = len(_GATES[op])
        B = graph.initializers[b].to_torch().float() if b else torch.zeros(directions, 2 * gates * hidden)
        kind = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN}[op]
        extra = {"nonlinearity": nonlinearity} if op == "RNN" else {}
        if op == "GRU" and not attrs.get("linear_before_reset", 0):
            module = ResetBeforeGRU(size, hidden, directions == 2)
        else:
            module = kind(size, hidden, bidirectional=directions == 2, **extra)
        with torch.no_grad():
            for d in range(directions):
                suffix = "_l0_reverse" if d == 1 else "_l0"
                getattr(module, "weight_ih" + suffix).copy_(_reorder(W[d], op))
                getattr(module, "weight_hh" + suffix).copy_(_reorder(R[d], op))
                getattr(module, "bias_ih" + suffix).copy_(_reorder(B[d, :gates * hidden], op))
                getattr(module, "bias_hh" + suffix).copy_(_reorder(B[d, gates * hidden:], op))
        module.requires_grad_(False)
        result = Recurrent(op, module, int(attrs.get("layout", 0)), len(node.output_values),
                           reverse=direction == "reverse")
        mapping = OnnxMapping(inputs=(x, lens, h0, c0) if (lens or h0 or c0) else (x,),
                              outputs=node.output_values)
        return OperationConverterResult(torch_module=result, onnx_mapping=mapping)

    return convert


for _op in ("LSTM", "GRU", "RNN"):
    for _version in (7, 14):
        register(_op, _version)(recurrent_converter(_op))
