"""What a worker runs for a request, and how its answers are encoded.

A job gets the request's bytes and parsed parameters, decodes the image (in the pool, not on the event
loop: decoding is work too), and calls the public API: ``net.top_k`` for /v1/classify, the registry's
methods for /v1/explain. Maps leave as little-endian float16 arrays in base64 (the library's float32
maps, rounded once), with colour PNGs made by ``explainer.overlay``: the map blended over the image
(``overlays``) or alone (``heatmaps``, alpha 1, for pages that blend it themselves).
"""
from __future__ import annotations

import base64
import io
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ResourceLimitError
from ..methods.registry import GRADIENT, Method
from .images import decode, for_library
from ..model.labels import LabelSpec
from .params import DEFAULT_OUTPUTS
from .progress import JobState

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier



class TorchLane:
    """One method at a time on the network's converted torch module. The library's gradient methods
    hook the module itself (Grad-CAM records a layer's output, guided backpropagation rewrites every
    ReLU's backward), so two of them at once on one network would see each other's hooks; onnxruntime
    sessions, which the forward-only methods use, run concurrently. The engine takes turns by itself
    (``TorchEngine.exclusive``); the lane queues before it so that a waiting job can be cancelled."""

    def __init__(self):
        self._lock = threading.Lock()

    @staticmethod
    def needed(method: Method, options: dict) -> bool:
        return method.kind == GRADIENT or options.get("backend") == "torch"

    @contextmanager
    def hold(self, job: JobState):
        while not self._lock.acquire(timeout=0.1):
            job.check()  # a job cancelled while it waits gives up its place
        try:
            yield
        finally:
            self._lock.release()


def png_bytes(rgb: np.ndarray) -> bytes:
    """An RGB uint8 array → PNG file bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def png(rgb: np.ndarray) -> str:
    """An RGB uint8 array → base64 PNG."""
    return base64.b64encode(png_bytes(rgb)).decode("ascii")


def float16(m: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(m, dtype="<f2").tobytes()).decode("ascii")


@dataclass
class ExplainJob:
    data: bytes
    methods: list[Method]
    labels: LabelSpec
    options: dict[str, dict]
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    alpha: float = 0.5
    cmap: str = "jet"


def _seconds(since: float) -> float:
    return round(time.perf_counter() - since, 4)


def classify(net: Classifier, data: bytes, k: int, max_pixels: int, job: JobState) -> dict:
    timings, start = {"queue_s": round(job.started - job.created, 4)}, time.perf_counter()
    job.set_stage("decode")
    pixels = decode(data, max_pixels)
    timings["decode_s"], start = _seconds(start), time.perf_counter()
    job.set_stage("classify")
    predictions = net.top_k(for_library(pixels), k)
    timings["classify_s"] = _seconds(start)
    return {"image": {"height": int(pixels.shape[0]), "width": int(pixels.shape[1])},
            "predictions": [p._asdict() for p in predictions], "timings": timings}


def explain(net: Classifier, spec: ExplainJob, max_pixels: int, job: JobState, lane: TorchLane,
            max_output_pixels: int, explained=None) -> dict:
    """``explained``: an ``ExplainedModel`` (``--model-explained``): a method it covers (its method at its
    layer) is answered, with the labels' scores, by one run of the exported model."""
    from ..viz import overlay

    timings, begin = {"queue_s": round(job.started - job.created, 4)}, time.perf_counter()
    job.set_stage("decode")
    image = for_library(decode(spec.data, max_pixels))
    timings["decode_s"], start = _seconds(begin), time.perf_counter()
    job.set_stage("labels")
    fast = [m.name for m in spec.methods if explained is not None and m.name == explained.method
            and explained.covers(net, m.name, m.validate(net, spec.options[m.name], m.name))]
    run = explained.run(net, image, spec.labels) if fast else None  # the prediction and the maps, one call
    if run is not None:
        probabilities, indices = run.probabilities, run.indices
        timings["explained"] = fast if run.has_maps else []
    else:
        probabilities = net.predict(image)  # one forward pass: the labels' indices and their scores
        indices = spec.labels.indices(net.class_index, probabilities)
    labels = [{"index": i, "label": net.class_names[i], "score": float(probabilities[i])} for i in indices]
    timings["labels_s"], timings["methods"] = _seconds(start), {}
    maps_asked = len(spec.methods) * len(indices)
    if maps_asked * image.shape[0] * image.shape[1] > max_output_pixels:
        raise ResourceLimitError(
            f"{maps_asked} maps of a {image.shape[1]}x{image.shape[0]} image hold more than the service's "
            f"{max_output_pixels} map pixels per answer (--max-output-pixels); ask for fewer methods or labels, "
            "or send a smaller image.")
    results = []
    for method in spec.methods:
        job.set_stage(method.name)
        options = spec.options[method.name]
        if run is not None and run.has_maps and method.name in fast:
            start = time.perf_counter()
            maps = run.maps()
            timings["methods"][method.name] = round(run.seconds, 4) + _seconds(start)
        else:
            with lane.hold(job) if lane.needed(method, options) else nullcontext():
                start = time.perf_counter()
                maps = method(net, image, indices if len(indices) > 1 else indices[0], **options)
                timings["methods"][method.name] = _seconds(start)
        maps = np.asarray(maps, dtype=np.float32)
        results.append((method, maps.reshape(-1, *maps.shape[-2:])))
    job.set_stage("encode")
    start = time.perf_counter()
    out = []
    for method, maps in results:
        for label, m in zip(labels, maps):
            finite = m[np.isfinite(m)]
            entry = {"method": method.name, "label": label, "shape": list(m.shape), "dtype": "float16",
                     "min": float(finite.min()) if finite.size else 0.0,
                     "max": float(finite.max()) if finite.size else 0.0}
            if "maps" in spec.outputs:
                entry["data"] = float16(m)
            if "overlays" in spec.outputs:
                entry["overlay_png"] = png(overlay(image, m, alpha=spec.alpha, cmap=spec.cmap))
            if "heatmaps" in spec.outputs:
                entry["heatmap_png"] = png(overlay(image, m, alpha=1.0, cmap=spec.cmap))
            out.append(entry)
    timings["encode_s"], timings["work_s"] = _seconds(start), _seconds(begin)
    return {"image": {"height": int(image.shape[0]), "width": int(image.shape[1])}, "labels": labels,
            "maps": out, "timings": timings}
