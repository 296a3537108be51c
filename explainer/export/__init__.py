"""Explanations that ship with the model: ``export_explained`` writes an ONNX file that returns the
classifier's own outputs (bit-identical: the explanation is a side branch) and, in the same
onnxruntime call, a saliency map per image and class.

The table of exportable methods
-------------------------------
``EXPORTERS`` maps a method name to the function that builds its map into the graph. A builder is
registered once, with a decorator (a second registration of the same name raises ``ValueError``)::

    from explainer.export import ExportContext, exporter

    @exporter("recipro_cam")
    def build(ctx: ExportContext) -> str:
        ...                                # add nodes with ctx.node(...), constants with ctx.const(...)
        return name                        # the (N, K, h, w) float32 map tensor, at the feature grid

What a builder gets (``ExportContext``; every name is a tensor of ``ctx.graph``):

- ``ctx.graph``: the ``onnx.GraphProto`` being built (the source graph, untouched, plus what builders add);
  ``ctx.opset``: its default-domain opset (a builder needing more calls ``ctx.require_opset(v, why)``).
- ``ctx.feature``: the feature layer's tensor, as the graph computes it: (N, C, h, w), (N, h, w, C)
  or tokens (N, prefix + h*w, C) -- ``ctx.layout`` (``explainer.model.layouts.FeatureLayout``) says which;
  ``ctx.feature_chw()`` gives it as (N, C, h, w) in the graph, ``ctx.to_chw(t, lead=1)`` lays out any
  tensor of the feature's layout with ``lead`` extra leading axes the same way. Read the feature as
  ``ctx.feature_branch`` (the same values, kept apart from the source's tensor, or computed again where
  its producer is a Conv/MatMul/Gemm that onnxruntime fuses with the next op: a second reader of the
  source's tensor would stop that fusion and change the source's outputs' last bits).
- ``ctx.scores``: the (N, classes) class scores before any trailing Softmax (what Grad-CAM
  differentiates); ``ctx.num_classes``.
- ``ctx.classes``: int64 (N, K), the classes to explain (the top K by score, or the ``target`` input);
  ``ctx.top_k``: K (1 for ``target``).
- ``ctx.head``: the head, ``export.head.Head``: the nodes from the feature tensor to the scores, and
  ``ctx.head.copy(ctx, new_feature)`` -> the scores tensor computed by a copy of those nodes from
  another tensor of the feature's shape (Recipro-CAM's masked features; other inputs of the head are
  read from the graph as they are, so ``new_feature`` must keep the batch axis of the original).
- ``ctx.name(hint)`` a fresh tensor name; ``ctx.node(op, inputs, n_outputs=1, **attributes)`` adds a
  node and returns its output name (a list for ``n_outputs > 1``); ``ctx.const(array, hint)`` adds an
  initializer and returns its name. ``ctx.reduce(op, x, axes, keepdims)`` and ``ctx.unsqueeze`` /
  ``ctx.squeeze`` write the opset's spelling (axes as attributes or inputs).

The writer then resizes the map to the input size (``map_size="input"``: PIL's bicubic filter, which
the library's maps are resized with, as two constant matrices, ``resize.py``) and clamps it at 0, as
``explainer.gradcam`` does after its bicubic resize.

The other modules: ``rules.py`` (one reverse-mode gradient rule per ONNX op, ``RULES``), ``head.py``
(the head's nodes, their renamed copy, the backward pass; ``gradient_model`` for checking rules; on
token layers ``select_early`` / ``early_head``, the head that picks the class token as early as the ops
allow, which the gradient runs through and the library's Recipro-CAM reruns),
``cams.py`` (Grad-CAM and Grad-CAM++), ``recipro_cam.py`` (Recipro-CAM and ViT-ReciproCAM),
``writer.py`` (``export_explained``, ``build_explained``), ``engine.py`` (the library's in-graph path:
``cam_maps``, and ``Decision``: which path runs, and why), ``explained.py`` (an exported file read
back: recognised by its metadata, matched to the classifier it came from, the service's and the dataset
job's fast path).
"""
from __future__ import annotations

from typing import Callable

from .context import ExportContext

#: method name -> builder(ctx) -> name of the (N, K, h, w) map tensor
EXPORTERS: dict[str, Callable[[ExportContext], str]] = {}


def exporter(name: str):
    """Register ``fn`` as the in-graph builder of method ``name`` (once)."""
    def register(fn):
        from ..registries import duplicate, place

        _register_builtin()  # a name taken by a built-in exporter is refused whatever the import order
        if name in EXPORTERS:
            raise duplicate(f"an exporter for method {name!r}", place(EXPORTERS[name]), place(fn))
        EXPORTERS[name] = fn
        return fn
    return register


def exportable_methods() -> list[str]:
    """The names of the methods ``export_explained`` can write into a graph."""
    _register_builtin()
    return sorted(EXPORTERS)


_BUILTIN_LOADED = False


def _register_builtin() -> None:
    """Import this package's modules (explainer/registries.py's rule): each registers its builders."""
    global _BUILTIN_LOADED
    from pathlib import Path

    from ..registries import import_modules, modules

    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    import_modules(__name__, modules(Path(__file__).parent))


def export_explained(net, out, method="gradcam", feature_layer=None, top_k=1, map_size="feature", **kwargs):
    """See ``explainer.export.writer.export_explained``."""
    from .writer import export_explained as write

    return write(net, out, method=method, feature_layer=feature_layer, top_k=top_k, map_size=map_size, **kwargs)


__all__ = ["EXPORTERS", "ExportContext", "exporter", "exportable_methods", "export_explained"]
