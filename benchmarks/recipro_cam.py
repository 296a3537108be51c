"""Recipro-CAM beside OpenVINO XAI's, in one run on one machine, on the same ONNX files, float32.

    python -m benchmarks.recipro_cam [--quick] [--ovxai-python PATH]

Files: the embedded EfficientNet-Lite0 (the cached file ``explainer.load()`` reads), a torchvision
ResNet-18 and a timm ViT-Tiny (the seeded exports of tests/exports.py, from the export cache: legacy
exporter, batch axis dynamic for the ViT, since OpenVINO XAI's ViTReciproCAM refuses a static batch);
the chelsea photo, its preprocessed input fed to both sides.

* OpenVINO XAI (``openvino-xai`` 1.1.x pins ``numpy<2`` and ``openvino-dev==2024.4``, which the main venv
  cannot hold): run in its own venv (``--ovxai-python``, default ``/work/ovxai-venv/bin/python``, made
  with ``pip install openvino-xai onnxruntime``) by a helper script this module writes and runs: its
  ``ReciproCAM`` (CNNs) or ``ViTReciproCAM`` (transformers) with defaults, saliency unscaled
  (``embed_scaling=False``), the model compiled on the CPU with ``INFERENCE_PRECISION_HINT=f32`` (its
  default on a CPU with bf16 support is bf16); timed: one ``model_forward`` (prediction and every
  class's map in one inference).
* ours: ``explainer.recipro_cam`` for one class (backbone pass, the head on the h*w masked copies,
  the map upsampled to the photo), and onnxruntime's plain forward pass of the same image.
* agreement: OpenVINO XAI takes the logits (pre-softmax scores), so ours runs with ``scores="logits"``
  for the comparison, at the feature layer's resolution, every class: Pearson r per class (min and
  median over the 1,000 classes) and max |difference| after both are min-max scaled; ours at its
  default (softmax probabilities, the paper's) is shown beside, for the top class.

Timing: rounds alternate ours (median of ``repeats`` calls) and OpenVINO XAI (a fresh process timing
``repeats`` calls after a warm-up); ratios are per round, medians over rounds. Writes
``benchmarks/results/recipro_cam.json`` and ``recipro_cam.md`` (``--quick`` only prints).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .run import cpu_model

RESULTS = Path(__file__).with_name("results")
TESTS = Path(__file__).resolve().parent.parent / "tests"
LABEL = 285

OV_SCRIPT = textwrap.dedent('''
    import json, sys, time
    import numpy as np
    import openvino as ov
    from importlib.metadata import version
    from openvino_xai.common.utils import SALIENCY_MAP_OUTPUT_NAME
    from openvino_xai.methods.white_box.recipro_cam import ReciproCAM, ViTReciproCAM

    path, kind, data, out, repeats = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    x = np.load(data)
    method = (ViTReciproCAM if kind == "tokens" else ReciproCAM)(ov.Core().read_model(path), embed_scaling=False,
                                                                 prepare_model=False)
    method.prepare_model(load_model=False)
    method._model_compiled = ov.Core().compile_model(method._model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    method.model_forward(x, preprocess=False)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = method.model_forward(x, preprocess=False)
        times.append(time.perf_counter() - start)
    np.save(out, np.asarray(result[SALIENCY_MAP_OUTPUT_NAME], np.float32)[0])
    print(json.dumps({"seconds": float(np.median(times)), "openvino": ov.__version__,
                      "openvino_xai": version("openvino-xai")}))
''')


def files() -> list[tuple[str, str, dict]]:
    """(name, path, load keywords) of the three files."""
    sys.path.insert(0, str(TESTS))
    import exports
    from explainer.zoo import registry

    return [("EfficientNet-Lite0", str(registry.REGISTRY["efficientnet_lite0"].fetch()), {}),
            ("ResNet-18 (torchvision, seeded)", str(exports.export("resnet18", "legacy")), {"preprocessing": "imagenet"}),
            ("ViT-Tiny (timm, seeded)", str(exports.export("vit_tiny", "legacy-dynamic")), {"preprocessing": "imagenet"})]


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def theirs(python: str, script: Path, path: str, kind: str, x: np.ndarray, repeats: int, tmp: Path):
    data, out = tmp / "x.npy", tmp / "saliency.npy"
    np.save(data, x)
    done = subprocess.run([python, str(script), path, kind, str(data), str(out), str(repeats)],
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"OpenVINO XAI failed on {path}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), np.load(out)


def agreement(ours: np.ndarray, other: np.ndarray) -> dict:
    """Per-class Pearson r over the classes whose maps vary on both sides, and max |difference| after
    min-max scaling both."""
    from explainer.methods.recipro_cam import normalise

    rs = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(ours, other)
          if a.std() > 0 and b.std() > 0]
    return dict(classes=len(rs), r_min=min(rs), r_median=float(np.median(rs)),
                max_abs_diff=float(np.abs(normalise(ours.astype(np.float64)) - normalise(other.astype(np.float64))).max()))


def bench(name: str, path: str, keywords: dict, image, python: str, script: Path, rounds: int, repeats: int,
          tmp: Path) -> dict:
    import explainer
    from explainer.methods.gradcam import default_feature_layer
    from explainer.methods.recipro_cam import head_of, low_resolution, recipro_cam

    net = explainer.load(path, batch_size=1, **keywords)
    layer = net.layer(default_feature_layer(net)[0])
    head = head_of(net, layer)
    small = net.fit_pixels(image)
    x = net.to_model_input(small[None])
    every = list(range(net.num_classes))
    ours_logits = low_resolution(net, small, layer, every, scores="logits")
    top = int(np.argmax(net.predict(image)))
    ours_default = low_resolution(net, small, layer, [top])[0]

    def ours():
        recipro_cam(net, image, LABEL, verbose=False)

    def forward():
        net.ort.run(x, [net.output.name])

    ours_s, theirs_s, forward_s, ratios = [], [], [], []
    meta, their_maps = {}, None
    for _ in range(rounds):
        ours_s.append(median_time(ours, repeats))
        forward_s.append(median_time(forward, repeats))
        meta, their_maps = theirs(python, script, path, head.layout.kind, x, repeats, tmp)
        theirs_s.append(meta["seconds"])
        ratios.append(theirs_s[-1] / ours_s[-1])
    row = dict(model=name, file=Path(path).name, layer=layer.name, layout=head.layout.describe(),
               masked=list(head.inputs), copies=head.layout.grid[0] * head.layout.grid[1],
               ours_ms=1000 * statistics.median(ours_s), theirs_ms=1000 * statistics.median(theirs_s),
               forward_ms=1000 * statistics.median(forward_s), theirs_over_ours=statistics.median(ratios),
               ours_over_forward=statistics.median(ours_s) / statistics.median(forward_s),
               logits=agreement(ours_logits, their_maps), top_class=top,
               r_default_top=float(np.corrcoef(ours_default.ravel(), their_maps[top].ravel())[0, 1]),
               openvino=meta.get("openvino"), openvino_xai=meta.get("openvino_xai"))
    print(json.dumps(row), flush=True)
    return row


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Recipro-CAM beside OpenVINO XAI ({meta['date']})", "",
             f"Machine: {meta['cpu']}; {meta['cpus']} CPUs; onnxruntime {meta['onnxruntime']}; OpenVINO "
             f"{rows[0]['openvino']}, openvino-xai {rows[0]['openvino_xai']} (float32: "
             "INFERENCE_PRECISION_HINT=f32). Chelsea, class 285 for the timings; medians of "
             f"{meta['repeats']} calls per round, {meta['rounds']} alternating rounds. 5-minute load average "
             f"before / after: {meta['load_before']:.2f} / {meta['load_after']:.2f}.", "",
             "| model | layer (masked) | copies | ours (ms) | OpenVINO XAI (ms) | theirs / ours | ours / forward "
             "| r min (median), logits, all classes | max abs diff | r top class, ours default |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["logits"]
        lines.append(f"| {r['model']} | `{r['layer']}` ({len(r['masked'])} tensor(s)) | {r['copies']} | "
                     f"{r['ours_ms']:.1f} | {r['theirs_ms']:.1f} | {r['theirs_over_ours']:.2f} | "
                     f"{r['ours_over_forward']:.2f} | {a['r_min']:.6f} ({a['r_median']:.6f}) | "
                     f"{a['max_abs_diff']:.1e} | {r['r_default_top']:.4f} |")
    lines += ["", "ours: `explainer.recipro_cam(net, image, 285)` (one class, backbone pass, the head on the "
              "h*w masked copies, the map upsampled to the 451 x 300 photo). OpenVINO XAI: one inference of "
              "its model with the Recipro-CAM branch inserted (every class's map at the feature layer's "
              "resolution, no upsampling). ours / forward: over onnxruntime's plain forward pass of the same "
              "image. r: Pearson correlation of ours with `scores=\"logits\"` (what OpenVINO XAI scores) and "
              "theirs at the feature resolution, per class over the classes whose maps vary; max abs diff: "
              "after min-max scaling both to [0, 1]. Last column: ours at its default (softmax probabilities, "
              "as the paper) against theirs, top class.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and repeats; prints only")
    parser.add_argument("--ovxai-python", default=os.environ.get("OVXAI_PYTHON", "/work/ovxai-venv/bin/python"),
                        help="a python with openvino-xai installed")
    args = parser.parse_args(argv)
    import onnxruntime

    import explainer

    rounds, repeats = (1, 5) if args.quick else (3, 20)
    image = explainer.sample_image("chelsea")
    load_before = os.getloadavg()[1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "ovxai_recipro_cam.py"
        script.write_text(OV_SCRIPT)
        for name, path, keywords in files():
            rows.append(bench(name, path, keywords, image, args.ovxai_python, script, rounds, repeats, Path(tmp)))
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), cpu=cpu_model(),
                cpus=len(os.sched_getaffinity(0)), onnxruntime=onnxruntime.__version__, python=platform.python_version(),
                rounds=rounds, repeats=repeats, load_before=load_before, load_after=os.getloadavg()[1])
    text = markdown(meta, rows)
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "recipro_cam.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
        (RESULTS / "recipro_cam.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
