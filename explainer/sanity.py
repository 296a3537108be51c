"""Sanity checks of explanation methods (Adebayo et al., 2018): does a method's map depend on what the
model learned? Above the methods (it explains with any registered method by name)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .validation import check_int

if TYPE_CHECKING:
    from .runtime.classifier import Classifier


def model_randomisation(net: Classifier, image, label, *, method="gradient", top_layers=3, random_state=0, **kwargs) -> dict:
    """Adebayo et al.'s cascading randomisation: re-initialise the last 1..``top_layers`` weighted
    layers (Conv/Gemm/MatMul, from the output backwards) and recompute the map of ``method`` (a name
    of the method registry; ``kwargs`` are its options). Returns, per number
    of randomised layers, the Spearman rank correlation with the original map: a faithful method's
    maps change (low correlation)."""
    import onnx
    from onnx import numpy_helper
    from scipy.stats import spearmanr

    from .methods.registry import get_method
    from .model.load import LoadedModel

    top_layers = check_int("model_randomisation", "top_layers", top_layers, minimum=1, maximum=1000)
    chosen = get_method(method, "model_randomisation")
    if "verbose" in chosen.options:
        kwargs.setdefault("verbose", False)
    chosen.validate(net, kwargs, "model_randomisation")

    def explain(n):
        return chosen(n, image, label, **kwargs)

    original = explain(net)
    weighted = [node for node in net.source_model.graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
    rng = np.random.default_rng(random_state)
    model = onnx.ModelProto()
    model.CopyFrom(net.source_model)
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for depth, node in enumerate(reversed(weighted[-top_layers:]), start=1):
        for name in node.input[1:]:
            if name in inits:
                t = inits[name]
                value = numpy_helper.to_array(t)
                fresh = rng.standard_normal(value.shape).astype(value.dtype) * (value.std() or 1.0)
                t.CopyFrom(numpy_helper.from_array(fresh, t.name))
        randomised = net.variant(LoadedModel(model, f"{net.name}-randomised-{depth}",
                                             f"{net.sha256}-rand{depth}-{random_state}"))
        changed = explain(randomised)
        out[depth] = float(spearmanr(np.ravel(original), np.ravel(changed))[0])
    return out
