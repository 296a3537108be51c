"""Reverse-mode gradient rules for ONNX ops, one small function per op, kept in one registry.

A rule gets ``b`` (``head.Backward``: the context to emit nodes, the forward copy's tensor names
``b.fwd(name)``, measured shapes ``b.shape(name)``, constant values ``b.value(name)``, and
``b.needs(node, i)``: whether input i depends on the feature), the forward node, and the incoming
gradient of each output (a tensor name, or None where no gradient flows). It returns the gradient of
each input (None for inputs that are constants for the gradient). Gradients carry one extra leading
axis K, one slice per class explained: an output of shape S has gradient (K, *S). Forward values
broadcast against them from the right; axes are shifted by one (``b.axis``).

Registering an op twice raises ``ValueError`` (as onnx2torch's converter registry does)."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..errors import UnsupportedHeadOpError
from .errors import RECIPRO_HINT

RULES: dict[str, Callable] = {}


def rule(*ops: str):
    def register(fn):
        from ..registries import duplicate, place

        for op in ops:
            if op in RULES:
                raise duplicate(f"a gradient rule for {op!r}", place(RULES[op]), place(fn))
            RULES[op] = fn
        return fn
    return register


def attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _unsupported(node, why: str):
    raise UnsupportedHeadOpError(f"export: the {node.op_type} node {node.name or node.output[0]!r} in the head "
                                 f"(feature layer → scores) has no gradient rule for {why}. {RECIPRO_HINT}.")


# shapes and identities --------------------------------------------------------------------------
@rule("Identity", "Dropout")
def _identity(b, node, grads):
    return [grads[0]] + [None] * (len(node.input) - 1)


@rule("Cast")
def _cast(b, node, grads):
    x = node.input[0]
    if b.ctx.np_dtype(x) == b.ctx.np_dtype(node.output[0]):
        return [grads[0]]
    return [b.ctx.node("Cast", [grads[0]], to=b.ctx.elem_type(x))]


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(b, node, grads):
    x = node.input[0]
    return [b.reshape_like(grads[0], x)] + [None] * (len(node.input) - 1)


@rule("Expand")
def _expand(b, node, grads):
    return [b.unbroadcast(grads[0], node.input[0]), None]


@rule("Transpose")
def _transpose(b, node, grads):
    rank = b.rank(node.input[0])
    perm = attr(node, "perm") or list(reversed(range(rank)))
    inverse = [0] * rank
    for i, p in enumerate(perm):
        inverse[p] = i
    return [b.ctx.node("Transpose", [grads[0]], perm=[0] + [p + 1 for p in inverse])]


@rule("Concat")
def _concat(b, node, grads):
    g = grads[0]
    rank = b.rank(node.output[0])
    axis = attr(node, "axis") % rank
    out, start = [], 0
    for i, x in enumerate(node.input):
        size = b.shape(x)[axis]
        if b.needs(node, i):
            out.append(b.reshape_like(b.ctx.slice(g, [start], [start + size], [axis + 1]), x))
        else:
            out.append(None)
        start += size
    return out


@rule("Split")
def _split(b, node, grads):
    x = node.input[0]
    rank = b.rank(x)
    axis = attr(node, "axis", 0) % rank
    parts = []
    for g, y in zip(grads, node.output):
        parts.append(g if g is not None else b.zeros_like(y, grads))
    return [b.ctx.node("Concat", parts, axis=axis + 1)] + [None] * (len(node.input) - 1)


def _slice_params(b, node):
    if b.ctx.opset < 10:
        starts, ends = attr(node, "starts"), attr(node, "ends")
        axes, steps = attr(node, "axes"), None
    else:
        starts, ends = b.value(node.input[1]), b.value(node.input[2])
        axes = b.value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        steps = b.value(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    shape = b.shape(node.input[0])
    if starts is None or ends is None or shape is None:
        _unsupported(node, "its starts and ends are computed at run time")
    starts, ends = [int(v) for v in np.ravel(starts)], [int(v) for v in np.ravel(ends)]
    axes = list(range(len(starts))) if axes is None else [int(a) % len(shape) for a in np.ravel(axes)]
    steps = [1] * len(starts) if steps is None else [int(s) for s in np.ravel(steps)]
    return shape, starts, ends, axes, steps


@rule("Slice")
def _slice(b, node, grads):
    shape, starts, ends, axes, steps = _slice_params(b, node)
    rank = len(shape)
    begin, end = [0] * (rank + 1), [0] * (rank + 1)
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st != 1:
            _unsupported(node, f"step {st} (only step 1 has a gradient rule)")
        d = shape[a]
        s = min(max(s + d if s < 0 else s, 0), d)
        e = min(max(e + d if e < 0 else e, 0), d)
        begin[a + 1], end[a + 1] = s, d - max(e, s)
    return [b.ctx.pad(grads[0], begin + end)] + [None] * (len(node.input) - 1)


@rule("Gather")
def _gather(b, node, grads):
    x, index = node.input
    shape = b.shape(x)
    indices = b.value(index)
    if indices is None or shape is None:
        _unsupported(node, "its indices are computed at run time")
    axis = attr(node, "axis", 0) % len(shape)
    d = shape[axis]
    indices = np.asarray(indices, np.int64)
    indices = np.where(indices < 0, indices + d, indices)
    g = grads[0]
    if indices.ndim == 0:  # the axis was removed: put it back, then pad with zeros around the index
        g = b.ctx.unsqueeze(g, [axis + 1])
        pads = [0] * (2 * (len(shape) + 1))
        pads[axis + 1], pads[len(shape) + 1 + axis + 1] = int(indices), d - 1 - int(indices)
        return [b.ctx.pad(g, pads), None]
    if indices.ndim > 1:  # the index dims flattened into one, then as 1-D indices
        g = b.ctx.reshape(g, b.ctx.node("Concat", [b.ctx.shape_of(g, 0, axis + 1),
                                                   b.ctx.const(np.asarray([indices.size], np.int64), "n"),
                                                   b.ctx.shape_of(g, axis + 1 + indices.ndim)], axis=0))
        indices = indices.reshape(-1)
    # one-hot matrix (n, d): move the axis last, multiply, move it back
    rank = len(shape) + 1
    onehot = np.zeros((len(indices), d), np.dtype(b.ctx.np_dtype(x)))
    onehot[np.arange(len(indices)), indices] = 1
    perm = [i for i in range(rank) if i != axis + 1] + [axis + 1]
    back = [0] * rank
    for i, p in enumerate(perm):
        back[p] = i
    moved = b.ctx.node("Transpose", [g], perm=perm)
    product = b.ctx.node("MatMul", [moved, b.ctx.const(onehot, "onehot")])
    return [b.ctx.node("Transpose", [product], perm=back), None]


# elementwise ------------------------------------------------------------------------------------
@rule("Add", "Sum")
def _add(b, node, grads):
    return [b.unbroadcast(grads[0], x) if b.needs(node, i) else None for i, x in enumerate(node.input)]


@rule("Sub")
def _sub(b, node, grads):
    a, c = node.input
    g = grads[0]
    return [b.unbroadcast(g, a) if b.needs(node, 0) else None,
            b.unbroadcast(b.ctx.node("Neg", [g]), c) if b.needs(node, 1) else None]


@rule("Mul")
def _mul(b, node, grads):
    a, c = node.input
    g = grads[0]
    return [b.unbroadcast(b.ctx.node("Mul", [g, b.fwd(c)]), a) if b.needs(node, 0) else None,
            b.unbroadcast(b.ctx.node("Mul", [g, b.fwd(a)]), c) if b.needs(node, 1) else None]


@rule("Div")
def _div(b, node, grads):
    a, c = node.input
    g = grads[0]
    out = [b.unbroadcast(b.ctx.node("Div", [g, b.fwd(c)]), a) if b.needs(node, 0) else None, None]
    if b.needs(node, 1):  # d(a/c)/dc = -(a/c)/c
        y = b.fwd(node.output[0])
        out[1] = b.unbroadcast(b.ctx.node("Neg", [b.ctx.node("Mul", [g, b.ctx.node("Div", [y, b.fwd(c)])])]), c)
    return out


@rule("Neg")
def _neg(b, node, grads):
    return [b.ctx.node("Neg", [grads[0]])]


@rule("Pow")
def _pow(b, node, grads):
    x, e = node.input
    if b.needs(node, 1):
        _unsupported(node, "an exponent that depends on the feature layer")
    exponent = b.fwd(e)
    minus_one = b.ctx.node("Sub", [exponent, b.ctx.scalar(1.0, e)])
    d = b.ctx.node("Mul", [exponent, b.ctx.node("Pow", [b.fwd(x), minus_one])])
    return [b.ctx.node("Mul", [grads[0], d]), None]


@rule("Sqrt")
def _sqrt(b, node, grads):
    y = b.fwd(node.output[0])
    return [b.ctx.node("Div", [b.ctx.node("Mul", [grads[0], b.ctx.scalar(0.5, y)]), y])]


@rule("Exp")
def _exp(b, node, grads):
    return [b.ctx.node("Mul", [grads[0], b.fwd(node.output[0])])]


@rule("Tanh")
def _tanh(b, node, grads):
    y = b.fwd(node.output[0])
    one_minus = b.ctx.node("Sub", [b.ctx.scalar(1.0, y), b.ctx.node("Mul", [y, y])])
    return [b.ctx.node("Mul", [grads[0], one_minus])]


@rule("Relu")
def _relu(b, node, grads):
    x = b.fwd(node.input[0])
    mask = b.ctx.node("Cast", [b.ctx.node("Greater", [x, b.ctx.scalar(0.0, x)])], to=b.ctx.elem_type(node.input[0]))
    return [b.ctx.node("Mul", [grads[0], mask])]


def _mask(b, condition: str, like: str) -> str:
    return b.ctx.node("Cast", [condition], to=b.ctx.elem_type(like))


@rule("Clip")
def _clip(b, node, grads):
    """Gradient where min <= x <= max, as torch.clamp's; with min 0 (and a max) where x > 0: the torch
    side runs Clip(0, m) as Relu then Clip (``relu6-as-relu``), whose gradient at 0 is 0."""
    x = node.input[0]
    fx = b.fwd(x)
    if b.ctx.opset < 11:
        low_value, high_value = attr(node, "min"), attr(node, "max")
        low = None if low_value is None else b.ctx.scalar(low_value, x)
        high = None if high_value is None else b.ctx.scalar(high_value, x)
    else:
        low = node.input[1] if len(node.input) > 1 and node.input[1] else None
        high = node.input[2] if len(node.input) > 2 and node.input[2] else None
        low_value = b.value(low) if low is not None else None
        low, high = (b.fwd(low) if low else None), (b.fwd(high) if high else None)
    g = grads[0]
    if low is not None:
        strict = low_value is not None and np.size(low_value) == 1 and float(np.ravel(low_value)[0]) == 0.0 \
            and high is not None
        above = b.ctx.node("Greater", [fx, low]) if strict else _not(b, b.ctx.node("Less", [fx, low]))
        g = b.ctx.node("Mul", [g, _mask(b, above, x)])
    if high is not None:
        g = b.ctx.node("Mul", [g, _mask(b, _not(b, b.ctx.node("Greater", [fx, high])), x)])
    return [g] + [None] * (len(node.input) - 1)


def _not(b, condition: str) -> str:
    return b.ctx.node("Not", [condition])


@rule("Sigmoid")
def _sigmoid(b, node, grads):
    y = b.fwd(node.output[0])
    d = b.ctx.node("Mul", [y, b.ctx.node("Sub", [b.ctx.scalar(1.0, y), y])])
    return [b.ctx.node("Mul", [grads[0], d])]


@rule("HardSigmoid")
def _hard_sigmoid(b, node, grads):
    x = b.fwd(node.input[0])
    alpha, beta = attr(node, "alpha", 0.2), attr(node, "beta", 0.5)
    v = b.ctx.node("Add", [b.ctx.node("Mul", [x, b.ctx.scalar(alpha, node.input[0])]), b.ctx.scalar(beta, node.input[0])])
    inside = b.ctx.node("And", [b.ctx.node("Greater", [v, b.ctx.scalar(0.0, node.input[0])]),
                                b.ctx.node("Less", [v, b.ctx.scalar(1.0, node.input[0])])])
    d = b.ctx.node("Mul", [_mask(b, inside, node.input[0]), b.ctx.scalar(alpha, node.input[0])])
    return [b.ctx.node("Mul", [grads[0], d])]


@rule("HardSwish")
def _hard_swish(b, node, grads):
    """torch's hardswish_backward: 0 below -3, x/3 + 1/2 up to 3 (inclusive), 1 above."""
    name = node.input[0]
    x = b.fwd(name)
    middle = b.ctx.node("Add", [b.ctx.node("Div", [x, b.ctx.scalar(3.0, name)]), b.ctx.scalar(0.5, name)])
    d = b.ctx.node("Where", [b.ctx.node("Less", [x, b.ctx.scalar(-3.0, name)]), b.ctx.scalar(0.0, name),
                             b.ctx.node("Where", [b.ctx.node("Greater", [x, b.ctx.scalar(3.0, name)]),
                                                  b.ctx.scalar(1.0, name), middle])])
    return [b.ctx.node("Mul", [grads[0], d])]


@rule("Erf")
def _erf(b, node, grads):
    name = node.input[0]
    x = b.fwd(name)
    e = b.ctx.node("Exp", [b.ctx.node("Neg", [b.ctx.node("Mul", [x, x])])])
    return [b.ctx.node("Mul", [grads[0], b.ctx.node("Mul", [e, b.ctx.scalar(2.0 / math.sqrt(math.pi), name)])])]


@rule("Gelu")
def _gelu(b, node, grads):
    name = node.input[0]
    x = b.fwd(name)
    s = lambda v: b.ctx.scalar(v, name)  # noqa: E731
    if attr(node, "approximate", b"none") in (b"tanh", "tanh"):
        # 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2), t = tanh(c (x + a x^3))
        c, a = math.sqrt(2.0 / math.pi), 0.044715
        x2 = b.ctx.node("Mul", [x, x])
        inner = b.ctx.node("Mul", [s(c), b.ctx.node("Add", [x, b.ctx.node("Mul", [s(a), b.ctx.node("Mul", [x2, x])])])])
        t = b.ctx.node("Tanh", [inner])
        left = b.ctx.node("Mul", [s(0.5), b.ctx.node("Add", [s(1.0), t])])
        dinner = b.ctx.node("Mul", [s(c), b.ctx.node("Add", [s(1.0), b.ctx.node("Mul", [s(3 * a), x2])])])
        right = b.ctx.node("Mul", [b.ctx.node("Mul", [s(0.5), x]),
                                   b.ctx.node("Mul", [b.ctx.node("Sub", [s(1.0), b.ctx.node("Mul", [t, t])]), dinner])])
        d = b.ctx.node("Add", [left, right])
    else:  # Phi(x) + x phi(x)
        cdf = b.ctx.node("Mul", [s(0.5), b.ctx.node("Add", [s(1.0), b.ctx.node("Erf", [b.ctx.node("Mul", [x, s(1 / math.sqrt(2.0))])])])])
        pdf = b.ctx.node("Mul", [s(1 / math.sqrt(2 * math.pi)),
                                 b.ctx.node("Exp", [b.ctx.node("Mul", [s(-0.5), b.ctx.node("Mul", [x, x])])])])
        d = b.ctx.node("Add", [cdf, b.ctx.node("Mul", [x, pdf])])
    return [b.ctx.node("Mul", [grads[0], d])]


# quantisation: the straight-through estimator of explainer/convert/converters/quantization.py ----
@rule("QuantizeLinear")
def _quantize(b, node, grads):
    """q = saturate(round(x / s) + z): gradient 1/s where round(x/s) + z is inside the type's range,
    0 where it saturates."""
    x, scale = node.input[0], node.input[1]
    q = node.output[0]
    elem = b.ctx.elem_type(q)
    low, high = _INTEGER_RANGES.get(elem, (None, None))
    if low is None:
        _unsupported(node, f"output type {elem}")
    # the torch side tests the unclamped round(x/s) + z against the range
    unclamped = b.ctx.node("Round", [b.ctx.node("Div", [b.fwd(x), _per_axis(b, node, scale, x)])])
    if len(node.input) > 2 and node.input[2]:
        unclamped = b.ctx.node("Add", [unclamped, _per_axis(b, node, node.input[2], x, cast_to=x)])
    inside = b.ctx.node("And", [b.ctx.node("Not", [b.ctx.node("Less", [unclamped, b.ctx.scalar(low, x)])]),
                                b.ctx.node("Not", [b.ctx.node("Greater", [unclamped, b.ctx.scalar(high, x)])])])
    g = b.ctx.node("Div", [grads[0], _per_axis(b, node, scale, x)])
    return [b.ctx.node("Mul", [g, _mask(b, inside, x)])] + [None] * (len(node.input) - 1)


@rule("DequantizeLinear")
def _dequantize(b, node, grads):
    x, scale = node.input[0], node.input[1]
    g = b.ctx.node("Mul", [grads[0], _per_axis(b, node, scale, node.output[0])])
    return [g] + [None] * (len(node.input) - 1)


_INTEGER_RANGES = {2: (0, 255), 3: (-128, 127), 4: (0, 65535), 5: (-32768, 32767)}


def _per_axis(b, node, param: str, like: str, cast_to: str | None = None) -> str:
    value = b.fwd(param)
    if cast_to is not None:
        value = b.ctx.node("Cast", [value], to=b.ctx.elem_type(cast_to))
    shape = b.shape(param)
    if shape is None or len(shape) == 0 or int(np.prod(shape)) == 1:
        return value
    rank = b.rank(like)
    axis = attr(node, "axis", 1) % rank
    target = [1] * rank
    target[axis] = -1
    return b.ctx.reshape(value, b.ctx.const(np.asarray(target, np.int64), "shape"))


# linear algebra ---------------------------------------------------------------------------------
def _swap_last(b, t: str, rank: int) -> str:
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return b.ctx.node("Transpose", [t], perm=perm)


@rule("MatMul")
def _matmul(b, node, grads):
    a, c = node.input
    ra, rc = b.rank(a), b.rank(c)
    if ra < 2 or rc < 2:
        _unsupported(node, "a vector operand (rank 1)")
    g = grads[0]
    out = [None, None]
    ys = b.shape(node.output[0])
    if g in b.onehot and ra == 2 and rc == 2 and b.needs(node, 0) and not b.needs(node, 1):
        # one-hot rows of g times C^T: row n is column classes[n] of C, gathered, (P, K, N) -> (K, N, P)
        gathered = b.ctx.node("Gather", [b.fwd(c), b.onehot[g]], axis=1)
        return [b.ctx.node("Transpose", [gathered], perm=[1, 2, 0]), None]
    if b.needs(node, 0):  # (..., M, N) @ (..., N, P)^T: the batch dims of the output, A's matrix dims
        out[0] = b.unbroadcast(b.ctx.node("MatMul", [g, _swap_last(b, b.fwd(c), rc)]), a,
                               shape=tuple(ys[:-2]) + tuple(b.shape(a)[-2:]))
    if b.needs(node, 1):
        out[1] = b.unbroadcast(b.ctx.node("MatMul", [_swap_last(b, b.fwd(a), ra), g]), c,
                               shape=tuple(ys[:-2]) + tuple(b.shape(c)[-2:]))
    return out


@rule("Gemm")
def _gemm(b, node, grads):
    a, c = node.input[0], node.input[1]
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    trans_a, trans_b = attr(node, "transA", 0), attr(node, "transB", 0)
    g = grads[0]
    if alpha != 1.0:
        g_alpha = b.ctx.node("Mul", [g, b.ctx.scalar(alpha, a)])
    else:
        g_alpha = g
    out = [None] * len(node.input)
    if g in b.onehot and b.needs(node, 0) and not b.needs(node, 1):
        # one-hot rows of g times op(B)^T: row m is column classes[m] of op(B), gathered (exact: the
        # product adds zeros to it)
        if trans_b:  # op(B)^T = B: its rows
            da = b.ctx.node("Gather", [b.fwd(c), b.onehot[g]], axis=0)  # (K, M, P)
        else:  # B's columns: (P, K, M) -> (K, M, P)
            da = b.ctx.node("Transpose", [b.ctx.node("Gather", [b.fwd(c), b.onehot[g]], axis=1)], perm=[1, 2, 0])
        if alpha != 1.0:
            da = b.ctx.node("Mul", [da, b.ctx.scalar(alpha, a)])
        out[0] = b.ctx.node("Transpose", [da], perm=[0, 2, 1]) if trans_a else da
    elif b.needs(node, 0):
        b_op = b.fwd(c) if trans_b else b.ctx.node("Transpose", [b.fwd(c)], perm=[1, 0])
        da = b.ctx.node("MatMul", [g_alpha, b_op])  # (K, M, P): the gradient of A' = op(A)
        out[0] = b.ctx.node("Transpose", [da], perm=[0, 2, 1]) if trans_a else da
    if b.needs(node, 1):
        a_op = b.ctx.node("Transpose", [b.fwd(a)], perm=[1, 0]) if not trans_a else b.fwd(a)
        db = b.ctx.node("MatMul", [a_op, g_alpha])  # (K, P, N): gradient of B' = op(B)
        out[1] = b.ctx.node("Transpose", [db], perm=[0, 2, 1]) if trans_b else db
    if len(node.input) > 2 and node.input[2] and b.needs(node, 2):
        gc = b.ctx.node("Mul", [g, b.ctx.scalar(beta, a)]) if beta != 1.0 else g
        out[2] = b.unbroadcast(gc, node.input[2])
    return out


@rule("Conv")
def _conv(b, node, grads):
    x, w = node.input[0], node.input[1]
    if b.needs(node, 1) or (len(node.input) > 2 and node.input[2] and b.needs(node, 2)):
        _unsupported(node, "weights that depend on the feature layer")
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    xs, ys, ws = b.shape(x), b.shape(node.output[0]), b.shape(w)
    if xs is None or ys is None or ws is None:
        _unsupported(node, "shapes unknown")
    spatial = len(xs) - 2
    strides = attr(node, "strides") or [1] * spatial
    dilations = attr(node, "dilations") or [1] * spatial
    kernel = attr(node, "kernel_shape") or list(ws[2:])
    if auto_pad in ("NOTSET", "VALID"):
        pads = attr(node, "pads") or [0] * (2 * spatial)
        if auto_pad == "VALID":
            pads = [0] * (2 * spatial)
    else:  # SAME_*: the pads onnxruntime computes
        pads = [0] * (2 * spatial)
        for i in range(spatial):
            total = max((ys[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - xs[2 + i], 0)
            small, large = total // 2, total - total // 2
            pads[i], pads[spatial + i] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    output_padding = [xs[2 + i] - ((ys[2 + i] - 1) * strides[i] - pads[i] - pads[spatial + i]
                                   + dilations[i] * (kernel[i] - 1) + 1) for i in range(spatial)]
    g = grads[0]
    merged = b.ctx.reshape(g, b.ctx.node("Concat", [b.ctx.const(np.asarray([-1], np.int64), "minus1"),
                                                    b.ctx.shape_of(g, 2)], axis=0))
    dx = b.ctx.node("ConvTranspose", [merged, b.fwd(w)], strides=list(strides), pads=list(pads),
                    dilations=list(dilations), group=attr(node, "group", 1), kernel_shape=list(kernel),
                    output_padding=output_padding)
    return [b.ctx.reshape(dx, b.ctx.kshape(g, x))] + [None] * (len(node.input) - 1)


@rule("BatchNormalization")
def _batch_norm(b, node, grads):
    """Inference BatchNormalization: y = (x - mean) * scale / sqrt(var + eps) + bias."""
    x, scale, _, _, var = node.input[:5]
    if any(b.needs(node, i) for i in range(1, 5)) or len(node.output) > 1 and any(node.output[1:]):
        _unsupported(node, "training mode or parameters that depend on the feature layer")
    eps = attr(node, "epsilon", 1e-5)
    factor = b.ctx.node("Div", [b.fwd(scale), b.ctx.node("Sqrt", [b.ctx.node("Add", [b.fwd(var), b.ctx.scalar(eps, var)])])])
    rank = b.rank(x)
    factor = b.ctx.reshape(factor, b.ctx.const(np.asarray([-1] + [1] * (rank - 2), np.int64), "shape"))
    return [b.ctx.node("Mul", [grads[0], factor])] + [None] * (len(node.input) - 1)


# reductions and pools -----------------------------------------------------------------------------
def _spread(b, g: str, x: str, axes: list[int], keepdims: int, divide: bool) -> str:
    """The gradient of a sum or mean over ``axes`` (of x, positive) spread back over x's shape."""
    if not keepdims:
        g = b.ctx.unsqueeze(g, [a + 1 for a in sorted(axes)])
    if divide:
        shape = b.shape(x)
        count = int(np.prod([shape[a] for a in axes]))
        g = b.ctx.node("Div", [g, b.ctx.scalar(float(count), x)])
    spread = b.ctx.node("Expand", [g, b.ctx.expand_shape(x, axes, b.fwd(x))])
    b.ctx.broadcasts[spread] = (g, x, list(axes))  # a mean of it over ``axes`` is ``g`` (cams.py)
    return spread


def _reduce_axes(b, node) -> list[int]:
    x = node.input[0]
    rank = b.rank(x)
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = b.value(node.input[1])
        if axes is None:
            _unsupported(node, "axes computed at run time")
    if axes is None or len(np.ravel(axes)) == 0:
        if attr(node, "noop_with_empty_axes", 0):
            return []
        return list(range(rank))
    return sorted(int(a) % rank for a in np.ravel(axes))


@rule("ReduceMean")
def _reduce_mean(b, node, grads):
    axes = _reduce_axes(b, node)
    return [_spread(b, grads[0], node.input[0], axes, attr(node, "keepdims", 1), True)] + [None] * (len(node.input) - 1)


@rule("ReduceSum")
def _reduce_sum(b, node, grads):
    axes = _reduce_axes(b, node)
    return [_spread(b, grads[0], node.input[0], axes, attr(node, "keepdims", 1), False)] + [None] * (len(node.input) - 1)


@rule("GlobalAveragePool")
def _global_average_pool(b, node, grads):
    x = node.input[0]
    return [_spread(b, grads[0], x, list(range(2, b.rank(x))), 1, True)]


@rule("AveragePool")
def _average_pool(b, node, grads):
    """Any 2-D average pool (pads, strides, dilations, ceil_mode, count_include_pad) as the dense
    (out positions x in positions) matrix of its weights, onnxruntime's window and divisor."""
    x = node.input[0]
    xs, ys = b.shape(x), b.shape(node.output[0])
    kernel = list(attr(node, "kernel_shape"))
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if xs is None or ys is None or len(xs) != 4:
        _unsupported(node, "an input that is not (N, C, H, W)")
    pads = list(attr(node, "pads") or [0, 0, 0, 0])
    strides = list(attr(node, "strides") or [1, 1])
    dilations = list(attr(node, "dilations") or [1, 1])
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        for i in range(2):
            total = max((ys[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - xs[2 + i], 0)
            small, large = total // 2, total - total // 2
            pads[i], pads[2 + i] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    if list(xs[2:]) == kernel and all(v == 1 for v in ys[2:]) and not any(pads):
        return [_spread(b, grads[0], x, [2, 3], 1, True)]
    include = attr(node, "count_include_pad", 0)
    (height, width), (oh, ow) = xs[2:], ys[2:]
    if oh * ow * height * width > 4_000_000:
        _unsupported(node, f"a {height}x{width} → {oh}x{ow} pool (its weight matrix would be too large)")

    def windows(size, out, k, stride, dilation, begin, end):
        rows = []
        for o in range(out):
            start = o * stride - begin
            stop = min(start + (k - 1) * dilation + 1, size + end)
            taps = list(range(start, stop, dilation))
            valid = [t for t in taps if 0 <= t < size]
            rows.append((valid, len(taps)))
        return rows

    rows = windows(height, oh, kernel[0], strides[0], dilations[0], pads[0], pads[2])
    cols = windows(width, ow, kernel[1], strides[1], dilations[1], pads[1], pads[3])
    matrix = np.zeros((oh * ow, height * width), np.dtype(b.ctx.np_dtype(x)))
    for i, (vy, ny) in enumerate(rows):
        for j, (vx, nx) in enumerate(cols):
            count = ny * nx if include else len(vy) * len(vx)
            for y in vy:
                for xx in vx:
                    matrix[i * ow + j, y * width + xx] += 1.0 / count
    g = grads[0]
    flat = b.ctx.reshape(g, b.ctx.node("Concat", [b.ctx.shape_of(g, 0, 3),
                                                  b.ctx.const(np.asarray([oh * ow], np.int64), "n")], axis=0))
    spread = b.ctx.node("MatMul", [flat, b.ctx.const(matrix, "pool")])
    return [b.reshape_like(spread, x)]


@rule("MaxPool")
def _max_pool(b, node, grads):
    """Each window's gradient to its maximum (the first, on ties, as torch's max_pool2d), summed where
    windows overlap: the copy's MaxPool with its Indices output, and ScatterElements(add) (opset 16)."""
    x = node.input[0]
    if len(node.output) > 1 and node.output[1]:
        _unsupported(node, "a MaxPool whose indices the graph uses")
    if attr(node, "storage_order", 0):
        _unsupported(node, "storage_order=1")
    if b.ctx.opset < 16:
        _unsupported(node, f"opset {b.ctx.opset} (the rule scatters with ScatterElements' reduction='add', "
                           "opset 16; convert the model with onnx.version_converter)")
    attrs = {a.name: attr(node, a.name) for a in node.attribute}
    _, indices = b.ctx.node("MaxPool", [b.fwd(x)], n_outputs=2, **attrs)  # flat (n, c, h, w) indices
    g = grads[0]
    lead = b.ctx.shape_of(g, 0, 1)
    flat = b.ctx.node("Concat", [lead, b.ctx.const(np.asarray([-1], np.int64), "minus1")], axis=0)
    g_flat = b.ctx.reshape(g, flat)  # (K, N*C*oh*ow)
    where = b.ctx.node("Expand", [b.ctx.node("Flatten", [indices], axis=0), b.ctx.shape_of(g_flat)])
    size = b.ctx.reshape(b.ctx.node("Size", [b.fwd(x)]), b.ctx.const(np.asarray([1], np.int64), "one"))
    zeros = b.ctx.node("Expand", [b.ctx.const(np.zeros((), np.dtype(b.ctx.np_dtype(x))), "zero"),
                                  b.ctx.node("Concat", [lead, size], axis=0)])  # (K, N*C*H*W)
    spread = b.ctx.node("ScatterElements", [zeros, where, g_flat], axis=1, reduction="add")
    return [b.reshape_like(spread, x)]


@rule("GlobalMaxPool")
def _global_max_pool(b, node, grads):
    """The gradient to every position equal to its channel's maximum (one, for real-valued maps)."""
    x, y = b.fwd(node.input[0]), b.fwd(node.output[0])
    mask = b.ctx.node("Cast", [b.ctx.node("Equal", [x, y])], to=b.ctx.elem_type(node.input[0]))
    return [b.ctx.node("Mul", [grads[0], mask])]


@rule("ReduceMax", "ReduceMin")
def _reduce_extreme(b, node, grads):
    """The gradient to every position equal to the maximum (minimum) over the reduced axes, as
    GlobalMaxPool's (timm VOLO's auxiliary head takes the maximum over the tokens)."""
    x, y = node.input[0], node.output[0]
    axes = _reduce_axes(b, node)
    g, fy = grads[0], b.fwd(y)
    if not attr(node, "keepdims", 1):
        g, fy = b.ctx.unsqueeze(g, [a + 1 for a in axes]), b.ctx.unsqueeze(fy, axes)
    mask = b.ctx.node("Cast", [b.ctx.node("Equal", [b.fwd(x), fy])], to=b.ctx.elem_type(x))
    return [b.ctx.node("Mul", [g, mask])] + [None] * (len(node.input) - 1)


# normalisation and softmax ------------------------------------------------------------------------
@rule("Softmax")
def _softmax(b, node, grads):
    y = node.output[0]
    rank = b.rank(y)
    axis = attr(node, "axis", -1 if b.ctx.opset >= 13 else 1) % rank
    axes = [axis + 1] if b.ctx.opset >= 13 else [a + 1 for a in range(axis, rank)]
    fy, g = b.fwd(y), grads[0]
    inner = b.ctx.reduce("ReduceSum", b.ctx.node("Mul", [g, fy]), axes, keepdims=1)
    return [b.ctx.node("Mul", [fy, b.ctx.node("Sub", [g, inner])])]


@rule("LayerNormalization")
def _layer_norm(b, node, grads):
    """dx = rstd (gs - mean(gs) - xhat mean(gs xhat)), gs = g * scale, over the normalised axes."""
    x, scale = node.input[0], node.input[1]
    if any(b.needs(node, i) for i in range(1, len(node.input))):
        _unsupported(node, "scale or bias that depend on the feature layer")
    rank = b.rank(x)
    axis = attr(node, "axis", -1) % rank
    eps = attr(node, "epsilon", 1e-5)
    axes = list(range(axis, rank))
    fx = b.fwd(x)
    mean = b.ctx.reduce("ReduceMean", fx, axes, 1)
    centred = b.ctx.node("Sub", [fx, mean])
    var = b.ctx.reduce("ReduceMean", b.ctx.node("Mul", [centred, centred]), axes, 1)
    rstd = b.ctx.node("Reciprocal", [b.ctx.node("Sqrt", [b.ctx.node("Add", [var, b.ctx.scalar(eps, x)])])])
    xhat = b.ctx.node("Mul", [centred, rstd])
    gs = b.ctx.node("Mul", [grads[0], b.fwd(scale)])
    kaxes = [a + 1 for a in axes]
    m1 = b.ctx.reduce("ReduceMean", gs, kaxes, 1)
    m2 = b.ctx.reduce("ReduceMean", b.ctx.node("Mul", [gs, xhat]), kaxes, 1)
    inner = b.ctx.node("Sub", [b.ctx.node("Sub", [gs, m1]), b.ctx.node("Mul", [xhat, m2])])
    return [b.ctx.node("Mul", [rstd, inner])] + [None] * (len(node.input) - 1)
