"""Words for a layer, for figure titles: what it is, where it sits and what shape it has
("first conv layer (Conv), 112x112x32, 2% deep"), since graph names like ``/Clip_1`` say none of it."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier

#: op types grouped into the families a reader knows; others are named by their op type
FAMILIES = {
    **dict.fromkeys(("Conv", "ConvTranspose", "ConvInteger", "QLinearConv"), "conv"),
    **dict.fromkeys(("Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Sigmoid", "HardSigmoid", "HardSwish",
                     "Gelu", "Tanh", "Softplus", "Mish"), "activation"),
    **dict.fromkeys(("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"), "pooling"),
    **dict.fromkeys(("BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
                     "LRN"), "normalisation"),
    **dict.fromkeys(("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"), "dense"),
    "Add": "sum", "Concat": "concat", "Softmax": "softmax",
}
UNICODE_TIMES = "\u00d7"


def describe_layer(net: Classifier, name: str) -> str:
    """'first conv layer (Conv), 112×112×32, 2% deep'; 'sum layer 9 of 16 (Add), 14×14×112, 61% deep'.
    Shapes read height × width × channels as in MATLAB; token layers say so."""
    layer = net.layer(name)
    layers = net.layers()
    family = FAMILIES.get(layer.op_type, layer.op_type)
    same = [l.output for l in layers if FAMILIES.get(l.op_type, l.op_type) == family]
    where = same.index(layer.output) if layer.output in same else None
    if where is None or len(same) == 1:
        position = f"{family} layer"
    elif where == 0:
        position = f"first {family} layer"
    elif where == len(same) - 1:
        position = f"last {family} layer"
    else:
        position = f"{family} layer {where + 1} of {len(same)}"
    outputs = [l.output for l in layers]
    depth = f", {round(100 * (outputs.index(layer.output) + 1) / len(outputs))}% deep" if layer.output in outputs else ""
    return f"{position} ({layer.op_type}){_shape(net, layer)}{depth}"


def _shape(net: Classifier, layer) -> str:
    x = UNICODE_TIMES
    try:
        layout = net.layout(layer)
    except Exception:  # a title never fails a figure
        layout = None
    if layout is not None:
        h, w = layout.grid
        if layout.kind == "tokens":
            return f", {h * w + layout.prefix} tokens of {layout.channels} ({h}{x}{w} grid)"
        return f", {h}{x}{w}{x}{layout.channels}"
    if layer.shape:
        return ", " + x.join("?" if d is None else str(d) for d in layer.shape)
    return ""
