"""``explain``: run several methods on one image and write a PNG per method and label plus an
``index.html`` (image, top-k table, maps side by side per label, parameters and timings)."""
from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidParameterError
from .evaluate import DELETION_BASELINES
from .io import to_pixels
from .model.labels import LabelSpec, top_indices
from .validation import check_choice

if TYPE_CHECKING:
    from .runtime.classifier import Classifier

DEFAULT_METHODS = ("gradcam", "occlusion", "lime", "gradient", "guided_backprop")


def run_method(net: Classifier, name: str, image, labels, resolved: dict):
    """(maps, the options it ran with) for a registered method, its options ``resolved`` already
    (``validated_options``: checked once, before any work)."""
    from .methods.registry import get_method

    maps = get_method(name).function.unchecked(net, image, labels, **resolved)
    params = {k: _plain(v) for k, v in resolved.items() if k != "verbose"}
    if "feature_layer" in params and params["feature_layer"] is None:
        from .runtime.feature_layers import gradcam_layers

        params["feature_layer"] = gradcam_layers(net).feature
    return maps, params


def validated_options(net: Classifier, methods, options, verbose: bool, where: str = "explain") -> dict:
    """{method: its options checked and normalised}, before any work: seeded methods get random_state=0
    unless given, so that a report is reproducible; unknown method names and options are refused."""
    from .methods.registry import get_method

    if isinstance(methods, str) or not methods:
        raise InvalidParameterError(f"{where}: methods must be a non-empty list of method names; got {methods!r}.")
    names = [get_method(m, where).name for m in methods]
    given = {}
    for name, opts in dict(options or {}).items():
        given[get_method(name, where).name] = dict(opts)
    checked = {name: get_method(name).validate(net, get_method(name).reproducible(opts, verbose), where)
               for name, opts in given.items()}  # options of methods not run are checked too, as before
    return {name: checked.get(name) or get_method(name).validate(net, get_method(name).reproducible({}, verbose), where)
            for name in names}


def _plain(value):
    """A JSON-writable form of an option value."""
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 16 else f"array {value.shape}"
    if isinstance(value, tuple):
        return list(value)
    return value


DPI = 150


def explain(net: Classifier, image, *, methods=DEFAULT_METHODS, labels="top3", out_dir="explanations", evaluate: bool = True,
            deletion_baseline: str = "zero", options=None, verbose: bool = True) -> Path:
    """Compute the maps and write the report; returns the path of index.html. ``methods``: names of
    the method registry (``explainer.list_methods()``); ``options``: {method: {option: value}};
    ``deletion_baseline``: what the deletion curves fill removed pixels with (see ``explainer.evaluate``).
    One progress bar counts the phases (a method, then the deletion/insertion curves of each label)."""
    from PIL import Image

    from . import progress
    from .runtime.classifier import Prediction

    resolved = validated_options(net, methods, options, verbose)
    methods = list(resolved)
    check_choice("explain", "deletion_baseline", deletion_baseline, DELETION_BASELINES)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pixels = to_pixels(image)
    rgb = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels
    Image.fromarray(rgb.astype(np.uint8)).save(out / "image.png")
    image = pixels / 255.0  # as the methods take it (floats in 0..1), computed once
    probs = net.predict(image)  # one forward pass: the labels, their scores and the top 5
    indices = LabelSpec.parse(labels).indices(net.class_index, probs)
    top = [Prediction(net.class_names[i], i, float(probs[i])) for i in top_indices(probs, 5)]
    results = []
    phases = progress.bar(total=len(methods) * (1 + (len(indices) if evaluate else 0)), desc="explain",
                          unit="phase", verbose=verbose, leave=True)
    with phases:
        for name in methods:
            phases.set_description_str(f"explain: {name}")
            start = time.perf_counter()
            maps, params = run_method(net, name, image, indices, resolved[name])
            seconds = time.perf_counter() - start
            phases.update()
            maps = np.asarray(maps).reshape(len(indices), *pixels.shape[:2])
            files, metrics = [], []
            for k, idx in enumerate(indices):
                file = f"{name}_{idx}.png"
                _map_figure(net, image, maps[k], name, idx, params).savefig(out / file, dpi=DPI, bbox_inches="tight")
                files.append(file)
                if evaluate:
                    phases.set_description_str(f"explain: deletion/insertion of {name}, {net.class_names[idx]}")
                    metrics.append(_metrics(net, image, maps[k], idx, out, f"{name}_{idx}", deletion_baseline))
                    phases.update()
            results.append(dict(method=name, params=params, seconds=seconds, files=files, metrics=metrics))
        phases.set_description_str("explain")
    page = _html(net, top, probs, indices, results)
    (out / "index.html").write_text(page, encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(dict(
        model=net.name, labels=[net.class_names[i] for i in indices],
        methods=[{k: v for k, v in r.items() if k != "files"} for r in results]), indent=1, default=float))
    return out / "index.html"


def _map_figure(net: Classifier, image, m, name, idx, params):
    """The map over the image with its colour bar; titled with the method, the class and, for a method
    with a layer, what the layer is."""
    from .viz import map_figure

    title = f"{name}: {net.class_names[idx]}"
    layer = params.get("feature_layer")
    if isinstance(layer, str):
        title += f"\non {layer}: {net.describe_layer(layer)}"
    return map_figure(image, m, title)


def _metrics(net: Classifier, image, saliency, label, out, stem, deletion_baseline):
    """Deletion/insertion AUC and a curve PNG."""
    from .evaluate import deletion, insertion
    from .viz import figure

    d = deletion(net, image, saliency, label, baseline=deletion_baseline, verbose=False)
    i = insertion(net, image, saliency, label, verbose=False)
    fig = figure(3.6, 2.6)
    ax = fig.subplots()
    ax.plot(d.fractions, d.scores, label=f"deletion ({deletion_baseline}) AUC {d.auc:.3f}")
    ax.plot(i.fractions, i.scores, label=f"insertion AUC {i.auc:.3f}")
    ax.set_xlabel("fraction of pixels", fontsize=8)
    ax.set_ylabel("probability", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}_curves.png", dpi=DPI)
    return {"deletion_auc": d.auc, "deletion_baseline": deletion_baseline, "insertion_auc": i.auc,
            "curves": f"{stem}_curves.png"}


def _html(net: Classifier, top, probs, indices, results) -> str:
    from .pages import page, score_table

    esc = html.escape
    sections = []
    for k, idx in enumerate(indices):
        cells = []
        for r in results:
            m = r["metrics"][k] if r["metrics"] else {}
            extra = ""
            if m:
                extra = (f"<br>deletion ({m['deletion_baseline']}) AUC {m['deletion_auc']:.3f} · "
                         f"insertion AUC {m['insertion_auc']:.3f} (lower deletion and higher insertion are "
                         f"more faithful)<br><img src=\"{esc(m['curves'])}\" alt=\"deletion and insertion curves\" "
                         f"width=\"300\">")
            cells.append(f"<figure><img src=\"{esc(r['files'][k])}\" alt=\"{esc(r['method'])}\" width=\"380\">"
                         f"<figcaption><b>{esc(r['method'])}</b> · {r['seconds']:.2f} s{extra}</figcaption></figure>")
        sections.append(f"<section><h2>{esc(net.class_names[idx])} (p = {probs[idx]:.4f})</h2>"
                        f"<div class=\"row\">{''.join(cells)}</div></section>")
    params = "".join(f"<tr><td><b>{esc(r['method'])}</b></td><td><code>{esc(json.dumps(r['params']))}</code></td>"
                     f"<td class='num'>{r['seconds']:.2f} s</td></tr>" for r in results)
    body = (f"<section><h2>The image and the top five classes</h2><div class=\"row\">"
            f"<img src=\"image.png\" alt=\"image\" width=\"300\">{score_table(top)}</div></section>"
            f"{''.join(sections)}"
            f"<section><h2>Parameters and timings</h2><table><tr><th>method</th><th>options</th><th>time</th></tr>"
            f"{params}</table><p>Colours: signed maps (evidence for and against) on a diverging map, red for "
            f"and blue against, white at 0; unsigned maps on jet; pixel-level maps fade where small.</p></section>")
    return page(f"Why did {net.name} say that?", "onnx-explainer report", body)
