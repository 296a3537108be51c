"""Every speed claim in one run, on one machine: our methods beside their peers and beside the
forward-pass limit (onnxruntime on the same number of images at its best batch size).

    python -m benchmarks            # full run
    python -m benchmarks --quick    # fewer repeats and samples
    python -m benchmarks --only rise,scorecam   # some parts (see --help)

Writes ``benchmarks/results/latest.json`` and ``latest.md`` (``--quick``: ``quick.*``); a full run of
every part also rewrites the table in README.md's "Speed" section. Medians over repeats; ratios are
computed within the run; the run's duration and load average are in its machine line. Peers that
need their own set-up run in their own benchmarks: ``benchmarks.rise`` (DIANNA), ``benchmarks.openvino``
(OpenVINO XAI, writes its own README table), ``benchmarks.transformers``, ``benchmarks.export``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).with_name("results")


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired(ours, other, repeats: int, calls: int = 1) -> tuple[float, float, float]:
    """(median seconds per call of ``ours``, of ``other``, median of the per-round ratios ours / other):
    each round times ``calls`` calls of one, then of the other, after one warm-up each, so that a slow
    spell of a shared machine hits both sides."""
    ours()
    other()
    a, b = [], []
    for _ in range(repeats):
        for fn, times in ((ours, a), (other, b)):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - start) / calls)
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b))


def forward_pass(net, count: int, batch: int, streams: int | None = None):
    """onnxruntime on ``count`` images (prepared once) at batch size ``batch``: the forward-pass limit.
    ``streams`` batches run at once on single-threaded sessions, as the library runs them (default:
    the engine's choice); ``streams=1`` is one multi-threaded session run after run."""
    from concurrent.futures import ThreadPoolExecutor

    x = net.to_model_input(np.full((count, *net.input.size, net.input.channels), 120, np.float32))
    starts = range(0, count, batch)
    streams = min(net.ort.parallel_streams() if streams is None else streams, len(starts))
    output = net.output.name
    session = net.ort.session([output], single_thread=streams > 1)
    one = lambda i: session.run([output], {net.input.name: x[i:i + batch]})
    if streams <= 1:
        return lambda: [one(i) for i in starts]

    def parallel():
        with ThreadPoolExecutor(streams) as pool:
            return list(pool.map(one, starts))
    return parallel


def best_batch(net, count: int, sizes=(1, 2, 4, 8, 16, 32)) -> int:
    """onnxruntime's fastest batch size for ``count`` images on this machine (one timing each)."""
    return min(sizes, key=lambda b: timed(forward_pass(net, count, b), 1))


class NativeLite0:
    """The natively defined torch EfficientNet-Lite0 taking pixels (N, 3, H, W) in 0..255."""

    def __init__(self):
        import torch
        from explainer.zoo.efficientnet_lite0 import pretrained

        core = pretrained()

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.core = core

            def forward(self, x):
                return self.core((x - 127.0) / 128.0)

        self.model = Model().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)


# Occlusion against Captum, each side built in its own process (isolated.py): the same 15 x 15 windows
# at stride 10 inside the image, filled with 120, class 285.
def our_occlusion(image, batch: int):
    import explainer

    net = explainer.load()
    return lambda: explainer.occlusion_sensitivity(net, image, 285, mask_size=15, stride=10, mask_value=120,
                                                   mask_clipping=False, batch_size=batch, verbose=False)


def captum_occlusion(image, ppe: int):
    import torch
    from captum.attr import Occlusion

    warnings.filterwarnings("ignore")
    model = NativeLite0().model
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    occlusion = Occlusion(lambda t: torch.softmax(model(t), 1))

    def run():
        with torch.no_grad():
            return occlusion.attribute(x, sliding_window_shapes=(3, 15, 15), strides=(3, 10, 10), baselines=120.0,
                                       target=285, perturbations_per_eval=ppe)
    return run


def captum_best_ppe(image, candidates) -> int:
    return min(candidates, key=lambda ppe: timed(captum_occlusion(image, ppe), 1))


def bench_blackbox(rows, net, name, image, quick, repeats, peers=False, sizes=(1, 2, 4, 8, 16, 32),
                   lime_samples=1000):
    """Occlusion and LIME against the forward limit; with ``peers`` (the default model, which has a
    native torch definition) also against Captum and the lime package."""
    import explainer

    # occlusion: MATLAB-like defaults at stride 10 / mask 15 (23 x 23 = 529 masks on 224 x 224)
    def occlusion_at(size):
        return lambda: explainer.occlusion_sensitivity(net, image, 285, mask_size=15, stride=10, batch_size=size,
                                                       verbose=False)

    n_masks = len(range(0, net.input.size[0], 10)) * len(range(0, net.input.size[1], 10))
    b = best_batch(net, n_masks + 1, sizes)
    ours, limit, ratio = paired(occlusion_at(b), forward_pass(net, n_masks + 1, b), repeats)
    rows.append(dict(model=name, method="occlusion", what=f"{n_masks} masks, ours (default "
                     f"incremental=\"auto\": {incremental_path(net)}) vs forward limit",
                     ours_s=ours, other_s=limit, ratio=ratio, batch=b))
    auto = net.stream_batch_size  # what batch_size="auto" picks (measured here once, untimed, if not cached)
    if auto == b:
        ours_auto, ours_best, auto_ratio = ours, ours, 1.0
    else:
        ours_auto, ours_best, auto_ratio = paired(occlusion_at("auto"), occlusion_at(b), repeats)
    rows.append(dict(model=name, method="occlusion", what=f'batch_size="auto" (picks {auto}) vs the best '
                     f"batch size for this run ({b})", ours_s=ours_auto, other_s=ours_best,
                     ratio=auto_ratio, batch=auto))
    streams, one_session, gain = paired(forward_pass(net, n_masks + 1, b), forward_pass(net, n_masks + 1, b, 1), repeats)
    rows.append(dict(model=name, method="forward", what=f"{n_masks + 1} images at batch {b}: "
                     f"{net.ort.parallel_streams()} single-threaded streams vs one multi-threaded session",
                     ours_s=streams, other_s=one_session, ratio=gain, batch=b))
    if peers:
        from . import isolated

        # Captum's windows lie inside the image: ours with mask_clipping=False slides the same ones.
        # onnxruntime and torch each run in their own process (see isolated.py).
        n_windows = len(range(0, net.input.size[0] - 15 + 1, 10)) * len(range(0, net.input.size[1] - 15 + 1, 10))
        ppe = isolated.call("benchmarks.run:captum_best_ppe", image, (16,) if quick else (1, 16, 64))
        ours, other, ratio = isolated.paired(("benchmarks.run:our_occlusion", (image, b)),
                                             ("benchmarks.run:captum_occlusion", (image, ppe)), repeats)
        rows.append(dict(model=name, method="occlusion", what=f"Captum Occlusion, the same {n_windows} windows "
                         f"(native torch, best perturbations_per_eval={ppe}; each side in its own process) / "
                         "ours (defaults: incremental where it pays)", ours_s=ours, other_s=other, ratio=1 / ratio,
                         batch=b))
    # LIME: the overhead over the forward passes (all samples drawn), then against the lime package at
    # equal num_samples, ours with today's defaults (num_samples=2048, sampling stops once the top-5
    # superpixels are stable under bootstrap refits; the row says how many it drew and why)
    samples = 200 if quick else lime_samples
    b = best_batch(net, samples, sizes)
    ours, limit, ratio = paired(lambda: explainer.image_lime(net, image, 285, num_samples=samples, random_state=0,
                                                             stop_tolerance=None, verbose=False, batch_size=b),
                                forward_pass(net, samples, b), repeats)
    rows.append(dict(model=name, method="lime", what=f"{samples} samples (all drawn), ours vs forward limit",
                     ours_s=ours, other_s=limit, ratio=ratio, batch=b))
    if peers:
        from lime.lime_image import LimeImageExplainer

        samples = 256 if quick else LIME_DEFAULT_SAMPLES
        exp = explainer.lime_explanation(net, image, 285, num_samples=samples, random_state=0, verbose=False)
        used, reason = len(exp.samples), exp.stop_reason
        small = net.fit_pixels(image.astype(np.float32))
        classifier = lambda imgs: net.predict_model_input(net.to_model_input(np.asarray(imgs, np.float32)), 16)

        def lime_package(batch):
            return LimeImageExplainer(random_state=0).explain_instance(
                small, classifier, labels=(285,), top_labels=None, num_samples=samples, batch_size=batch,
                segmentation_fn=lambda _: exp.segments, random_seed=0)

        default = timed(lambda: lime_package(10), 1)
        best = 10 if quick else min((10, 1), key=lambda batch: default if batch == 10 else
                                    timed(lambda: lime_package(batch), 1))
        ours, other, ratio = paired(lambda: explainer.image_lime(net, image, 285, num_samples=samples,
                                                                 random_state=0, verbose=False),
                                    lambda: lime_package(best), 1 if quick else 2)
        rows.append(dict(model=name, method="lime", what=f"lime package, num_samples={samples}, all drawn "
                         f"(default batch_size=10: {default:.2f} s; best batch_size={best}) / ours at its "
                         f"defaults (num_samples={samples}, stop_tolerance=0.1: {reason})", ours_s=ours,
                         other_s=other, ratio=1 / ratio, used=used))


LIME_DEFAULT_SAMPLES = 2048  # image_lime's default num_samples


def incremental_path(net) -> str:
    """What occlusion's incremental="auto" ran last on ``net``, in a few words."""
    from explainer.runtime import incremental

    decision = incremental.last_decision(net)
    if decision is None:
        return "not decided"
    return "incremental" if decision.incremental else "plain"


def bench_incremental(rows, net, name, image, repeats):
    """Occlusion's incremental inference (recompute per mask only what the mask changes) against the plain
    path (every masked image forwarded whole, the forward limit's work), same 529 masks, each at the
    library's batch_size="auto"."""
    from .incremental_occlusion import occlusion

    options = dict(mask_size=15, stride=10)
    n_masks = len(range(0, net.input.size[0], 10)) * len(range(0, net.input.size[1], 10))
    inc, plain, ratio = paired(occlusion(net, image, "auto", True, **options),
                               occlusion(net, image, "auto", False, **options), repeats)
    rows.append(dict(model=name, method="occlusion", what=f"{n_masks} masks: incremental=True / incremental=False "
                     "(plain: each masked image forwarded whole), both batch_size=\"auto\"", ours_s=inc,
                     other_s=plain, ratio=ratio))


def bench_rise(rows, net, name, image, quick, repeats, sizes=(1, 2, 4, 8, 16, 32)):
    """RISE (default estimator) against the forward limit on the same number of masks; peers: DIANNA in
    ``python -m benchmarks.rise``, OpenVINO XAI in ``python -m benchmarks.openvino``."""
    import explainer

    masks = 250 if quick else 1000
    b = best_batch(net, masks, sizes)
    ours, limit, ratio = paired(lambda: explainer.rise(net, image, 285, num_masks=masks, batch_size=b,
                                                       random_state=0, verbose=False),
                                forward_pass(net, masks, b), repeats)
    rows.append(dict(model=name, method="rise", what=f"{masks} masks, ours vs forward limit", ours_s=ours,
                     other_s=limit, ratio=ratio, batch=b))


def bench_score_cam(rows, net, name, image, quick, repeats):
    """Score-CAM (one forward pass per channel of the feature layer) against the forward limit on as
    many images, at the default layer; against pytorch-grad-cam's ScoreCAM (the reference the tests
    match to 1e-4) on the converted module at a 32-channel layer, where its 16-image torch batches
    take seconds rather than minutes."""
    import torch
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    import explainer
    from explainer.runtime.feature_layers import default_feature_layer
    from explainer.runtime.torch_engine import torch_engine

    layer = default_feature_layer(net)[0]
    channels = int(net.activations(image, layer).shape[0])
    b = net.stream_batch_size
    ours, limit, ratio = paired(lambda: explainer.score_cam(net, image, 285, verbose=False),
                                forward_pass(net, channels, b), 1 if quick else 2)
    rows.append(dict(model=name, method="score-cam", what=f"{channels} channels of the default layer {layer}: "
                     "ours (batch_size=\"auto\") vs forward limit at the same batch size", ours_s=ours,
                     other_s=limit, ratio=ratio, batch=b))
    shallow = "/Clip"
    channels = int(net.activations(image, shallow).shape[0])
    engine = torch_engine(net)
    module = engine.module_for(shallow)[0]
    x = engine.tensor(net.fit_pixels(image)).permute(2, 0, 1)[None].contiguous()
    cam = ScoreCAM(model=engine.pixel_model, target_layers=[module])
    cam.batch_size = 16

    def theirs():
        with torch.no_grad():
            return cam(input_tensor=x, targets=[ClassifierOutputTarget(285)])
    ours, other, ratio = paired(lambda: explainer.score_cam(net, image, 285, feature_layer=shallow, verbose=False),
                                theirs, repeats)
    rows.append(dict(model=name, method="score-cam", what=f"pytorch-grad-cam ScoreCAM on the converted module "
                     f"(batch 16), {channels} channels of {shallow} / ours", ours_s=ours, other_s=other,
                     ratio=1 / ratio))


def bench_transformers(rows, quick):
    """Attention rollout against one forward pass and transformer attribution against one forward +
    backward pass, on the tests' 224-pixel vit_tiny (``benchmarks.transformers.speed``)."""
    import sys

    import explainer
    from . import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import exports

    net = explainer.load(exports.export("vit_tiny", "legacy"), preprocessing="imagenet")
    name = "vit_tiny (224 px, seeded)"
    for r in transformers.speed(net, name, explainer.sample_image("chelsea"), quick):
        if "16 images" in r["baseline"]:
            continue
        rows.append(dict(model=name, method=r["method"].replace("_", " "), what=f"ours / {r['baseline']}",
                         ours_s=r["ours_s"], other_s=r["base_s"], ratio=r["ratio"]))


def bench_export(rows, quick):
    """The exported model (Grad-CAM of the top class in the graph) against the plain model, and the
    library's torch Grad-CAM against its in-graph path (``benchmarks.export.bench``, EfficientNet-Lite0)."""
    import tempfile

    from . import export

    (name, make), = export.files(True)
    with tempfile.TemporaryDirectory() as tmp:
        r = export.bench(name, make, 2 if quick else 3, 3 if quick else 8, Path(tmp))
    for n in (1, 16):
        rows.append(dict(model="efficientnet_lite0", method="export", what=f"batch {n}: the exported model "
                         f"(its outputs + Grad-CAM of the top class) / the plain model", ours_s=r[f"exported_ms_b{n}"] / 1e3,
                         other_s=r[f"plain_ms_b{n}"] / 1e3, ratio=r[f"exported_over_plain_b{n}"]))
        rows.append(dict(model="efficientnet_lite0", method="gradcam", what=f"batch {n}: the library's torch path "
                         f"(forward + backward per image) / its in-graph path (one onnxruntime call)",
                         ours_s=r[f"library_torch_ms_b{n}"] / 1e3, other_s=r[f"library_ingraph_ms_b{n}"] / 1e3,
                         ratio=r[f"torch_over_ingraph_b{n}"]))


def bench_gradients(rows, net, name, image, repeats, model, target_layer):
    """Each gradient method per image: ours vs Captum / pytorch-grad-cam on ``model`` (pixels in
    0..255, N x 3 x H x W → logits), with ``target_layer`` the module Grad-CAM reads."""
    import torch
    from captum.attr import GuidedBackprop, IntegratedGradients, NoiseTunnel, Saliency
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    import explainer

    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None].contiguous()
    cases = {
        "gradcam": (lambda: explainer.gradcam(net, image, 285),
                    lambda: GradCAM(model=model, target_layers=[target_layer])(
                        input_tensor=x.clone().requires_grad_(True), targets=[ClassifierOutputTarget(285)])),
        "autodiff": (lambda: explainer.gradient_attribution(net, image, 285),
                     lambda: Saliency(model).attribute(x, target=285)),
        "guided-backprop": (lambda: explainer.gradient_attribution(net, image, 285, method="guided-backprop"),
                            lambda: GuidedBackprop(model).attribute(x, target=285)),
        "integrated-gradients": (
            lambda: explainer.gradient_attribution(net, image, 285, method="integrated-gradients", verbose=False),
            lambda: IntegratedGradients(model).attribute(x, target=285, n_steps=50, internal_batch_size=16)),
        "smoothgrad": (
            lambda: explainer.gradient_attribution(net, image, 285, method="smoothgrad", random_state=0, verbose=False),
            lambda: NoiseTunnel(Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=25,
                                                           nt_samples_batch_size=16, stdevs=0.15 * 255, target=285)),
    }
    for method, (ours_fn, peer_fn) in cases.items():
        ours, other, ratio = paired(ours_fn, peer_fn, repeats)
        rows.append(dict(model=name, method=method, what=PEER[name], ours_s=ours, other_s=other, ratio=ratio))


PEER = {"efficientnet_lite0": "ours / Captum, pytorch-grad-cam on the natively defined torch model",
        "googlenet graph (seeded)": "ours / Captum, pytorch-grad-cam on the same converted module (no native "
                                    "definition exists)"}


def converted(net):
    """The converted module (pixels → logits) and the module of the default Grad-CAM layer: what a
    Captum user gets from the graph after our conversion, without our API around it."""
    import explainer
    from explainer.runtime.torch_engine import torch_engine

    engine = torch_engine(net)
    for p in engine.pixel_model.parameters():
        p.requires_grad_(False)
    return engine.pixel_model, engine.module_for(explainer.gradcam_layers(net)[0])[0]


def markdown(meta, rows) -> str:
    lines = [f"# Benchmarks ({meta['date']})", "",
             f"Machine: {meta.get('cpu') or meta['machine']}; {meta['cpus']} CPUs; onnxruntime {meta['onnxruntime']}, "
             f"torch {meta['torch']}; mode: {meta['mode']}" + (
                 f"; {meta['duration_s'] / 60:.0f} minutes; 5-minute load average before / after: "
                 f"{meta['load_average'][0]} / {meta['load_average'][1]} (a shared machine: compare ratios "
                 "within the run)" if "load_average" in meta else "") + ".", "",
             "| model | method | comparison | ours (s) | other (s) | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['what']} | {r['ours_s']:.3f} | "
                     f"{r['other_s']:.3f} | {r['ratio']:.2f} |")
    lines += ["", "Ratios: 'ours vs forward limit' = our wall time / onnxruntime's time for the same number "
              "of images at its best batch size (lower is better, 1.0 is the limit); 'X / ours' = how many "
              "times faster we are; 'ours / ...' = our time relative to the peer's on the reference model "
              "(below 1: we are faster); 'batch_size=\"auto\" vs the best' = our time with the size the library "
              "picks / with the best size of this run (1.0: the pick is the best); 'A / B' otherwise = A's "
              "time over B's (below 1: A is faster)."]
    return "\n".join(lines) + "\n"


def cpuinfo(field: str) -> str | None:
    """The first ``field`` line of Linux's /proc/cpuinfo, without its name (None elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's marketing name where Linux tells it (platform.processor() is often empty there)."""
    return cpuinfo("model name") or platform.processor()


README_START, README_END = "<!-- benchmark table: written by python -m benchmarks -->", "<!-- end of benchmark table -->"


def write_between(readme: Path, start_marker: str, end_marker: str, body: str) -> bool:
    """Replace what lies between two markers of ``readme`` with ``body``, so that the README quotes a
    run and never numbers typed by hand. Returns False (and leaves the file alone) without the markers.
    The file is read just before it is written: other sections edited meanwhile are kept."""
    text = readme.read_text()
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        return False
    readme.write_text(text[:start + len(start_marker)] + "\n" + body.rstrip("\n") + "\n" + text[end:])
    return True


def update_readme(readme: Path, meta, rows) -> bool:
    """Put a full run's table into the README between the two markers."""
    table = markdown(meta, rows).split("\n", 2)[2]  # drop the title line and the blank after it
    return write_between(readme, README_START, README_END, f"Run of {meta['date']}. " + table)


DEFAULT_PARTS = "blackbox,incremental,rise,scorecam,gradients,deepdream,transformers,export,scaling"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and samples")
    parser.add_argument("--only", default=DEFAULT_PARTS,
                        help=f"comma-separated parts to run (default: all of {DEFAULT_PARTS}); only a full run "
                             "of all of them rewrites the README's table")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import onnxruntime
    import torch
    from skimage import data

    import explainer

    started, load_before = time.perf_counter(), os.getloadavg()
    repeats = 1 if args.quick else 3
    parts = set(args.only.split(","))
    unknown = parts - set(DEFAULT_PARTS.split(","))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; parts: {DEFAULT_PARTS}")
    image = np.rint(explainer.model.preprocess.resize(data.chelsea().astype(np.float32), (224, 224))).astype(np.uint8)
    rows = []
    net = explainer.load()
    native = NativeLite0()
    googlenet = explainer.load("seeded-inception_v1")
    if "blackbox" in parts:
        bench_blackbox(rows, net, "efficientnet_lite0", image, args.quick, repeats, peers=True)
        # GoogLeNet's graph is 4x slower per image: three batch sizes and 500 LIME samples keep the run short
        bench_blackbox(rows, googlenet, "googlenet graph (seeded)", image, args.quick, repeats, sizes=(1, 4, 16),
                       lime_samples=500)
    if "incremental" in parts:
        bench_incremental(rows, net, "efficientnet_lite0", image, repeats)
        bench_incremental(rows, googlenet, "googlenet graph (seeded)", image, repeats)
    if "rise" in parts:
        bench_rise(rows, net, "efficientnet_lite0", image, args.quick, repeats)
    if "scorecam" in parts:
        bench_score_cam(rows, net, "efficientnet_lite0", image, args.quick, repeats)
    if "gradients" in parts:
        bench_gradients(rows, net, "efficientnet_lite0", image, repeats, native.model, native.model.core._bn1)
        bench_gradients(rows, googlenet, "googlenet graph (seeded)", image, repeats, *converted(googlenet))
    extra = {}
    if "deepdream" in parts:
        from . import deepdream

        deepdream.bench(rows, net, "efficientnet_lite0", native.model, repeats)
        deepdream.bench(rows, googlenet, "googlenet graph (seeded)", converted(googlenet)[0], repeats)
    if "transformers" in parts:
        bench_transformers(rows, args.quick)
    if "export" in parts:
        bench_export(rows, args.quick)
    if "scaling" in parts and not args.quick:
        from . import scaling

        extra["scaling"] = scaling.run(net, image, RESULTS)
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=platform.platform(),
                processor=platform.processor(), cpu=cpu_model(), cpus=os.cpu_count(), onnxruntime=onnxruntime.__version__,
                torch=torch.__version__, mode="quick" if args.quick else "full",
                torch_threads=torch.get_num_threads(), duration_s=round(time.perf_counter() - started),
                load_average=[round(load_before[1], 2), round(os.getloadavg()[1], 2)], parts=sorted(parts))
    RESULTS.mkdir(exist_ok=True)
    payload = dict(meta=meta, rows=rows, **extra)
    name = "quick" if args.quick else "latest"
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(meta, rows))
    if not args.quick and parts == set(DEFAULT_PARTS.split(",")):
        update_readme(Path(__file__).resolve().parent.parent / "README.md", meta, rows)
    print(markdown(meta, rows))
    return 0
