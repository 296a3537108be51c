"""Recipro-CAM beside OpenVINO XAI's, in one run on one machine, on the same ONNX files, float32.

    python -m benchmarks.recipro_cam [--quick] [--ovxai-python PATH]

Files: the embedded EfficientNet-Lite0 (the cached file ``explainer.load()`` reads), a torchvision
ResNet-18 and a timm ViT-Tiny (the seeded exports of tests/exports.py, from the export cache: legacy
exporter, batch axis dynamic for the ViT, since OpenVINO XAI's ViTReciproCAM refuses a static batch);
the chelsea photo, its preprocessed input fed to both sides.

* OpenVINO XAI (``openvino-xai`` 1.1.x pins ``numpy<2`` and ``openvino-dev==2024.4``, which the main venv
  cannot hold): run in its own venv (``--ovxai-python``, default ``/work/ovxai-venv/bin/python``, made
  with ``pip install openvino-xai onnxruntime``) by a worker script this module writes and runs: its
  ``ReciproCAM`` (CNNs) or ``ViTReciproCAM`` (transformers) with defaults, saliency unscaled
  (``embed_scaling=False``), the model compiled on the CPU as its ``prepare_model`` does (OpenVINO's
  defaults: the LATENCY hint, one stream, a thread per core) with ``INFERENCE_PRECISION_HINT=f32`` (its
  default on a CPU with bf16 support is bf16; the worker reads the compiled model's properties back and
  the run stops unless they say f32); timed: one ``model_forward`` (prediction and every class's map in
  one inference).
* ours, on onnxruntime and on the OpenVINO engine (``explainer.load(..., engine="openvino",
  precision="f32")``, the OpenVINO of the main venv): ``explainer.recipro_cam`` for one class end to
  end (the photo resized and normalised, the Recipro-CAM run, the map upsampled to the photo), and from
  the model input as theirs is timed (``input_maps`` of every class, as theirs gives every class: scaled
  maps at the feature resolution; the same preprocessed input fed to both), on the path
  ``explainer.recipro_cam_engine`` picks (in-graph at float32: one session of the graph with the
  exported branch, on CNNs and on ViT-Tiny's token layer since 2026-12-07; results before that ran the
  ViT in two stages); onnxruntime's plain forward pass of the same input.
* agreement: OpenVINO XAI takes the logits (pre-softmax scores), so ours runs with ``scores="logits"``
  for the comparison, at the feature layer's resolution, every class: Pearson r per class (min and
  median over the 1,000 classes) and max |difference| after both are min-max scaled; ours at its
  default (softmax probabilities, the paper's) is shown beside, for the top class.

Timing: OpenVINO XAI runs in a worker process of its venv, timed call by call inside it; per model, one
alternation per engine: the calls alternate one by one (ours end to end, ours from the model input,
theirs, that engine's plain forward pass; the first of them rotates turn by turn), ``repeats`` times,
after a warm-up of each, so that a slow spell of the shared machine hits all; each call starts ``GAP``
(20 ms) after the previous one ended, so that threads left spinning by the previous call (onnxruntime's
pool, OpenVINO's TBB workers; in either process) do not take the cores from the next; wall clock and CPU time
(the process's CPU seconds over the call, all threads: ours in this process, theirs in the worker; the work
a call costs whatever share of the shared machine's cores it gets); medians, and ratios as
medians of the per-turn ratios within an alternation. (Ours on onnxruntime and ours on OpenVINO in one
alternation slowed each other: the two runtimes' threads, in one process, compete for the cores right
after each other's calls.) Writes
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
#: seconds slept before each timed call: the previous call's runtime threads (onnxruntime's spinning pool
#: threads, OpenVINO's TBB workers, in this process or the worker's) are asleep again when the next starts
GAP = 0.02
TESTS = Path(__file__).resolve().parent.parent / "tests"
LABEL = 285

OV_SCRIPT = textwrap.dedent('''
    # OpenVINO XAI's Recipro-CAM as a worker: one line per command on stdin ("time": one timed call,
    # its seconds printed; "save PATH": the last saliency saved; "quit")
    import json, sys, time
    from importlib.metadata import version
    import numpy as np
    import openvino as ov
    from openvino_xai.common.utils import SALIENCY_MAP_OUTPUT_NAME
    from openvino_xai.methods.white_box.recipro_cam import ReciproCAM, ViTReciproCAM

    path, kind, data = sys.argv[1], sys.argv[2], sys.argv[3]
    mode = sys.argv[4] if len(sys.argv) > 4 else "input"
    x = np.load(data)
    if mode == "input":  # the method alone, timed from the preprocessed input, maps unscaled (for agreement)
        method = (ViTReciproCAM if kind == "tokens" else ReciproCAM)(ov.Core().read_model(path), embed_scaling=False,
                                                                     prepare_model=False)
        method.prepare_model(load_model=False)
    else:  # "end-to-end": as a new user calls it, the Explainer at its defaults on the photo
        import cv2
        import openvino_xai as xai
        from openvino_xai.explainer.explainer import ExplainMode
        photo, prep = np.load(sys.argv[5]), json.loads(sys.argv[6])

        def preprocess(image):  # the user's preprocess_fn: resize to the input, normalise as the model expects
            y = cv2.resize(image, (prep["size"][1], prep["size"][0]), interpolation=cv2.INTER_LINEAR)
            y = y[..., ::-1] if prep["bgr"] else y
            y = (y.astype(np.float32) * np.float32(prep["scale"]) - np.float32(prep["mean"])) / np.float32(prep["std"])
            return np.ascontiguousarray(y.transpose(2, 0, 1)[None])

        explainer = xai.Explainer(ov.Core().read_model(path), task=xai.Task.CLASSIFICATION, preprocess_fn=preprocess,
                                  explain_mode=ExplainMode.WHITEBOX,
                                  explain_method=xai.Method.VITRECIPROCAM if kind == "tokens" else xai.Method.RECIPROCAM)
        method = explainer.method
    # as prepare_model compiles it (ov.Core().compile_model(model, "CPU"): OpenVINO's defaults, i.e. the
    # LATENCY hint), with float32 asked for: on a CPU with bf16 the default precision is bf16
    method._model_compiled = ov.Core().compile_model(method._model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    if mode == "input":
        run = lambda: method.model_forward(x, preprocess=False)  # noqa: E731
        saliency = lambda result: np.asarray(result[SALIENCY_MAP_OUTPUT_NAME], np.float32)[0]  # noqa: E731
    else:
        run = lambda: explainer(photo, targets=[int(prep["label"])], colormap=False)  # noqa: E731
        saliency = lambda result: np.asarray(result.saliency_map[int(prep["label"])], np.float32)  # noqa: E731
    result = run()  # warm-up
    config = {k: getattr(v, "get_type_name", lambda: str(v))() for k in
              ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS")
              for v in [method._model_compiled.get_property(k)]}
    print(json.dumps({"openvino": ov.__version__, "openvino_xai": version("openvino-xai"), "config": config}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "time":
            start, cpu = time.perf_counter(), time.process_time()
            result = run()
            print(time.perf_counter() - start, time.process_time() - cpu, flush=True)
        elif command[0] == "save":
            np.save(command[1], saliency(result))
            print("saved", flush=True)
        else:
            break
''')


def files() -> list[tuple[str, str, dict]]:
    """(name, path, load keywords) of the three files."""
    sys.path.insert(0, str(TESTS))
    import exports
    from explainer.zoo import registry

    return [("EfficientNet-Lite0", str(registry.REGISTRY["efficientnet_lite0"].fetch()), {}),
            ("ResNet-18 (torchvision, seeded)", str(exports.export("resnet18", "legacy")), {"preprocessing": "imagenet"}),
            ("ViT-Tiny (timm, seeded)", str(exports.export("vit_tiny", "legacy-dynamic")), {"preprocessing": "imagenet"})]


class Theirs:
    """OpenVINO XAI's Recipro-CAM in a worker process of the other venv, timed call by call."""

    def __init__(self, python: str, script: Path, path: str, kind: str, x: np.ndarray, tmp: Path,
                 photo: np.ndarray | None = None, prep: dict | None = None):
        """``photo`` and ``prep`` given: its ``Explainer`` at its defaults, called on the photo for class
        ``prep["label"]`` with the user's ``preprocess_fn`` (resize to ``prep["size"]``, normalise), the map
        resized to the photo (its ``resize=True``, ``colormap=False``); else the method alone from ``x``."""
        mode = "input" if photo is None else "end-to-end"
        data = tmp / "x.npy"
        np.save(data, x)
        extra = []
        if photo is not None:
            np.save(tmp / "photo.npy", photo)
            extra = [mode, str(tmp / "photo.npy"), json.dumps(prep)]
        self.tmp = tmp
        self.log = tmp / f"ovxai-{mode}.log"  # a file, not a pipe: a chatty worker cannot block on it
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([python, str(script), path, kind, str(data), *extra], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log, text=True)
        first = self.process.stdout.readline()
        if not first:
            raise RuntimeError(f"OpenVINO XAI failed on {path}:\n{self.log.read_text()[-3000:]}")
        self.meta = json.loads(first)

    def ask(self, line: str) -> str:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def time(self) -> tuple[float, float]:
        """(wall-clock, CPU seconds of the worker's threads) of one call."""
        wall, cpu = self.ask("time").split()
        return float(wall), float(cpu)

    def saliency(self) -> np.ndarray:
        out = self.tmp / f"saliency-{self.log.stem}.npy"
        self.ask(f"save {out}")
        return np.load(out)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
        self.process.wait(timeout=60)


def agreement(ours: np.ndarray, other: np.ndarray) -> dict:
    """Per-class Pearson r over the classes whose maps vary on both sides, and max |difference| after
    min-max scaling both."""
    from explainer.methods.recipro_cam import normalise

    rs = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(ours, other)
          if a.std() > 0 and b.std() > 0]
    return dict(classes=len(rs), r_min=min(rs), r_median=float(np.median(rs)),
                max_abs_diff=float(np.abs(normalise(ours.astype(np.float64)) - normalise(other.astype(np.float64))).max()))


def bench(name: str, path: str, keywords: dict, image, python: str, script: Path, repeats: int, tmp: Path) -> dict:
    import explainer
    from explainer.methods.gradcam import default_feature_layer
    from explainer.methods.recipro_cam import head_of, input_maps, low_resolution, recipro_cam

    net = explainer.load(path, batch_size=1, **keywords)
    ov = explainer.load(path, batch_size=1, engine="openvino", precision="f32", **keywords)
    layer = net.layer(default_feature_layer(net)[0])
    head = head_of(net, layer)
    small = net.fit_pixels(image)
    x = net.to_model_input(small[None])
    every = list(range(net.num_classes))
    ours_logits = low_resolution(net, small, layer, every, scores="logits")
    ov_logits = low_resolution(ov, small, ov.layer(layer.name), every, scores="logits")
    two_stage = low_resolution(net, small, layer, every, scores="logits", path="two-stage")
    top = int(np.argmax(net.predict(image)))
    ours_default = low_resolution(net, small, layer, [top])[0]
    paths = {"onnxruntime": explainer.recipro_cam_engine(net), "openvino": explainer.recipro_cam_engine(ov)}

    def public(n):
        return lambda: recipro_cam(n, image, LABEL, verbose=False)

    def core(n):  # from the model input, as theirs: backbone pass, head on the copies, every class's scaled map
        l = n.layer(layer.name)
        return lambda: input_maps(n, l, x, every)

    def forward(n):
        return lambda: n.ort.run(x, [n.output.name])

    # one alternation per engine (ours end to end, ours from the input, theirs end to end and from the input,
    # that engine's forward): onnxruntime's and OpenVINO's threads in one process, called turn by turn, slow
    # each other down
    other = Theirs(python, script, path, head.layout.kind, x, tmp)
    prep = net.preprocessing
    if net.input.layout != "NCHW":
        raise RuntimeError(f"the end-to-end worker feeds NCHW; {name} takes {net.input.layout}")
    whole = Theirs(python, script, path, head.layout.kind, x, tmp, photo=image,
                   prep=dict(size=list(net.per_image_shape[1:]), mean=list(prep.mean), std=list(prep.std),
                             scale=prep.scale, bgr=prep.channel_order == "BGR", label=LABEL))
    blocks = {e: {"public": public(n), "core": core(n), "theirs": other, "theirs_e2e": whole, "forward": forward(n)}
              for e, n in (("onnxruntime", net), ("openvino", ov))}
    times, cpu = {}, {}
    try:
        for engine, calls in blocks.items():
            got = times[engine] = {k: [] for k in calls}
            used = cpu[engine] = {k: [] for k in calls}
            for fn in calls.values():
                if not isinstance(fn, Theirs):
                    fn()
            order = list(calls.items())
            for turn in range(repeats):  # one call of each in turn: a slow spell of the machine hits all
                for key, fn in order[turn % len(order):] + order[:turn % len(order)]:  # who goes first rotates
                    time.sleep(GAP)
                    if isinstance(fn, Theirs):
                        wall, seconds = fn.time()
                        got[key].append(wall)
                        used[key].append(seconds)
                        continue
                    start, seconds = time.perf_counter(), time.process_time()
                    fn()
                    got[key].append(time.perf_counter() - start)
                    used[key].append(time.process_time() - seconds)
        their_maps = other.saliency()
        their_photo_map = whole.saliency()
        meta = other.meta
        for worker in (other, whole):
            if "f32" not in worker.meta["config"]["INFERENCE_PRECISION_HINT"]:
                raise RuntimeError(f"OpenVINO XAI did not compile at float32: {worker.meta['config']}")
    finally:
        other.close()
        whole.close()
    ours_photo_map = recipro_cam(ov, image, LABEL, verbose=False)
    ms = {e: {k: 1000 * statistics.median(v) for k, v in t.items()} for e, t in times.items()}
    pair = lambda e, a, b, t=times: statistics.median(np.divide(t[e][a], t[e][b]))  # noqa: E731
    band = lambda e, a, b: interval(np.divide(times[e][a], times[e][b]))  # noqa: E731
    cpu_ms = {e: {k: 1000 * statistics.median(v) for k, v in t.items()} for e, t in cpu.items()}
    row = dict(model=name, file=Path(path).name, layer=layer.name, layout=head.layout.describe(),
               masked=list(head.inputs), copies=head.layout.grid[0] * head.layout.grid[1],
               path_onnxruntime=paths["onnxruntime"].describe(), path_openvino=paths["openvino"].describe(),
               ours_ms=ms["onnxruntime"]["public"], ours_core_ms=ms["onnxruntime"]["core"],
               theirs_ms=ms["onnxruntime"]["theirs"], forward_ms=ms["onnxruntime"]["forward"],
               ours_ov_ms=ms["openvino"]["public"], ours_ov_core_ms=ms["openvino"]["core"],
               theirs_ov_block_ms=ms["openvino"]["theirs"], forward_ov_ms=ms["openvino"]["forward"],
               theirs_over_ours_core=pair("onnxruntime", "theirs", "core"),
               theirs_over_ours_ov_core=pair("openvino", "theirs", "core"),
               theirs_over_ours_core_ci=band("onnxruntime", "theirs", "core"),
               theirs_e2e_ms=ms["onnxruntime"]["theirs_e2e"], theirs_e2e_ov_block_ms=ms["openvino"]["theirs_e2e"],
               theirs_e2e_over_ours=pair("onnxruntime", "theirs_e2e", "public"),
               theirs_e2e_over_ours_ov=pair("openvino", "theirs_e2e", "public"),
               theirs_e2e_over_ours_ci=band("onnxruntime", "theirs_e2e", "public"),
               theirs_e2e_over_ours_ov_ci=band("openvino", "theirs_e2e", "public"),
               r_end_to_end=float(np.corrcoef(ours_photo_map.ravel(), their_photo_map.ravel())[0, 1]),
               end_to_end_shapes=[list(ours_photo_map.shape), list(their_photo_map.shape)],
               theirs_over_ours_ov_core_ci=band("openvino", "theirs", "core"),
               ours_core_cpu_ms=cpu_ms["onnxruntime"]["core"], theirs_cpu_ms=cpu_ms["onnxruntime"]["theirs"],
               ours_ov_core_cpu_ms=cpu_ms["openvino"]["core"], theirs_ov_block_cpu_ms=cpu_ms["openvino"]["theirs"],
               theirs_over_ours_core_cpu=pair("onnxruntime", "theirs", "core", cpu),
               theirs_over_ours_ov_core_cpu=pair("openvino", "theirs", "core", cpu),
               ours_core_over_forward=pair("onnxruntime", "core", "forward"),
               ours_ov_core_over_forward=pair("openvino", "core", "forward"),
               logits=agreement(ours_logits, their_maps), logits_openvino=agreement(ov_logits, their_maps),
               ov_vs_ort_max_abs_diff=float(np.abs(ov_logits - ours_logits).max()),
               in_graph_vs_two_stage_max_abs_diff=float(np.abs(ours_logits - two_stage).max()), top_class=top,
               r_default_top=float(np.corrcoef(ours_default.ravel(), their_maps[top].ravel())[0, 1]),
               openvino=meta.get("openvino"), openvino_xai=meta.get("openvino_xai"), theirs_config=meta["config"],
               ours_openvino_config=_ov_config(ov, layer.name), ours_onnxruntime_options=_ort_options(net, layer.name),
               openvino_ours=__import__("openvino").__version__)
    print(json.dumps(row), flush=True)
    return row


def interval(ratios, level: float = 0.95, resamples: int = 4000) -> list[float]:
    """A percentile-bootstrap interval of the median of per-turn ratios (seeded: the same turns give the
    same interval): how far the median could move by the turns' scatter alone."""
    ratios = np.asarray(ratios, np.float64)
    rng = np.random.default_rng(0)
    medians = np.median(ratios[rng.integers(0, len(ratios), (resamples, len(ratios)))], axis=1)
    return [float(v) for v in np.quantile(medians, [(1 - level) / 2, (1 + level) / 2])]


def _band(r: dict, key: str) -> str:
    low, high = r.get(key) or (float("nan"), float("nan"))
    return f"{low:.2f}–{high:.2f}"


def _config(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items()) or "-"


def _ov_config(net, layer: str) -> dict:
    """How our in-graph OpenVINO session was compiled (the properties OpenVINO reports)."""
    from explainer.methods.recipro_cam import _in_graph_entry

    session = _in_graph_entry(net, net.layer(layer), "auto")[1]
    if session is None:  # two stages: the head's engine
        return {}
    return {k: getattr(v, "get_type_name", lambda: str(v))() for k in
            ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS")
            for v in [session.compiled.get_property(k)]}


def _ort_options(net, layer: str) -> dict:
    """How our in-graph onnxruntime session was opened."""
    from explainer.methods.recipro_cam import _in_graph_entry

    session = _in_graph_entry(net, net.layer(layer), "auto")[1]
    if session is None:
        return {}
    options = session.get_session_options()
    try:
        spinning = options.get_session_config_entry("session.intra_op.allow_spinning")
    except Exception:  # noqa: BLE001 - not set: onnxruntime's default
        spinning = "1 (default)"
    return dict(graph_optimization_level=str(options.graph_optimization_level).split(".")[-1],
                intra_op_num_threads=options.intra_op_num_threads or "default (one per core)",
                allow_spinning=spinning)


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Recipro-CAM beside OpenVINO XAI ({meta['date']})", "",
             f"Machine: {meta['cpu']}; {meta['cpus']} CPUs; onnxruntime {meta['onnxruntime']}; ours on OpenVINO "
             f"{rows[0]['openvino_ours']} (`engine=\"openvino\", precision=\"f32\"`); theirs: OpenVINO "
             f"{rows[0]['openvino']}, openvino-xai {rows[0]['openvino_xai']} (float32: "
             f"INFERENCE_PRECISION_HINT=f32, read back from the compiled model: {_config(rows[0]['theirs_config'])}); "
             f"ours on OpenVINO compiled with {_config(rows[0]['ours_openvino_config'])}; ours on onnxruntime: "
             f"{_config(rows[0]['ours_onnxruntime_options'])}. Chelsea; medians of {meta['repeats']} "
             f"calls of each, alternating call by call, {1000 * GAP:.0f} ms apart. Load average (1 / 5 minutes) "
             f"before: {meta['load1_before']:.2f} / {meta['load_before']:.2f}, after: {meta['load1_after']:.2f} / "
             f"{meta['load_after']:.2f} on {meta['cpus']} CPUs.", "",
             "| model | layer | copies | path (onnxruntime / OpenVINO) | engine | ours from the input (ms) "
             "| OpenVINO XAI from the input (ms) | theirs / ours (from the input) | 95 % interval "
             "| ours end to end (ms) | OpenVINO XAI end to end (ms) | theirs / ours (end to end) | 95 % interval "
             "| ours (from the input) / forward | CPU ms per call, ours (from the input) / theirs | theirs / ours, CPU time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p_ort, p_ov = (r[k].split(" ")[0] for k in ("path_onnxruntime", "path_openvino"))
        first = (f"| {r['model']} | `{r['layer']}` ({r['layout']}; {len(r['masked'])} masked) | {r['copies']} | "
                 f"{p_ort} / {p_ov} ")
        lines.append(first + f"| onnxruntime | {r['ours_core_ms']:.1f} | {r['theirs_ms']:.1f} | "
                     f"**{r['theirs_over_ours_core']:.2f}** | {_band(r, 'theirs_over_ours_core_ci')} | "
                     f"{r['ours_ms']:.1f} | {r['theirs_e2e_ms']:.1f} | **{r['theirs_e2e_over_ours']:.2f}** | "
                     f"{_band(r, 'theirs_e2e_over_ours_ci')} | "
                     f"{r['ours_core_over_forward']:.2f} | {r['ours_core_cpu_ms']:.1f} / {r['theirs_cpu_ms']:.1f} | "
                     f"{r['theirs_over_ours_core_cpu']:.2f} |")
        lines.append(f"| | | | | OpenVINO f32 | {r['ours_ov_core_ms']:.1f} | {r['theirs_ov_block_ms']:.1f} | "
                     f"**{r['theirs_over_ours_ov_core']:.2f}** | {_band(r, 'theirs_over_ours_ov_core_ci')} | "
                     f"{r['ours_ov_ms']:.1f} | {r['theirs_e2e_ov_block_ms']:.1f} | **{r['theirs_e2e_over_ours_ov']:.2f}** | "
                     f"{_band(r, 'theirs_e2e_over_ours_ov_ci')} | {r['ours_ov_core_over_forward']:.2f} | "
                     f"{r['ours_ov_core_cpu_ms']:.1f} / {r['theirs_ov_block_cpu_ms']:.1f} | "
                     f"{r['theirs_over_ours_ov_core_cpu']:.2f} |")
    lines += ["", "Agreement with OpenVINO XAI (ours with `scores=\"logits\"`, what it scores; every class, feature "
              "resolution):", "",
              "| model | r min (median), ours onnxruntime | max abs diff | r min (median), ours OpenVINO f32 "
              "| max abs diff | r top class, ours default | r end to end (class 285, photo size) |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["logits"], r["logits_openvino"]
        lines.append(f"| {r['model']} | {a['r_min']:.6f} ({a['r_median']:.6f}) | {a['max_abs_diff']:.1e} | "
                     f"{b['r_min']:.6f} ({b['r_median']:.6f}) | {b['max_abs_diff']:.1e} | {r['r_default_top']:.4f} | "
                     f"{r['r_end_to_end']:.4f} |")
    lines += ["", "Paths (`explainer.recipro_cam_engine(net).describe()`):", ""]
    for r in rows:
        lines.append(f"- {r['model']}: onnxruntime: {r['path_onnxruntime']}; OpenVINO: {r['path_openvino']}. "
                     "Maps (all classes, logits): " + (
                         f"in-graph vs two-stage max abs diff {r['in_graph_vs_two_stage_max_abs_diff']:.1e}; "
                         if r["path_onnxruntime"].startswith("in-graph") else "")
                     + f"ours on OpenVINO f32 vs ours on onnxruntime {r['ov_vs_ort_max_abs_diff']:.1e}.")
    lines += ["", "ours end to end: `explainer.recipro_cam(net, image, 285)` (the 451 x 300 photo resized and "
              "normalised, the Recipro-CAM run, class 285's map upsampled to the photo), on a classifier loaded with "
              "onnxruntime, then on one loaded with `engine=\"openvino\", precision=\"f32\"`. ours from the "
              "input: from the same preprocessed input to every class's map at the feature resolution (softmax "
              "probabilities, min-max scaled: `input_maps(net, layer, x, range(1000))`), as OpenVINO XAI is "
              "timed: one `model_forward(x, preprocess=False)` of its model with the Recipro-CAM branch inserted "
              "(its prediction and every class's unscaled map of logits, no upsampling); both warm. OpenVINO XAI end "
              "to end: as a new user calls it, `xai.Explainer(model, task=CLASSIFICATION, preprocess_fn=..., "
              "explain_mode=WHITEBOX, explain_method=RECIPROCAM (VITRECIPROCAM on tokens))` at its defaults (maps "
              "scaled in its graph) compiled at f32, called `explainer(photo, targets=[285], colormap=False)`: "
              "the user's preprocess_fn (OpenCV's bilinear resize to the input size, the model's normalisation), "
              "the inference, class 285's map resized to the photo (its `resize=True`). in-graph: one session of the classifier's graph with the exported Recipro-CAM branch "
              "(backbone, masked copies, head); two-stage: the backbone pass, then the head on the masked copies. "
              "Timing: per model, one alternation per engine of ours (end to end, from the input), theirs and "
              "that engine's plain forward pass, call by call, the first call rotating turn by turn (two "
              "engines' thread pools in one process, called turn by turn, slow each other down on 2 cores), "
              f"each call {1000 * GAP:.0f} ms after the previous one ends (so that no runtime's threads still spin "
              "from the previous call, ours or theirs, when the next starts); "
              "CPU time: the process's CPU seconds over the call, all its threads (ours: this process; theirs: its "
              "worker), the work a call costs whatever share of the cores it gets (a spinning thread's wait counts "
              "too), less sensitive to the other load of a shared machine than the wall clock; "
              "theirs runs in every turn of both, so each ratio is the median of per-turn ratios within one "
              "alternation (above 1: ours faster); 95 % interval: a percentile bootstrap of that median over "
              "the turns (4,000 resamples, seeded): where it lies wholly above 1, ours is faster beyond the "
              "turns' scatter. forward: "
              "the plain forward pass of the same input on the same engine. r: Pearson correlation of ours with "
              "`scores=\"logits\"` and theirs at the feature resolution, per class over the classes whose maps "
              "vary (r end to end: ours on OpenVINO f32 and theirs, both at the photo's size, from the photo: the two "
              "resizes differ); max abs diff: after min-max scaling both to [0, 1]. Last column: ours at its default "
              "(softmax probabilities, as the paper) against theirs, top class: the two score definitions differ "
              "there, not the implementations.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats; prints only")
    parser.add_argument("--ovxai-python", default=os.environ.get("OVXAI_PYTHON", "/work/ovxai-venv/bin/python"),
                        help="a python with openvino-xai installed")
    args = parser.parse_args(argv)
    import onnxruntime

    import explainer

    repeats = 5 if args.quick else 60
    image = explainer.sample_image("chelsea")
    load1_before, load_before = os.getloadavg()[:2]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "ovxai_recipro_cam.py"
        script.write_text(OV_SCRIPT)
        for name, path, keywords in files():
            rows.append(bench(name, path, keywords, image, args.ovxai_python, script, repeats, Path(tmp)))
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), cpu=cpu_model(),
                cpus=len(os.sched_getaffinity(0)), onnxruntime=onnxruntime.__version__, python=platform.python_version(),
                repeats=repeats, load1_before=load1_before, load_before=load_before,
                load1_after=os.getloadavg()[0], load_after=os.getloadavg()[1])
    text = markdown(meta, rows)
    print(text)
    print("\ntheirs / ours from the model input (above 1: ours faster); load average 1 / 5 min before "
          f"{load1_before:.2f} / {load_before:.2f}, after {meta['load1_after']:.2f} / {meta['load_after']:.2f}:")
    for r in rows:
        print(f"  {r['model']}: onnxruntime {r['theirs_over_ours_core']:.2f} ({_band(r, 'theirs_over_ours_core_ci')}), "
              f"OpenVINO f32 {r['theirs_over_ours_ov_core']:.2f} ({_band(r, 'theirs_over_ours_ov_core_ci')}) (CPU time {r['theirs_over_ours_core_cpu']:.2f} / "
              f"{r['theirs_over_ours_ov_core_cpu']:.2f}; end to end {r['theirs_e2e_over_ours']:.2f} / "
              f"{r['theirs_e2e_over_ours_ov']:.2f}); r min {r['logits']['r_min']:.6f} / {r['logits_openvino']['r_min']:.6f}")
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "recipro_cam.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
        (RESULTS / "recipro_cam.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
