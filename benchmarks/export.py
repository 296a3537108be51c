"""Explanations that ship with the model: the exported model's latency beside the plain model's, in one
run on one machine, batch 1 and batch 16, CPU onnxruntime (default session options).

    python -m benchmarks.export [--quick] [--rounds 5] [--repeats 10] [--out benchmarks/results]

Per file (the embedded EfficientNet-Lite0, and the compatibility suite's ViT-Tiny export): the plain
model (its own outputs), the exported model with Grad-CAM in the graph (top-1 class, maps at the
feature grid), the exported model with Recipro-CAM in the graph (top-1 class) beside OpenVINO XAI's
Recipro-CAM on the same file (``--ovxai-python``: its own environment, float32, one image per call),
the library's in-graph path (``explainer.export.engine.cam_maps``: the normalised
graph plus the branch, one onnxruntime call for the batch) and the library's torch path
(``BaseCAM.low_resolution``, one forward + backward per image, as ``explainer.gradcam`` runs today,
the bicubic resize excluded from both); file-size overhead. Each ratio comes from an alternation of its
two sides alone: within a round they are called in turn, one call each, ``repeats`` times
(``interleaved``), and the ratio is the median over rounds of the rounds' ratios of median calls; each
figure is the median of a variant's round medians over the alternations it took part in.

The public calls (issue 27, point 5), on the embedded EfficientNet-Lite0, one image: ``explainer.gradcam``
and ``explainer.gradcam_plus_plus`` (image in, map at the image's size out) against one forward pass,
defined two ways: ``raw``, ``net.ort.run`` on the prepared model input (the session alone: no resize,
no normalisation), and ``predict``, ``net.predict(image)`` from the same image (the same resize and
normalisation as the CAMs': the public forward; ``net.classify`` is this plus an argmax). Two
images: one at the model's input size (224 x 224, the resize a no-op) and one at its own size
(300 x 451, resized for the model). Writes ``benchmarks/results/export.json`` and ``export.md``
(``--quick`` only prints).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


RESULTS = Path(__file__).parent / "results"
#: seconds between timed calls (see ``interleaved``)
GAP = 0.02


def files(quick: bool):
    import explainer

    out = [("EfficientNet-Lite0 (embedded)", lambda: explainer.load(device="cpu"))]
    if not quick:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import exports

        out.append(("ViT-Tiny (timm, legacy exporter, dynamic batch)",
                    lambda: explainer.load(exports.export("vit_tiny", "legacy-dynamic"), device="cpu")))
    return out


def bench(name, make, rounds, repeats, tmp: Path, peer_python: str | None = None) -> dict:
    import onnxruntime as ort
    from skimage import data

    import explainer
    from explainer.methods.gradcam import GradCAM

    net = make()
    path = explainer.export_explained(net, tmp / "explained.onnx", top_k=1)
    plain = tmp / "plain.onnx"
    plain.write_bytes(net.source_model.SerializeToString())
    options = ort.SessionOptions()
    options.log_severity_level = 3
    s_plain = ort.InferenceSession(str(plain), options, providers=["CPUExecutionProvider"])
    s_expl = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    images = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()] * 4
    pixels, _ = net.prepare(images)
    x16 = net.to_model_input(np.rint(pixels))
    dynamic = not net.source_model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    cam = GradCAM(net, runs_on="torch")  # the torch path (explainer.gradcam itself runs in the graph now)
    recipro = explainer.export_explained(net, tmp / "recipro.onnx", method="recipro_cam", top_k=1)
    s_recipro = ort.InferenceSession(str(recipro), options, providers=["CPUExecutionProvider"])
    row = dict(model=name, size_mb=plain.stat().st_size / 1e6, exported_mb=path.stat().st_size / 1e6,
               recipro_mb=recipro.stat().st_size / 1e6, layer=cam.feature_layer)
    theirs = _their_recipro_cam(net, cam.feature_layer, plain, x16[:1], tmp, peer_python)
    row["ovxai"] = theirs.meta if theirs is not None else None
    try:
        for batch in (1, 16):
            _batch(row, batch, net, x16, pixels, dynamic, cam, s_plain, s_expl, s_recipro, theirs, rounds, repeats)
    finally:
        if theirs is not None:
            theirs.close()
    return row


def _their_recipro_cam(net, layer: str, path: Path, x: np.ndarray, tmp: Path, python: str | None):
    """OpenVINO XAI's Recipro-CAM on the same file in its own environment (``benchmarks.recipro_cam``'s
    worker, float32), or None without one."""
    if not python or not Path(python).exists():
        return None
    from .recipro_cam import OV_SCRIPT, Theirs

    script = tmp / "ovxai_recipro_cam.py"
    script.write_text(OV_SCRIPT)
    kind = net.feature_map_layout(net.layer(layer), "benchmarks.export").kind
    return Theirs(python, script, str(path), kind, x, tmp)


def _batch(row, batch, net, x16, pixels, dynamic, cam, s_plain, s_expl, s_recipro, theirs, rounds, repeats):
    """One batch size's timings and ratios into ``row``."""
    from explainer.export.engine import cam_maps

    x = x16[:batch]
    top = np.argmax(net.ort.run(x, [net.output.name])[0].reshape(batch, -1), axis=1)
    variants = {
        "plain": lambda: [s_plain.run(None, {net.input.name: x[i:i + 1]}) for i in range(batch)]
        if not dynamic else s_plain.run(None, {net.input.name: x}),
        "exported": lambda: [s_expl.run(None, {net.input.name: x[i:i + 1]}) for i in range(batch)]
        if not dynamic else s_expl.run(None, {net.input.name: x}),
        "exported_recipro": lambda: [s_recipro.run(None, {net.input.name: x[i:i + 1]}) for i in range(batch)]
        if not dynamic else s_recipro.run(None, {net.input.name: x}),
        # one image per call (its branch is written for one): its worker's own clock, the pipe not counted
        "ovxai_recipro": (lambda: sum(theirs.time()[0] for _ in range(batch))) if theirs is not None else None,
        "library_ingraph": lambda: cam_maps(net, x, top[:, None]),
        "library_torch": lambda: [cam.low_resolution(pixels[i], [int(top[i])]) for i in range(batch)],
    }
    slow = ("library_torch", "ovxai_recipro", "exported_recipro")
    calls = {k: repeats if k not in slow or batch == 1 else max(2, repeats // 4) for k in variants}
    # each ratio from an alternation of its two sides alone (with more sessions and processes in one
    # alternation, the order of the calls moved batch-1 ratios by up to 1.4x on this 2-core machine)
    pairs = [("exported", "plain", "exported_over_plain"), ("library_ingraph", "plain", "ingraph_over_plain"),
             ("library_torch", "library_ingraph", "torch_over_ingraph"),
             ("exported_recipro", "plain", "recipro_over_plain"),
             ("ovxai_recipro", "exported_recipro", "ovxai_over_recipro")]
    seen: dict = {}
    for a, b, name in pairs:
        if variants[a] is None or variants[b] is None:
            continue
        timings = interleaved({a: variants[a], b: variants[b]}, rounds, {a: calls[a], b: calls[b]})
        row[f"{name}_b{batch}"] = statistics.median(p / q for p, q in zip(timings[a], timings[b]))
        for key in (a, b):
            seen.setdefault(key, []).extend(timings[key])
    for key, values in seen.items():
        row[f"{key}_ms_b{batch}"] = 1000 * statistics.median(values)
    row[f"plain_batched_b{batch}"] = dynamic


def interleaved(variants: dict, rounds: int, calls: dict) -> dict:
    """{variant: per-round median seconds}: after one warm-up call of each, each round calls the variants
    in turn, one call each, ``calls[variant]`` times (the first of the turn rotating), so that a slow
    spell of a shared machine hits every variant alike, each call ``GAP`` seconds after the previous one
    ended (onnxruntime's pool threads spin for a while after a call; the gap lets them stop before the
    next variant's call). Blocks of one variant's calls, and alternations of six variants (sessions, a
    torch module, OpenVINO XAI's worker), put Lite0's exported model at 1.3-1.4x the plain one at batch
    1; its two sides alone alternate at 0.99x: ``_batch`` times each ratio that way."""
    for fn in variants.values():
        fn()
    keys = list(variants)
    out = {k: [] for k in keys}
    for _ in range(rounds):
        got = {k: [] for k in keys}
        for turn in range(max(calls.values())):
            for key in keys[turn % len(keys):] + keys[:turn % len(keys)]:
                if turn < calls[key]:
                    time.sleep(GAP)
                    start = time.perf_counter()
                    seconds = variants[key]()  # a float: the variant timed itself (another process)
                    got[key].append(seconds if isinstance(seconds, float) else time.perf_counter() - start)
        for key in keys:
            out[key].append(statistics.median(got[key]))
    return out


def public(rounds: int, repeats: int) -> list[dict]:
    """The public CAM calls against one forward (raw session / ``net.predict``), one image, alternating
    rounds; ratios are medians of per-round ratios."""
    from skimage import data

    import explainer

    net = explainer.load(device="cpu")
    rows = []
    chelsea = data.chelsea()
    for name, image in (("224 x 224 (the model's size)", np.ascontiguousarray(chelsea[40:264, 100:324])),
                        ("300 x 451 (resized for the model)", chelsea)):
        x = net.to_model_input(net.prepare(image)[0])
        label = int(np.argmax(net.predict(image)))
        variants = {
            "raw": lambda: net.ort.run(x, [net.output.name]),
            "predict": lambda: net.predict(image),
            "classify": lambda: net.classify(image),
            "gradcam": lambda: explainer.gradcam(net, image, label),
            "gradcam_plus_plus": lambda: explainer.gradcam_plus_plus(net, image, label),
        }
        timings = interleaved(variants, rounds, {k: repeats for k in variants})
        row = dict(image=name, engine=str(explainer.gradcam_engine(net)))
        for key, values in timings.items():
            row[f"{key}_ms"] = 1000 * statistics.median(values)
        for key in ("gradcam", "gradcam_plus_plus", "predict", "classify"):
            for base in ("raw", "predict"):
                if key != base:
                    row[f"{key}_over_{base}"] = statistics.median(
                        a / b for a, b in zip(timings[key], timings[base]))
        rows.append(row)
    return rows


def markdown(meta: dict, rows: list[dict], calls: list[dict] | None = None) -> str:
    lines = [f"# Explanations in the graph: latency ({meta['date']}, {meta['machine']}, load average "
             f"{meta['load_average_before']:.1f} at the start: other processes shared the cores)", "",
             "Median ms per call (batch of N images; graphs exported for batch 1 run image by image). "
             "exported: the model's own outputs plus Grad-CAM of the top class at the feature grid; "
             "library in-graph: `explainer.export.engine.cam_maps`; library torch: today's "
             "`BaseCAM.low_resolution` per image.", "",
             "| model | N | plain | exported | ratio | library in-graph | ratio to plain | library torch | torch / in-graph | size MB (exported) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for b in (1, 16):
            lines.append(f"| {r['model']} | {b} | {r[f'plain_ms_b{b}']:.1f} | {r[f'exported_ms_b{b}']:.1f} | "
                         f"{r[f'exported_over_plain_b{b}']:.2f} | {r[f'library_ingraph_ms_b{b}']:.1f} | "
                         f"{r[f'ingraph_over_plain_b{b}']:.2f} | {r[f'library_torch_ms_b{b}']:.1f} | "
                         f"{r[f'torch_over_ingraph_b{b}']:.1f} | {r['size_mb']:.1f} ({r['exported_mb']:.1f}) |")
    lines += ["", "Recipro-CAM exported (top-1 class at the feature grid) beside OpenVINO XAI's Recipro-CAM on the "
              "same file (float32, one image per call: its branch is written for one; its worker's own clock). "
              "theirs / ours above 1: the exported file is faster.", "",
              "| model | N | plain | Recipro-CAM exported | ratio to plain | OpenVINO XAI | theirs / ours | size MB |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for b in (1, 16):
            theirs = (f"{r[f'ovxai_recipro_ms_b{b}']:.1f} | {r[f'ovxai_over_recipro_b{b}']:.2f}"
                      if f"ovxai_recipro_ms_b{b}" in r else "not run | ")
            lines.append(f"| {r['model']} | {b} | {r[f'plain_ms_b{b}']:.1f} | {r[f'exported_recipro_ms_b{b}']:.1f} | "
                         f"{r[f'recipro_over_plain_b{b}']:.2f} | {theirs} | {r['recipro_mb']:.1f} |")
    if calls:
        lines += ["", "## The public calls, one image (EfficientNet-Lite0)", "",
                  "Median ms per call; ratios are medians of per-round ratios. raw: `net.ort.run` on the "
                  "prepared input (no resize, no normalisation); predict: `net.predict(image)` from the same "
                  "image (the same preprocessing as the CAMs).", "",
                  "| image | raw | predict | classify | gradcam | / raw | / predict | gradcam++ | / raw | / predict |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in calls:
            lines.append(f"| {c['image']} | {c['raw_ms']:.1f} | {c['predict_ms']:.1f} | {c['classify_ms']:.1f} | "
                         f"{c['gradcam_ms']:.1f} | {c['gradcam_over_raw']:.2f} | {c['gradcam_over_predict']:.2f} | "
                         f"{c['gradcam_plus_plus_ms']:.1f} | {c['gradcam_plus_plus_over_raw']:.2f} | "
                         f"{c['gradcam_plus_plus_over_predict']:.2f} |")
    lines += ["", f"Load average (1 min): {meta['load_average_before']:.2f} before, "
                  f"{meta.get('load_average_after', float('nan')):.2f} after."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for export.json and export.md")
    parser.add_argument("--ovxai-python", default=os.environ.get("OVXAI_PYTHON", "/work/ovxai-venv/bin/python"),
                        help="the Python of an environment with openvino-xai (its Recipro-CAM beside the exported "
                             "one; skipped where it does not exist)")
    args = parser.parse_args(argv)
    rounds, repeats = (2, 3) if args.quick else (args.rounds, args.repeats)
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                rounds=rounds, repeats=repeats, load_average_before=os.getloadavg()[0])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in files(args.quick):
            rows.append(bench(name, make, rounds, repeats, Path(tmp), args.ovxai_python))
            print(json.dumps(rows[-1], indent=1), flush=True)
    calls = public(rounds, repeats * 2)
    print(json.dumps(calls, indent=1), flush=True)
    meta["load_average_after"] = os.getloadavg()[0]
    text = markdown(meta, rows, calls)
    print(text)
    if not args.quick:
        args.out.mkdir(exist_ok=True, parents=True)
        (args.out / "export.json").write_text(json.dumps(dict(meta=meta, rows=rows, public_calls=calls), indent=1))
        (args.out / "export.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
