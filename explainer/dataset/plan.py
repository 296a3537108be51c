"""What a dataset job does to each image, validated once before any work (``Plan``), and the one
per-image function both engines run (``explain_image``): decode, pick the labels, run each method,
score it with the faithfulness metrics, and return rows — or an error row with the typed error, so
that one bad image never stops a run."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ExplainerError, InvalidParameterError
from ..model.labels import LabelSpec, top_indices
from .sources import ImageRef

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier

METRICS = ("deletion", "insertion")


@dataclass(frozen=True)
class Plan:
    methods: tuple[str, ...]
    labels: str | tuple = "top1"      # "topK" or class names / indices
    metrics: tuple[str, ...] = METRICS
    options: dict = field(default_factory=dict)  # {method: {option: value}}, resolved (seeded: random_state 0)
    steps: int = 50                   # points of each deletion / insertion curve
    deletion_baseline: str = "zero"
    top_k: int = 5                    # predictions kept per row
    #: {method: its options checked and normalised}, what the methods run with (checked once, here)
    checked: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def validated(cls, net, methods, labels="top1", metrics=METRICS, options=None, steps=50,
                  deletion_baseline="zero", top_k=5) -> "Plan":
        """Every name and option checked against the registry and the model before any image is read."""
        from ..evaluate import DELETION_BASELINES
        from ..methods.registry import get_method
        from ..validation import check_choice, check_int

        where = "explain_dataset"
        if isinstance(methods, str):
            methods = [m.strip() for m in methods.split(",") if m.strip()]
        if not methods:
            raise InvalidParameterError(f"{where}: methods must name at least one method; got {methods!r}.")
        names = tuple(dict.fromkeys(get_method(m, where).name for m in methods))
        given = {get_method(k, where).name: dict(v) for k, v in (options or {}).items()}
        unused = set(given) - set(names)
        if unused:
            raise InvalidParameterError(f"{where}: options given for {sorted(unused)}, which are not among the "
                                        f"methods {list(names)}.")
        resolved, checked = {}, {}
        for name in names:
            method = get_method(name)
            resolved[name] = method.reproducible(given.get(name, {}), verbose=False)  # a resume gives the same maps
            checked[name] = method.validate(net, resolved[name], where)
        metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics or ())
        for m in metrics:
            check_choice(where, "metrics", m, METRICS)
        spec = LabelSpec.parse(labels, f"{where}: labels")
        # kept as text ("top3") or class names: what a resumed job's plan is compared by
        labels = f"top{spec.top}" if spec.top is not None else \
            tuple(net.class_names[i] for i in spec.indices(net.class_index, where=f"{where}: labels"))
        check_choice(where, "deletion_baseline", deletion_baseline, DELETION_BASELINES)
        return cls(names, labels, metrics, resolved, check_int(where, "steps", steps, minimum=2, maximum=10_000),
                   deletion_baseline, min(check_int(where, "top_k", top_k, minimum=1), net.num_classes), checked)

    def label_indices(self, net, probs: np.ndarray) -> list[int]:
        return LabelSpec.parse(self.labels).indices(net.class_index, probs)


@dataclass
class ImageResult:
    rows: list[dict]
    errors: list[dict]


def error_row(ref: ImageRef, exc: BaseException, method: str | None = None) -> dict:
    return dict(image_id=ref.id, path=ref.path, method=method, error_type=type(exc).__name__,
                message=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def explain_image(net: Classifier, ref: ImageRef, plan: Plan, worker: str = "local", methods=None,
                  explained=None) -> ImageResult:
    """The rows of one image: one per (label, method) of ``methods`` (default: the plan's). Errors of the library (a corrupt image, a bomb,
    non-finite outputs) become error rows; anything else is a bug and propagates. ``explained``: an
    ``ExplainedModel`` whose method (at its layer, with the plan's options) is answered, with the
    prediction, by one run of the exported model."""
    from ..evaluate import deletion, insertion
    from ..io import to_pixels
    from ..methods.registry import get_method
    from ..model.preprocess import resize

    todo = plan.methods if methods is None else methods
    fast = [name for name in todo if explained is not None and name in plan.checked
            and explained.covers(net, name, plan.checked[name])]
    run = None
    try:
        pixels = to_pixels(ref.path, "image")
        image = pixels / 255.0
        if fast:  # the prediction and the maps from one run of the exported model
            run = explained.run(net, image, LabelSpec.parse(plan.labels))
            probs, labels = run.probabilities, run.indices
        else:
            probs = net.predict(image)
            labels = plan.label_indices(net, probs)
    except ExplainerError as exc:
        return ImageResult([], [error_row(ref, exc)])
    order = top_indices(probs, plan.top_k)
    top = dict(top_k_indices=[int(i) for i in order], top_k_labels=[net.class_names[i] for i in order],
               top_k_scores=[float(probs[i]) for i in order])
    h, w = net.input.size
    rows, errors = [], []
    for name in todo:
        options = plan.options.get(name, {})
        start = time.perf_counter()
        try:
            method = get_method(name)
            if run is not None and run.has_maps and name in fast:
                maps, start = run.maps(), start - run.seconds
            else:
                maps = np.asarray(method.function.unchecked(net, image, labels, **plan.checked[name])
                                  if name in plan.checked else method(net, image, labels, **options), np.float32)
        except ExplainerError as exc:
            errors.append(error_row(ref, exc, name))
            continue
        seconds = time.perf_counter() - start
        maps = maps.reshape(len(labels), *pixels.shape[:2])
        for k, label in enumerate(labels):
            row = dict(image_id=ref.id, path=ref.path, height=int(pixels.shape[0]), width=int(pixels.shape[1]),
                       label=int(label), label_name=net.class_names[label], score=float(probs[label]), **top,
                       method=name, options=json.dumps({o: v for o, v in options.items() if o != "verbose"},
                                                       default=str, sort_keys=True),
                       map=resize(maps[k][:, :, None], (h, w), clip=False)[:, :, 0].astype(np.float16),
                       seconds=seconds / len(labels), deletion_auc=None, insertion_auc=None, metric_seconds=0.0,
                       worker=worker)
            start = time.perf_counter()
            try:
                if "deletion" in plan.metrics:
                    row["deletion_auc"] = float(deletion(net, image, maps[k], label, steps=plan.steps,
                                                         baseline=plan.deletion_baseline, verbose=False).auc)
                if "insertion" in plan.metrics:
                    row["insertion_auc"] = float(insertion(net, image, maps[k], label, steps=plan.steps,
                                                           verbose=False).auc)
            except ExplainerError as exc:
                errors.append(error_row(ref, exc, name))
                continue
            row["metric_seconds"] = time.perf_counter() - start
            rows.append(row)
    return ImageResult(rows, errors)
