"""Every speed claim in one run, on one machine: our methods beside their peers and beside the
forward-pass limit (onnxruntime on the same number of images at its best batch size).

    python -m benchmarks            # full run
    python -m benchmarks --quick    # fewer repeats and samples

Writes ``benchmarks/results/latest.json`` and ``latest.md`` (and a copy named after the date).
Medians over repeats; ratios are computed within the run.
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


def bench_blackbox(rows, net, name, image, quick, repeats, peers=False, sizes=(1, 2, 4, 8, 16, 32)):
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
    rows.append(dict(model=name, method="occlusion", what=f"{n_masks} masks, ours vs forward limit",
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
        ppe = isolated.call("benchmarks.run:captum_best_ppe", image, (16,) if quick else (1, 8, 16, 32, 64))
        ours, other, ratio = isolated.paired(("benchmarks.run:our_occlusion", (image, b)),
                                             ("benchmarks.run:captum_occlusion", (image, ppe)), repeats)
        rows.append(dict(model=name, method="occlusion", what=f"Captum Occlusion, the same {n_windows} windows "
                         f"(native torch, best perturbations_per_eval={ppe}; each side in its own process) / "
                         "ours", ours_s=ours, other_s=other, ratio=1 / ratio, batch=b))
    # LIME: the overhead over the forward passes (all samples drawn), then against the lime package at
    # equal num_samples with our defaults (sampling stops once the top-5 superpixels are settled)
    samples = 200 if quick else 1000
    b = best_batch(net, samples, sizes)
    ours, limit, ratio = paired(lambda: explainer.image_lime(net, image, 285, num_samples=samples, random_state=0,
                                                             stop_tolerance=None, verbose=False, batch_size=b),
                                forward_pass(net, samples, b), repeats)
    rows.append(dict(model=name, method="lime", what=f"{samples} samples (all drawn), ours vs forward limit",
                     ours_s=ours, other_s=limit, ratio=ratio, batch=b))
    if peers:
        used = len(explainer.lime_explanation(net, image, 285, num_samples=samples, random_state=0,
                                              verbose=False).samples)
        from lime.lime_image import LimeImageExplainer

        small = net.fit_pixels(image.astype(np.float32))
        exp = explainer.lime_explanation(net, image, 285, num_samples=2, verbose=False)
        classifier = lambda imgs: net.predict_model_input(net.to_model_input(np.asarray(imgs, np.float32)), 16)

        def lime_package(batch):
            return LimeImageExplainer(random_state=0).explain_instance(
                small, classifier, labels=(285,), top_labels=None, num_samples=samples, batch_size=batch,
                segmentation_fn=lambda _: exp.segments, random_seed=0)

        default = timed(lambda: lime_package(10), 1)
        best = 10 if quick else min((10, 1, 32), key=lambda batch: default if batch == 10 else
                                    timed(lambda: lime_package(batch), 1))
        ours, other, ratio = paired(lambda: explainer.image_lime(net, image, 285, num_samples=samples,
                                                                 random_state=0, verbose=False, batch_size=b),
                                    lambda: lime_package(best), 1 if quick else 2)
        rows.append(dict(model=name, method="lime", what=f"lime package, num_samples={samples} (default "
                         f"batch_size=10: {default:.2f} s; best batch_size={best}) / ours (stopped after "
                         f"{used} samples)", ours_s=ours, other_s=other, ratio=1 / ratio))


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
             f"torch {meta['torch']}; mode: {meta['mode']}.", "",
             "| model | method | comparison | ours (s) | other (s) | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['what']} | {r['ours_s']:.3f} | "
                     f"{r['other_s']:.3f} | {r['ratio']:.2f} |")
    lines += ["", "Ratios: 'ours vs forward limit' = our wall time / onnxruntime's time for the same number "
              "of images at its best batch size (lower is better, 1.0 is the limit); 'X / ours' = how many "
              "times faster we are; 'ours / ...' = our time relative to the peer's on the reference model "
              "(below 1: we are faster); 'batch_size=\"auto\" vs the best' = our time with the size the library "
              "picks / with the best size of this run (1.0: the pick is the best)."]
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


def update_readme(readme: Path, meta, rows) -> bool:
    """Put a full run's table into the README between the two markers, so the README quotes the latest
    run and never numbers typed by hand. Returns False (and leaves the file alone) without the markers."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    table = markdown(meta, rows).split("\n", 2)[2]  # drop the title line and the blank after it
    readme.write_text(text[:start + len(README_START)] + f"\nRun of {meta['date']}. " + table + text[end:])
    return True


DEFAULT_PARTS = "blackbox,gradients,deepdream,scaling"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and samples")
    parser.add_argument("--only", default=DEFAULT_PARTS,
                        help="comma-separated parts to run")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import onnxruntime
    import torch
    from skimage import data

    import explainer

    repeats = 1 if args.quick else 3
    parts = set(args.only.split(","))
    image = np.rint(explainer.model.preprocess.resize(data.chelsea().astype(np.float32), (224, 224))).astype(np.uint8)
    rows = []
    net = explainer.load()
    native = NativeLite0()
    googlenet = explainer.load("seeded-inception_v1")
    if "blackbox" in parts:
        bench_blackbox(rows, net, "efficientnet_lite0", image, args.quick, repeats, peers=True)
        # GoogLeNet's graph is 4x slower per image: three batch sizes keep the run short
        bench_blackbox(rows, googlenet, "googlenet graph (seeded)", image, args.quick, repeats, sizes=(1, 4, 16))
    if "gradients" in parts:
        bench_gradients(rows, net, "efficientnet_lite0", image, repeats, native.model, native.model.core._bn1)
        bench_gradients(rows, googlenet, "googlenet graph (seeded)", image, repeats, *converted(googlenet))
    extra = {}
    if "deepdream" in parts:
        from . import deepdream

        deepdream.bench(rows, net, "efficientnet_lite0", native.model, repeats)
        deepdream.bench(rows, googlenet, "googlenet graph (seeded)", converted(googlenet)[0], repeats)
    if "scaling" in parts and not args.quick:
        from . import scaling

        extra["scaling"] = scaling.run(net, image, RESULTS)
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=platform.platform(),
                processor=platform.processor(), cpu=cpu_model(), cpus=os.cpu_count(), onnxruntime=onnxruntime.__version__,
                torch=torch.__version__, mode="quick" if args.quick else "full",
                torch_threads=torch.get_num_threads())
    RESULTS.mkdir(exist_ok=True)
    payload = dict(meta=meta, rows=rows, **extra)
    name = "quick" if args.quick else "latest"
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(meta, rows))
    if not args.quick and parts == set(DEFAULT_PARTS.split(",")):
        update_readme(Path(__file__).resolve().parent.parent / "README.md", meta, rows)
    print(markdown(meta, rows))
    return 0
