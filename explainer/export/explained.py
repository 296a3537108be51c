"""Reading an exported model back: the fast path of the service and the dataset job (issue 27, 6b).

A file written by ``export_explained`` (recognised by its ``metadata_props``: method, layer, version,
and its ``saliency`` / ``saliency_class`` outputs) answers in one onnxruntime call the classifier's own
outputs and the maps of its method at its feature layer. ``ExplainedModel`` runs it for the library's
ways in: ``covers(net, method, options)`` says whether a request's method and options are the ones the
file computes (the same method, the same feature layer, the method's defaults otherwise);
``run(net, image, labels)`` gives the probabilities, the labels' indices and their maps at the image's
size, normalised and upsampled (bicubic, cut at 0) as the library's own maps are. The file must be
exported from the very model it serves (``open`` compares the graphs) and at the feature grid
(``map_size="feature"``: the maps are then upsampled to each image's size, not to the input's).

``load_explained(source, **load_options)`` loads a model that may itself be an exported file: the
classifier is then built from the source graph inside it (the branch removed), and the file is its
fast path (``explainer serve FILE`` and ``explain_dataset(..., FILE)`` use it automatically).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..errors import DegenerateMapError, InvalidParameterError, NonFiniteOutputError
from ..runtime.feature_layers import default_feature_layer
from ..threads import keep_in_forks
from .writer import SALIENCY, SALIENCY_CLASS, TARGET

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier

METHOD_KEY, LAYER_KEY, VERSION_KEY = "onnx_explainer.export.method", "onnx_explainer.export.layer", "onnx_explainer.version"
TOP_K_KEY, MAP_SIZE_KEY = "onnx_explainer.export.top_k", "onnx_explainer.export.map_size"
#: the methods whose exported maps equal the library's at its defaults (tests/test_explained_fast_path.py)
FAST_METHODS = ("gradcam", "gradcam_plus_plus", "recipro_cam")
#: options that change nothing in a method's map
_NEUTRAL = {"batch_size", "verbose"}
HOW = "explainer export MODEL --method {method} --out FILE"


def export_metadata(model: onnx.ModelProto) -> dict | None:
    """The export's metadata of ``model`` ({key: value}), or None where it is not a file written by
    ``export_explained`` (no method, layer or version recorded, or no saliency outputs)."""
    meta = {p.key: p.value for p in model.metadata_props}
    outputs = {o.name for o in model.graph.output}
    if not all(k in meta for k in (METHOD_KEY, LAYER_KEY, VERSION_KEY)) or not {SALIENCY, SALIENCY_CLASS} <= outputs:
        return None
    return meta


def source_of(model: onnx.ModelProto) -> onnx.ModelProto:
    """The source model inside an exported one: its own inputs and outputs, the nodes they need, the
    export's metadata removed (preprocessing and labels kept: the library reads them)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    kept_outputs = [o for o in graph.output if o.name not in (SALIENCY, SALIENCY_CLASS)]
    del graph.output[:]
    graph.output.extend(kept_outputs)
    kept_inputs = [i for i in graph.input if i.name != TARGET]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    _prune(graph)
    props = [p for p in out.metadata_props if not p.key.startswith("onnx_explainer.export.")]
    del out.metadata_props[:]
    out.metadata_props.extend(props)
    return out


def _prune(graph: onnx.GraphProto) -> None:
    """Nodes, initializers and value_info that the graph's outputs do not need, removed (in place)."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    inputs = {i.name for i in graph.input}
    for field, keep in ((graph.node, kept), (graph.initializer, [t for t in graph.initializer
                                                                 if t.name in needed or t.name in inputs]),
                        (graph.value_info, [v for v in graph.value_info if v.name in needed])):
        if len(keep) != len(field):
            keep = [_copy(x) for x in keep]  # copies: the field's own elements go with ``del``
            del field[:]
            field.extend(keep)


def _copy(proto):
    out = type(proto)()
    out.CopyFrom(proto)
    return out


def fingerprint(model: onnx.ModelProto) -> str:
    """What makes two graphs compute the same: their nodes, weights (by value), inputs and outputs,
    after the nodes no output needs are removed (a model's serialised bytes differ with the writer)."""
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    _prune(graph)
    digest = hashlib.sha256()
    for node in graph.node:
        digest.update(node.SerializeToString(deterministic=True))
    for t in sorted(graph.initializer, key=lambda t: t.name):
        array = onnx.numpy_helper.to_array(t)
        digest.update(f"{t.name}|{array.dtype}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    for i in graph.input:
        digest.update(f"in|{i.name}|{i.type.tensor_type.elem_type}".encode())
    for o in graph.output:
        digest.update(f"out|{o.name}".encode())
    return digest.hexdigest()


@dataclass
class FastRun:
    """One request's answer from the exported model: the image's probabilities (K classes), the
    explained labels' indices, and their maps at the feature grid (len(indices), h, w), or None where
    the file does not hold a map of every label (a top-K file asked for a class outside its top K);
    ``maps()`` gives them at the image's size (``size``), as the library's."""
    probabilities: np.ndarray
    indices: list[int]
    low: np.ndarray | None
    size: tuple
    seconds: float
    owner: "ExplainedModel"

    @property
    def has_maps(self) -> bool:
        return self.low is not None

    def maps(self) -> np.ndarray:
        """(len(indices), H, W) float32: upsampled as the library's maps (bicubic, cut at 0); a Grad-CAM
        map that is zero everywhere raises the library's ``DegenerateMapError``."""
        return self.owner._sized(self.low, self.size, self.indices)


class ExplainedModel:
    """An exported model as the fast path of ``net`` (see the module's docstring)."""

    def __init__(self, model: onnx.ModelProto, meta: dict, name: str, image_input: str, providers=None):
        import onnxruntime as ort

        self.name = name
        self.method, self.layer = meta[METHOD_KEY], meta[LAYER_KEY]
        self.version = meta[VERSION_KEY]
        self.top_k = int(meta.get(TOP_K_KEY, "1"))
        self.map_size = meta.get(MAP_SIZE_KEY, "feature")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        #: the file's bytes (what a Ray actor opens it from)
        self.data = model.SerializeToString()
        #: the exported model's session (its runs are the fast path's only work)
        self.session = keep_in_forks(ort.InferenceSession(self.data, options,
                                                   providers=list(providers or ["CPUExecutionProvider"])))
        self.input = image_input
        self.outputs = [o.name for o in model.graph.output]
        dim = next(i for i in model.graph.input if i.name == image_input).type.tensor_type.shape.dim
        self.batched = not (len(dim) and dim[0].HasField("dim_value"))

    # opening ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, source, net: Classifier, where: str = "model_explained", name: str | None = None) -> "ExplainedModel":
        """The exported file ``source`` (a path, or a loaded ``onnx.ModelProto``) checked against ``net``:
        an exported model (``InvalidParameterError`` otherwise, naming ``explainer export``), of a method
        the fast path serves, at the feature grid, exported from ``net``'s own graph."""
        from ..model.load import load_model

        if isinstance(source, onnx.ModelProto):
            model, name = source, name or source.graph.name or "model"
        elif isinstance(source, (bytes, bytearray, memoryview)):
            model, name = load_model(source).proto, name or "model"
        else:
            model, name = load_model(source).proto, name or Path(source).name
        meta = export_metadata(model)
        fix = HOW.format(method="gradcam")
        if meta is None:
            raise InvalidParameterError(
                f"{where}: {name!r} is not a model written by explainer export (its metadata_props have no "
                f"{METHOD_KEY}, {LAYER_KEY} and {VERSION_KEY}, or it has no saliency outputs); write one from "
                f"this model with `{fix}` (explainer.export_explained), or leave {where} out.")
        fix = HOW.format(method=meta[METHOD_KEY])
        if meta[METHOD_KEY] not in FAST_METHODS:
            raise InvalidParameterError(
                f"{where}: {name!r} computes {meta[METHOD_KEY]!r}, which the fast path does not serve; export one of "
                f"{', '.join(FAST_METHODS)} (`{HOW.format(method='gradcam')}`).")
        if meta.get(MAP_SIZE_KEY, "feature") != "feature":
            raise InvalidParameterError(
                f"{where}: {name!r} holds maps resized to the model's input (--map-size "
                f"{meta.get(MAP_SIZE_KEY)}); the fast path upsamples the feature grid's maps to each image's "
                f"size as the library does: export with `{fix} --map-size feature`.")
        if fingerprint(source_of(model)) != fingerprint(net.source_model):
            raise InvalidParameterError(
                f"{where}: {name!r} was exported from another model than {net.name!r} (their graphs or weights "
                f"differ); export it from this model: `{fix.replace('MODEL', net.name)}`.")
        try:
            net.layer(meta[LAYER_KEY])
        except Exception:  # noqa: BLE001 - the same graph: only a renamed layer gets here
            raise InvalidParameterError(f"{where}: {name!r} explains layer {meta[LAYER_KEY]!r}, which {net.name!r} "
                                        f"does not have; export it again from this model: `{fix}`.") from None
        return cls(model, meta, name, net.input.name, getattr(net.ort, "providers", None))

    # what it serves -----------------------------------------------------------------------------------
    def covers(self, net: Classifier, method: str, checked: dict) -> bool:
        """Whether the library's ``method`` with ``checked`` options (as its registry entry's ``validate``
        gives them) computes the maps this file holds: the same method at the same feature layer (where
        none is given, ``default_feature_layer``'s), every other option at what the file was exported
        with."""
        if method != self.method:
            return False
        layer = checked.get("feature_layer")
        if layer is None:  # the method's default layer (found once per net)
            layer = default_feature_layer(net)[0]
        if net.layer(layer).name != net.layer(self.layer).name:
            return False
        for option, value in checked.items():
            if option in _NEUTRAL or option == "feature_layer":
                continue
            if option == "reduction_layer":
                if value is not None and net.layer(value).name != net.layer(net.gradient_scores).name:
                    return False
            elif option == "kernel":  # the export's masks: point on feature maps, gaussian on tokens
                kind = "gaussian" if net.layout(self.layer).kind == "tokens" else "point"
                if value not in ("auto", kind):
                    return False
            elif option == "scores":
                if value != "probabilities":
                    return False
            else:  # an option the fast path does not know: the library's own path
                return False
        return True

    # running --------------------------------------------------------------------------------------
    def run(self, net: Classifier, image, labels) -> FastRun:
        """One image's probabilities, its labels (a ``LabelSpec``) and their maps at its size, from one
        run of the exported model (two for a ``target`` file asked for its top classes: the labels
        come from ``net.predict`` first)."""
        from ..io import to_pixel_batch

        pixels, is_batch = to_pixel_batch(image)
        if is_batch:
            raise InvalidParameterError("model_explained: the fast path explains one image at a time; got a batch.")
        p = pixels[0]
        x = net.to_model_input(net.fit_pixels(p)[None])
        start = time.perf_counter()
        if self.top_k > 0:
            scores, saliency, classes = self._run(net, {self.input: x})
            probabilities = net.scores_from_outputs([scores])[0]
            indices = labels.indices(net.class_index, probabilities)
            order = [int(c) for c in classes[0]]
            rows = [order.index(i) for i in indices] if all(i in order for i in indices) else None
            maps = saliency[0][rows] if rows is not None else None
        else:
            probabilities = None
            if labels.top is not None:  # the top classes are known once the image is classified
                probabilities = net.predict(image)
            indices = labels.indices(net.class_index, probabilities)
            target = np.asarray(indices, np.int64)
            if self.batched:
                scores, saliency, _ = self._run(net, {self.input: np.repeat(x, len(indices), axis=0), TARGET: target})
            else:  # a graph that keeps its exported batch of 1: one run per label
                parts = [self._run(net, {self.input: x, TARGET: target[k:k + 1]}) for k in range(len(indices))]
                scores, saliency = parts[0][0], np.concatenate([s for _, s, _ in parts])
            if probabilities is None:
                probabilities = net.scores_from_outputs([scores[:1]])[0]
            maps = saliency[:, 0]
        return FastRun(probabilities, [int(i) for i in indices], maps, tuple(p.shape[:2]),
                       time.perf_counter() - start, self)

    def _run(self, net: Classifier, feeds: dict):
        names = [net.output.name if net.output.name in self.outputs else self.outputs[0], SALIENCY, SALIENCY_CLASS]
        return self.session.run(names, feeds)

    def _sized(self, maps: np.ndarray, size, indices) -> np.ndarray:
        """(K, h, w) maps → (K, H, W) at the image's size as the library sizes them: bicubic, cut at 0."""
        from .resize import upsample

        if not np.all(np.isfinite(maps)):
            raise NonFiniteOutputError(f"{self.method}: the map contains NaN or infinite values; the model's "
                                       "scores or gradients are not finite for this image.")
        if self.method in ("gradcam", "gradcam_plus_plus"):
            for index, m in zip(indices, maps):
                if float(m.max()) <= 0.0:  # the library's refusal of a map with no signal
                    raise DegenerateMapError(
                        f"{self.method}: the map of class {index} at layer {self.layer!r} carries no signal: it is "
                        "zero everywhere: at every location the weighted channels lower the class score (the ReLU "
                        "keeps none). Pick another feature_layer (gradcam_layers(net) gives the default and why), "
                        "or another method (gradient, occlusion).")
        return np.maximum(upsample(maps, tuple(size)), 0.0).astype(np.float32)

    def describe(self) -> dict:
        return {"file": self.name, "method": self.method, "layer": self.layer, "top_k": self.top_k,
                "version": self.version}


def load_explained(source, *, where: str = "load", **load_options):
    """(classifier, ExplainedModel or None): ``explainer.load(source, **load_options)``, except that an
    exported model is loaded as the source graph inside it, with the file as its fast path."""
    from ..runtime import load
    from ..runtime.classifier import Classifier
    from ..zoo import load_source

    if source is None or (isinstance(source, str) and not Path(source).exists()):
        return load(source, **load_options), None  # a registry name: never an exported file
    allow = load_options.pop("allow_external_data", True)
    loaded = load_source(source, allow_external_data=allow)
    meta = export_metadata(loaded.proto)
    if meta is None:
        return Classifier(loaded, **load_options), None
    from ..model.load import LoadedModel

    plain = source_of(loaded.proto)
    digest = hashlib.sha256(plain.SerializeToString()).hexdigest()
    net = Classifier(LoadedModel(plain, loaded.name, digest), **load_options)
    name = Path(source).name if isinstance(source, (str, Path)) else loaded.name
    return net, ExplainedModel.open(loaded.proto, net, where, name)


def split(net: Classifier, where: str = "model_explained"):
    """(classifier, ExplainedModel or None) for a classifier that may have been loaded from an exported
    file: the classifier of the source graph inside it, with the file as its fast path."""
    if export_metadata(net.source_model) is None:
        return net, None
    from ..model.load import LoadedModel

    plain = source_of(net.source_model)
    digest = hashlib.sha256(plain.SerializeToString()).hexdigest()
    inner = net.variant(LoadedModel(plain, net.name, digest))
    return inner, ExplainedModel.open(net.source_model, inner, where, net.name)


def as_explained(value, net: Classifier, where: str = "model_explained"):
    """None, an ``ExplainedModel``, or a path to open against ``net``."""
    if value is None or isinstance(value, ExplainedModel):
        return value
    return ExplainedModel.open(value, net, where)


__all__ = ["ExplainedModel", "FastRun", "FAST_METHODS", "export_metadata", "source_of", "fingerprint",
           "load_explained", "split", "as_explained"]
