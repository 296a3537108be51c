"""``Classifier``: an ONNX image classifier with its input contract, preprocessing, class names and the
engine that runs it (onnxruntime, or OpenVINO with ``engine="openvino"``); the object every explanation
method takes as ``net``. ``load`` makes one."""
from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import onnx

from ..convert import BATCH_PASSES, normalise
from ..errors import (BatchFallbackWarning, InvalidParameterError, InvalidParameterTypeError, LayerNotFeatureMapError,
                      NonFiniteOutputError, OptimisationFallbackWarning, ResourceLimitError, UnknownClassError, UnknownLayerError,
                      UnsupportedModelError)
from ..graph import dims, infer_shapes, layer_name
from ..io import to_pixel_batch
from ..model import labels as labels_mod
from ..model import preprocess as preprocess_mod
from ..model.labels import top_indices
from ..model.layouts import FeatureLayout, feature_layout
from ..model.load import LoadedModel
from ..model.spec import InputSpec, OutputSpec, find_image_input, find_input_normalisation, find_scores_output
from ..model.structure import Structure
from ..model.structure import analyse as analyse_structure
from ..registries import release_classifier_caches
from ..validation import check_batch_size, check_int, closest
from .budget import RunGuard, infer_at
from .ort_engine import OrtEngine
from .providers import resolve_device

_log = logging.getLogger("explainer")


def _expose_logits(model, output: OutputSpec) -> None:
    """The logits before a trailing Softmax become a graph output too, so that one onnxruntime session
    serves probabilities and logits (a second session would hold every weight once more)."""
    names = [o.name for o in model.graph.output]
    if output.softmax_input and output.softmax_input not in names:
        elem = model.graph.output[0].type.tensor_type.elem_type or onnx.TensorProto.FLOAT  # as the softmax's
        model.graph.output.append(onnx.helper.make_tensor_value_info(output.softmax_input, elem, None))


def not_a_feature_map(where: str, layer: "Layer", attention: bool = False) -> str:
    what = "attention (scores or probabilities over tokens)" if attention else "not a feature map"
    return (f"{where}: layer {layer.name!r} ({layer.op_type}) has activations of shape {layer.shape} per "
            f"image, which are {what}: feature maps are (C, H, W), tokens (T, C) on the "
            "image's grid (after class tokens) or a channels-last (H, W, C) grid. Attention "
            "probabilities and q/k/v split into heads have no place in the image; net.layers() lists "
            "the layers.")


def softmax(scores: np.ndarray) -> np.ndarray:
    """(N, K) scores → float32 probabilities, computed in float64 (max subtracted first), on one working
    array (no temporaries of the scores' size: Recipro-CAM's copies are (h*w, 1000) a call)."""
    z = scores.astype(np.float64)
    z -= scores.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32)


#: ops of quantized graphs, whose optimised (fused integer) kernels round otherwise than the nodes one by one
_QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                            "QLinearMatMul", "MatMulInteger", "ConvInteger"})


class _NotBatchable(Exception):
    """The graph does not run a batch of images as it runs each of them alone."""


class Prediction(NamedTuple):
    label: str
    index: int
    score: float


@dataclass(frozen=True)
class Layer:
    name: str
    op_type: str
    output: str  # the tensor holding the layer's activations
    shape: tuple | None  # per image, without the batch dim; None entries are unknown


@dataclass
class RuntimeCaches:
    """What running a Classifier leaves on it, declared here and written only by ``explainer.runtime``:
    the converted torch module per torch device (``torch_engine``), and incremental occlusion's split of
    the graph, its decisions per image size and mask, its measured batch sizes per mask geometry and
    split, and the latest decision (``incremental``), and the default feature layer of the CAMs with its
    reason (``feature_layers``)."""
    torch_engines: dict = field(default_factory=dict)
    incremental_split: object | None = None
    incremental_decisions: dict = field(default_factory=dict)
    incremental_batches: dict = field(default_factory=dict)
    incremental_last: object | None = None
    default_feature_layer: tuple | None = None


class Classifier:
    def __init__(self, loaded: LoadedModel, *, preprocessing=None, labels=None, input_layout=None,
                 device="auto", batch_size="auto", torch_device="auto", engine="onnxruntime", precision="f32"):
        from .openvino_engine import check_choice
        from .torch_engine import TORCH_DEVICES

        check_choice(engine, precision)

        if torch_device not in TORCH_DEVICES:
            raise InvalidParameterError(f"load: torch_device must be one of {TORCH_DEVICES}; got {torch_device!r}.")
        self.torch_device = torch_device
        #: caches of the runtime floor (converted module, incremental occlusion's split and decisions)
        self.runtime = RuntimeCaches()
        self.name = loaded.name
        self.sha256 = loaded.sha256
        self.source_model = loaded.proto
        self._batch_size = self._stream_batch_size = check_batch_size("load", batch_size)
        metadata = {p.key: p.value for p in loaded.proto.metadata_props}
        entry = loaded.registry_entry
        if preprocessing is None and entry is not None and entry.preprocessing is not None:
            preprocessing = entry.preprocessing
        self.input: InputSpec = find_image_input(loaded.proto, input_layout)
        self.preprocessing = preprocess_mod.resolve(preprocessing, metadata, self._default_preprocessing,
                                                    given_by="registry" if entry is not None and
                                                    preprocessing is entry.preprocessing else "argument")
        self.device, providers = resolve_device(device)
        #: the runtime of forward passes ("onnxruntime" or "openvino"; "auto" is resolved after the probe)
        #: and its precision ("f32", or OpenVINO's "bf16" / "f16")
        self.engine, self.precision = engine, precision
        if engine == "openvino" and device == "cuda":
            raise InvalidParameterError("load: engine='openvino' runs on the CPU; device='cuda' needs "
                                        "engine='onnxruntime'.")
        if engine == "openvino":
            self.device = "cpu"
        # the graph as given, checked before its constants are folded (folding a Range or a
        # ConstantOfShape computes it) and before onnxruntime sees it
        RunGuard(loaded.proto, self.input.name, self.input.dtype, self.name).estimate_for(
            self.per_image_shape, measure=False)
        self.model, self.normalisation_log = normalise(loaded.proto, "runtime", self.input.name)
        output = find_scores_output(self.model)
        _expose_logits(self.model, output)
        self.ort = self._engine(providers, self.sha256[:16])
        #: None, or 1 for a graph that only runs one image at a time (see ``_probe``)
        self.max_batch: int | None = None
        try:
            self.output: OutputSpec = self._probe(output, batch=2)
        except _NotBatchable as why:
            self.model, self.normalisation_log = normalise(loaded.proto, "runtime", self.input.name,
                                                           skip=BATCH_PASSES)
            _expose_logits(self.model, output)
            self.ort = self._engine(providers, self.sha256[:16] + "|batch1")
            self.output = self._probe(output, batch=1)
            self.max_batch = self._batch_size = self._stream_batch_size = 1
            warnings.warn(f"model {self.name!r} runs one image at a time (explanations are the same, "
                          f"only slower): {why}", BatchFallbackWarning, stacklevel=3)
        self._settle_optimisation()
        if self.engine == "auto":  # measured once per model and machine, then remembered
            from .openvino_engine import faster_engine

            self.engine = faster_engine(self)
            if self.engine == "openvino":
                self.device, self.ort = "cpu", self._engine(providers, self.ort.model_key)
        self.class_names: list[str] = labels_mod.resolve(labels, metadata, self.output.num_classes)
        self._layers: list[Layer] | None = None
        self._structure: Structure | None = None  # read from the graph on first use

    def variant(self, loaded: LoadedModel) -> "Classifier":
        """Another graph (e.g. with re-initialised weights) loaded with this one's settings: preprocessing,
        labels, input layout, devices and batch size."""
        return Classifier(loaded, preprocessing=self.preprocessing, labels=self.class_names,
                          input_layout=self.input.layout, device=self.device, batch_size=self._batch_size,
                          torch_device=self.torch_device, engine=self.engine, precision=self.precision)

    @property
    def per_image_shape(self) -> tuple:
        """The graph's input shape for one image, without the batch dim: (C, H, W) or (H, W, C)."""
        i = self.input
        return (i.channels, i.height, i.width) if i.layout == "NCHW" else (i.height, i.width, i.channels)

    def _engine(self, providers, key: str) -> OrtEngine:
        """The engine of ``self.model`` (onnxruntime, or OpenVINO for ``engine='openvino'``), its guard
        checked before any session exists: zero extents at the input's size and the memory of one
        image's run (``budget.RunGuard``)."""
        if self.engine == "openvino":
            from .openvino_engine import OpenVinoEngine

            engine = OpenVinoEngine(self.model, self.input.name, key, self.precision)
        else:
            engine = OrtEngine(self.model, self.input.name, providers, key)
        engine.guard = RunGuard(self.model, self.input.name, self.input.dtype, self.name)
        engine.guard.estimate_for(self.per_image_shape)
        return engine

    def _default_preprocessing(self) -> tuple[str, str]:
        """(preset, why) when neither an argument nor the metadata says: "none" (or "unit", 0..1, where
        its constants are those of 0..1 images) for a graph that normalises its own input, "none" for
        uint8 pixels, else a guess of "imagenet", logged at each load."""
        found = find_input_normalisation(self.source_model, self.input.name)
        if found is not None:
            why = "the graph normalises its input itself: " + ", ".join(found.steps)
            if found.pixel_range == 1.0:
                _log.info("model %r: %s; pixels are fed scaled to 0..1 (preprocessing='unit')", self.name, why)
                return "unit", why
            _log.info("model %r: %s; pixels 0..255 are fed as they are (preprocessing='none')", self.name, why)
            return "none", why
        if self.input.dtype == np.uint8:
            return "none", "the graph takes uint8 pixels"
        hint = preprocess_mod.producer_hint(self.source_model.producer_name, self.source_model.producer_version)
        why = ("guessed: no preprocessing in the metadata, float input, no normalisation in the graph; "
               f"{hint}; pass preprocessing= if the model was trained otherwise")
        _log.warning("model %r: preprocessing 'imagenet' %s", self.name, why)
        return "imagenet", why

    # contract -------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.output.num_classes

    @property
    def input_size(self) -> tuple[int, int]:
        return self.input.size

    @property
    def score_outputs(self) -> list[str]:
        return [self.output.name] + ([self.output.softmax_input] if self.output.softmax_input else [])

    def _probe(self, output: OutputSpec, batch: int) -> OutputSpec:
        """Forward passes on two random images: the class count and whether rows are probabilities.
        With ``batch=2`` the two images also run as one batch, which must give what the two single runs
        give (raises ``_NotBatchable`` otherwise: the graph keeps its exported batch somewhere)."""
        rng = np.random.default_rng(0)
        pixels = rng.uniform(0, 255, (2, *self.input.size, self.input.channels)).astype(np.float32)
        x = self.to_model_input(pixels)
        try:
            raw = np.concatenate([self.ort.run(x[i:i + 1], [output.name])[0] for i in range(2)])
        except ResourceLimitError:
            raise
        except Exception as exc:
            message = getattr(exc, "onnxruntime_message", None) or (str(exc).splitlines() or [""])[0]
            if batch > 1:  # the freed graph itself fails: the graph as exported decides
                raise _NotBatchable(f"the graph freed for any batch fails ({message[:200]})") from None
            raise UnsupportedModelError(
                f"onnxruntime cannot run the model on one {self.input.layout} image of "
                f"{self.input.height}x{self.input.width}: {message}") from None
        if batch > 1 and self.ort.guard.max_batch(self.per_image_shape) < 2:
            batch = 1  # two images at once are over the run budget: batches will hold one image
        if batch > 1:
            try:
                together = self.ort.run(x, [output.name])[0]
            except ResourceLimitError:
                raise
            except Exception as exc:
                message = getattr(exc, "onnxruntime_message", None) or (str(exc).splitlines() or [""])[0]
                raise _NotBatchable(f"a batch of 2 fails in onnxruntime ({message[:200]})") from None
            if together.shape != raw.shape:
                raise _NotBatchable(f"a batch of 2 gives scores of shape {together.shape}, two single "
                                    f"images {raw.shape}")
            finite = np.isfinite(raw)  # non-finite scores are the predictions' error, not the batch's
            if not np.array_equal(finite, np.isfinite(together)):
                raise _NotBatchable("a batch of 2 gives non-finite scores where single images do not")
            scale = max(float(np.abs(raw[finite]).max(initial=0.0)), 1e-12)
            error = float(np.abs(together.astype(np.float64)[finite] - raw[finite]).max(initial=0.0)) / scale
            if not error <= (1e-2 if raw.dtype == np.float16 else 1e-3):
                dynamic = any(n.op_type == "DynamicQuantizeLinear" for n in self.model.graph.node)
                raise _NotBatchable(f"a batch of 2 gives other scores than the same images one at a "
                                    f"time (relative difference {error:.1e})" + (
                                        "; its DynamicQuantizeLinear nodes quantize with one scale for "
                                        "the whole batch" if dynamic else ""))
        if raw.ndim < 2 or raw.shape[0] != 2:
            raise UnsupportedModelError(
                f"output {output.name!r} has shape {raw.shape} for two images; expected (N, K).")
        rows = raw.reshape(2, -1).astype(np.float64)
        if rows.shape[1] < 2:
            raise UnsupportedModelError(
                f"output {output.name!r} has {rows.shape[1]} value per image; a classifier needs at "
                "least 2 classes (single sigmoid outputs are not supported).")
        is_prob = output.is_probability
        if is_prob is None:
            is_prob = bool(np.all(rows >= 0) and np.all(rows <= 1 + 1e-6)
                           and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3))
        return OutputSpec(output.name, rows.shape[1], output.softmax_input, is_prob)

    def _settle_optimisation(self) -> None:
        """onnxruntime's graph optimisations must keep the graph's function: the scores of a smooth
        random image (a 4 x 4 grid of random colours, resized; where noise left a Hugging Face BiT's
        wrong scores within 0.2 % of their range, a smooth image showed 10 %) against the graph's nodes
        computed one by one (``OrtEngine.settle_optimisation``), within 1e-3 of their largest magnitude
        (1e-2 on a GPU or in float16). Where they differ, the engine keeps fewer optimisations, or none,
        and a warning says so. Not on OpenVINO (its own compiler) nor on quantized graphs (whose fused
        integer kernels round otherwise, by design)."""
        if self.engine == "openvino" or any(n.op_type in _QUANTIZED_OPS for n in self.model.graph.node):
            return
        rng = np.random.default_rng(1)
        coarse = rng.uniform(0, 255, (4, 4, self.input.channels)).astype(np.float32)
        x = self.to_model_input(self.fit_pixels(coarse)[None])
        half = self.input.dtype == np.float16 or any(t.data_type == onnx.TensorProto.FLOAT16
                                                     for t in self.model.graph.initializer)
        drift = self.ort.settle_optimisation(x, self.output.name, 1e-2 if half or self.ort.on_cuda else 1e-3)
        if drift is not None:
            warnings.warn(f"model {self.name!r}: onnxruntime's graph optimisations change its scores (by "
                          f"{drift:.1e} of their largest magnitude on a probe image, against its nodes computed "
                          f"one by one); it runs with {self.ort.optimisation_name} (right scores, maybe slower). "
                          "This is onnxruntime's defect: report it with the file.",
                          OptimisationFallbackWarning, stacklevel=4)

    # preprocessing --------------------------------------------------------------------------------
    def prepare(self, images) -> tuple[np.ndarray, bool]:
        """Images as users pass them → (N x H x W x C float32 pixels at the model's size, batch?)."""
        pixels, is_batch = to_pixel_batch(images)
        return np.stack([self.fit_pixels(p) for p in pixels]), is_batch

    def fit_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """One canonical H x W x C image → the network's size and channel count (still pixels)."""
        resized = preprocess_mod.resize(pixels, self.input.size)
        return preprocess_mod.match_channels(resized, self.input.channels).astype(np.float32)

    def to_model_input(self, pixels: np.ndarray) -> np.ndarray:
        """N x H x W x C pixels (0..255, RGB) → the graph's input tensor (normalised, laid out, typed)."""
        x = self.preprocessing.normalise(pixels, channels_first=self.input.layout == "NCHW")
        if self.input.dtype == np.uint8:
            return np.ascontiguousarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
        return np.ascontiguousarray(x, dtype=self.input.dtype)

    # batch size -----------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """The batch size for forward passes: as given to ``load``, or measured once ('auto')."""
        if self._batch_size == "auto":
            self._batch_size = self.ort.best_batch_size(self._grey_input(), [self.output.name])
        return self._batch_size

    @property
    def stream_batch_size(self) -> int:
        """The batch size for perturbation methods on onnxruntime, which run batches in parallel
        one-core streams: as given to ``load``, or measured once on those streams ('auto')."""
        if self._stream_batch_size == "auto":
            streams = self.ort.parallel_streams()
            self._stream_batch_size = self.batch_size if streams == 1 else \
                self.ort.best_batch_size(self._grey_input(), [self.output.name], streams=streams)
        return self._stream_batch_size

    def _grey_input(self) -> np.ndarray:
        return self.to_model_input(np.full((1, *self.input.size, self.input.channels), 128, np.float32))[0]

    def release_caches(self) -> None:
        """Gives back the memory that explaining with this classifier made it keep, as if it were freshly
        loaded: its entries in the per-classifier caches of the methods and exports (each in-graph
        Grad-CAM session, Recipro-CAM's heads with their sessions and its in-graph sessions; the tables
        registered with ``registries.register_classifier_cache``), the engine's sessions other than the
        plain one (those with further outputs, e.g. a layer's activations, and the single-threaded one of
        the perturbation streams: ``OrtEngine.drop_sessions``), incremental occlusion's split of the graph
        (``runtime.incremental_split``: its stage and suffix sessions, each suffix holding most of the
        weights), and the plain session's onnxruntime arena, returned to the OS (``OrtEngine.return_memory``,
        one grey image run). The loaded graph, its converted torch module, the measured batch sizes and the
        decisions kept on ``runtime`` (numbers) stay.
        Everything dropped is made again on next use, with the same results. For a classifier kept for a
        long time (a server, a test suite) after work that touched many layers or large batches."""
        release_classifier_caches(self)
        self.runtime.incremental_split = None  # a running occlusion keeps its own reference to it
        self.ort.drop_sessions(keep_plain=True)
        self.ort.return_memory(self._grey_input()[None])

    def resolve_batch_size(self, value, where: str, backend: str | None = None) -> int:
        """``value`` validated, 'auto' resolved; ``backend``: for a perturbation method on it."""
        value = check_batch_size(where, value)
        budget = self.ort.guard.max_batch(self.per_image_shape, torch=backend == "torch")
        if value != "auto":
            return min(value, self.max_batch or value, budget)
        return min(self.stream_batch_size if backend == "onnxruntime" else self.batch_size, budget)

    # scores ---------------------------------------------------------------------------------------
    def scores_from_outputs(self, outputs: Sequence[np.ndarray]) -> np.ndarray:
        """Raw session outputs (``score_outputs`` order) → (N, K) float32 probabilities."""
        raw = outputs[0].reshape(len(outputs[0]), -1)
        if not np.all(np.isfinite(raw)):
            raise NonFiniteOutputError(
                f"model {self.name!r} produced NaN or infinite scores; check the image and the "
                "preprocessing (a wrong scale can overflow float16 models).")
        return raw.astype(np.float32) if self.output.is_probability else softmax(raw)

    def predict_model_input(self, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """(N, K) probabilities for a prepared model-input batch."""
        outputs = self.ort.run_batched(x, [self.output.name], batch_size or self.batch_size)
        return self.scores_from_outputs(outputs)

    def predict(self, images, *, batch_size="auto") -> np.ndarray:
        """Class probabilities: (K,) for one image, (N, K) for a batch (MATLAB's ``predict``)."""
        pixels, is_batch = self.prepare(images)
        probs = self.predict_model_input(self.to_model_input(pixels),
                                         self.resolve_batch_size(batch_size, "predict"))
        return probs if is_batch else probs[0]

    @functools.cached_property
    def gradient_scores(self) -> str:
        """The tensor gradient methods differentiate: the pre-softmax scores, taken before the
        rounding of a quantized graph's last QuantizeLinear/DequantizeLinear pair (a rounded score
        saturates: its gradient would be 0 for every class scored above the calibrated range)."""
        from ..convert.quantized import before_quantisation

        return before_quantisation(self.source_model.graph, self.output.softmax_input or self.output.name)

    def logits(self, images) -> np.ndarray:
        """Pre-softmax scores: the graph's output when it has no Softmax, else the Softmax's input."""
        if self.output.is_probability and not self.output.softmax_input:
            raise UnsupportedModelError(
                f"model {self.name!r} outputs probabilities without a Softmax node; its logits are "
                "not available.")
        name = self.output.softmax_input or self.output.name
        pixels, is_batch = self.prepare(images)
        raw = self.ort.run_batched(self.to_model_input(pixels), [name], self.batch_size)[0]
        raw = raw.reshape(len(raw), -1).astype(np.float32)
        return raw if is_batch else raw[0]

    def classify(self, images):
        """(label, scores) for one image; (list of labels, (N, K) scores) for a batch."""
        probs = self.predict(images)
        if probs.ndim == 1:
            return self.class_names[int(np.argmax(probs))], probs
        return [self.class_names[int(i)] for i in probs.argmax(axis=1)], probs

    def top_k(self, image, k: int = 5) -> list[Prediction]:
        k = check_int("top_k", "k", k, minimum=1, maximum=self.num_classes)
        probs = self.predict(image)
        if probs.ndim != 1:
            raise InvalidParameterError("top_k: pass one image, not a batch.")
        return [Prediction(self.class_names[i], i, float(probs[i])) for i in top_indices(probs, k)]

    def class_index(self, label, where: str = "label") -> int:
        """A class index from an index or a class name; unknown names list the closest ones."""
        if isinstance(label, (bool, np.bool_)):
            raise InvalidParameterTypeError(f"{where}: a class index or name is needed; got {label!r}.")
        if isinstance(label, (int, np.integer)):
            if not 0 <= int(label) < self.num_classes:
                raise UnknownClassError(
                    f"{where}: class index must be in [0, {self.num_classes - 1}]; got {int(label)}.")
            return int(label)
        if isinstance(label, str):
            try:
                return self.class_names.index(label)
            except ValueError:
                near = closest(label, self.class_names)
                hint = f" Closest: {', '.join(repr(n) for n in near)}." if near else ""
                raise UnknownClassError(f"{where}: unknown class name {label!r}.{hint}") from None
        raise InvalidParameterTypeError(
            f"{where}: a class index or name is needed; got {type(label).__name__}.")

    def class_indices(self, labels, where: str = "label") -> tuple[list[int], bool]:
        """One label or a sequence of labels → (indices, whether several were given)."""
        if isinstance(labels, (list, tuple, np.ndarray)):
            if len(labels) == 0:
                raise InvalidParameterError(f"{where}: at least one class is needed; got an empty list.")
            return [self.class_index(l, where) for l in labels], True
        return [self.class_index(labels, where)], False

    # layers ---------------------------------------------------------------------------------------
    def layers(self) -> list[Layer]:
        """Every node: its name (or first output's name when unnamed), op type and per-image shape."""
        if self._layers is None:
            known = infer_shapes(self.model)
            found = []
            for node in self.model.graph.node:
                if not node.output or node.op_type == "Constant":
                    continue
                vi = known.get(node.output[0])
                shape = tuple(dims(vi)[1:]) if vi is not None and dims(vi) else None
                found.append(Layer(layer_name(node), node.op_type, node.output[0], shape))

            def lost(layer: Layer) -> bool:
                return layer.shape is None or None in layer.shape

            if any(lost(l) for l in found):
                # shapes lost to the free batch (a Reshape whose target the batch passes compute from the
                # input's Shape): inferred again with one image, as the run below would measure them, but
                # without holding every such tensor at once (MobileNetV5's 495 attention tensors at 768 x
                # 768: more than 8 GB)
                one = infer_at(self.model, self.input.name, [1, *self.per_image_shape])
                at_one = {name: dims(vi) for name, vi in one.items() if vi.type.tensor_type.HasField("shape")}
                found = [Layer(l.name, l.op_type, l.output, tuple(at_one[l.output][1:]))
                         if lost(l) and l.output in at_one and None not in at_one[l.output] else l for l in found]
            unknown = [l.output for l in found if lost(l)]
            if unknown:  # shapes computed at run time (Swin's padding to whole windows): one image's
                try:
                    values = self.ort.run(self._grey_input()[None], unknown)
                    measured = {name: v.shape for name, v in zip(unknown, values)}
                except Exception:  # unknown shapes stay unknown; nothing else depends on them
                    measured = {}
                found = [l if l.output not in measured else
                         Layer(l.name, l.op_type, l.output, tuple(measured[l.output][1:])) for l in found]
            # the nodes our batch passes added are not layers of the network
            self._layers = [l for l in found if not l.output.startswith("free_batch__")]
        return self._layers

    @property
    def structure(self) -> Structure:
        """What the graph's wiring says of its tensors: image-dependent, attention, token widths."""
        if self._structure is None:
            shapes = {l.output: l.shape for l in self.layers()}
            self._structure = analyse_structure(self.model.graph, self.input.name, shapes)
        return self._structure

    @property
    def token_channels(self) -> set[int] | None:
        """The channel counts of a transformer's token stream (those its layer norms normalise over the
        last axis: LayerNormalization nodes or their ReduceMean/Sub form); None for a network without
        tokens."""
        return set(self.structure.token_channels) or None

    def layout(self, layer) -> "FeatureLayout | None":
        """How ``layer`` (a name or a Layer) shows itself as (C, H, W): a feature map, tokens on the
        image's grid or a channels-last grid; None when it is not a feature map (attention scores and
        probabilities never are)."""
        layer = self.layer(layer) if isinstance(layer, str) else layer
        if layer.output in self.structure.attention:
            return None
        return feature_layout(layer.shape, self.input.size, self.token_channels)

    def feature_map_layout(self, layer, where: str) -> "FeatureLayout | None":
        """``layout(layer)``; a layer the image does not reach, attention, and in a network of tokens a
        layer with several dims per image that is no feature map (q/k/v) are refused
        (LayerNotFeatureMapError). Vectors pass."""
        layer = self.layer(layer) if isinstance(layer, str) else layer
        if layer.output not in self.structure.image_dependent:
            raise LayerNotFeatureMapError(
                f"{where}: layer {layer.name!r} ({layer.op_type}) does not depend on the image: its values "
                "come from the graph's constants and the input's shape only (a mask or position table), "
                "so it has nothing to show or explain about an image. Pick a layer the image reaches; "
                "net.layers() lists them.")
        if layer.output in self.structure.attention:
            raise LayerNotFeatureMapError(not_a_feature_map(where, layer, attention=True))
        found = self.layout(layer)
        if found is None and self.token_channels and layer.shape is not None and len(layer.shape) >= 2:
            raise LayerNotFeatureMapError(not_a_feature_map(where, layer))
        return found

    def describe_layer(self, name: str) -> str:
        """What a layer is, in words, for titles: 'first conv layer (Conv), 112×112×32, 2% deep'."""
        from ..model.describe import describe_layer

        return describe_layer(self, name)

    def layer(self, name: str) -> Layer:
        """A layer by node name or by tensor name; unknown names list the closest ones."""
        if not isinstance(name, str):
            raise InvalidParameterTypeError(f"layer must be a name (str); got {type(name).__name__}.")
        layers = self.layers()
        for layer in layers:
            if layer.name == name:
                return layer
        for layer in layers:
            if layer.output == name:
                return layer
        for node in self.model.graph.node:
            if name in node.output:
                return Layer(name, node.op_type, name, None)
        near = closest(name, [l.name for l in layers])
        hint = f" Closest: {', '.join(repr(n) for n in near)}." if near else ""
        raise UnknownLayerError(
            f"unknown layer {name!r} in model {self.name!r}.{hint} net.layers() lists all.")

    def activations(self, images, layer: str) -> np.ndarray:
        """Activations of ``layer``: (C, H, W) float32 for one image, (N, C, H, W) for a batch; tokens
        and channels-last grids are laid out as (C, H, W) (``layout``). Vectors (N, K) come back as
        (K, 1, 1), like MATLAB's 1x1xK."""
        target = self.layer(layer)
        layout = self.feature_map_layout(target, "activations")
        pixels, is_batch = self.prepare(images)
        out = self.ort.run_batched(self.to_model_input(pixels), [target.output], self.batch_size)[0]
        out = np.asarray(out, dtype=np.float32)
        if layout is not None:
            out = np.ascontiguousarray(layout.to_chw(out))
        if out.ndim == 2:
            out = out[:, :, None, None]
        elif out.ndim == 3:
            out = out[:, :, :, None]
        elif out.ndim != 4:
            raise UnsupportedModelError(
                f"layer {layer!r} has activations of rank {out.ndim}; ranks 2 to 4 are supported.")
        return out if is_batch else out[0]

    def __repr__(self) -> str:
        return (f"Classifier({self.name!r}, input={self.input.name!r} {self.input.layout} "
                f"{self.input.height}x{self.input.width}x{self.input.channels} {self.input.dtype}, "
                f"classes={self.num_classes}, preprocessing={self.preprocessing.name!r} "
                f"({self.preprocessing.origin}), device={self.device!r})")


def load(source=None, *, preprocessing=None, labels=None, input_layout=None, device="auto",
         batch_size="auto", allow_external_data=True, torch_device="auto", engine="onnxruntime",
         precision="f32") -> Classifier:
    """Load an ONNX image classifier.

    source: a path, bytes, an ``onnx.ModelProto``, a registry name (``explainer.zoo.registry.REGISTRY``)
    or None for the embedded default (EfficientNet-Lite0). Weights in files beside the model (the dynamo
    exporter's ``NAME.onnx.data``) are read from the model's folder; ``allow_external_data=False``
    refuses them. Everything the graph tells (input name,
    layout, size, channels, dtype, softmax, labels and preprocessing in ``metadata_props``) is read
    from it; the arguments override. ``device`` picks onnxruntime's execution provider (forward
    methods); ``torch_device`` the device of the converted module (gradient methods, ``backend="torch"``).
    ``engine`` runs the forward passes of the forward-only methods: "onnxruntime", "openvino" (CPU; the
    extra ``pip install -e '.[openvino]'``) or "auto" (the faster of the two at float32, measured once
    per model and machine); ``precision`` "f32", or on OpenVINO "bf16" / "f16" (faster where the CPU
    has them, scores about 1e-2 off). ``net.engine`` and ``net.precision`` say what runs.
    """
    from ..zoo import load_source

    loaded = load_source(source, allow_external_data=allow_external_data)
    return Classifier(loaded, preprocessing=preprocessing, labels=labels, input_layout=input_layout,
                      device=device, batch_size=batch_size, torch_device=torch_device, engine=engine,
                      precision=precision)
