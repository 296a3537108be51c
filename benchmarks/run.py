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


def forward_limit(net, count: int, repeats: int, sizes=(1, 2, 4, 8, 16, 32)) -> tuple[float, int]:
    """Seconds onnxruntime needs for ``count`` images at its best batch size (and that size)."""
    x = net.to_model_input(np.full((count, *net.input.size, net.input.channels), 120, np.float32))
    session = net.ort.session([net.output.name])
    best = None
    for b in sizes:
        t = timed(lambda: [session.run([net.output.name], {net.input.name: x[i:i + b]})
                           for i in range(0, count, b)], repeats)
        if best is None or t < best[0]:
            best = (t, b)
    return best


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


def bench_blackbox(rows, net, name, image, quick, repeats, native=None, sizes=(1, 2, 4, 8, 16, 32)):
    import torch

    import explainer

    # occlusion: MATLAB-like defaults at stride 10 / mask 15 (23 x 23 = 529 masks on 224 x 224)
    kw = dict(mask_size=15, stride=10, verbose=False)
    n_masks = len(range(0, net.input.size[0], 10)) * len(range(0, net.input.size[1], 10))
    limit, best_b = forward_limit(net, n_masks + 1, repeats, sizes)
    ours = timed(lambda: explainer.occlusion_sensitivity(net, image, 285, batch_size=best_b, **kw), repeats)
    rows.append(dict(model=name, method="occlusion", what=f"{n_masks} masks, ours vs forward limit",
                     ours_s=ours, other_s=limit, ratio=ours / limit, batch=best_b))
    if native is not None:
        from captum.attr import Occlusion

        x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
        probability = lambda t: torch.softmax(native.model(t), 1)
        best = None
        for ppe in ((16,) if quick else (1, 8, 16, 32, 64)):
            with torch.no_grad():
                t = timed(lambda: Occlusion(probability).attribute(
                    x, sliding_window_shapes=(3, 15, 15), strides=(3, 10, 10), baselines=120.0, target=285,
                    perturbations_per_eval=ppe), 1)
            if best is None or t < best[0]:
                best = (t, ppe)
        rows.append(dict(model=name, method="occlusion", what=f"Captum Occlusion (native torch, best "
                         f"perturbations_per_eval={best[1]}) / ours", ours_s=ours, other_s=best[0],
                         ratio=best[0] / ours))
    # LIME: the overhead over the forward passes (all samples drawn), then against the lime package at
    # equal num_samples with our defaults (sampling stops once the weights are settled)
    samples = 200 if quick else 1000
    limit, best_b = forward_limit(net, samples, repeats, sizes)
    ours = timed(lambda: explainer.image_lime(net, image, 285, num_samples=samples, random_state=0,
                                              stop_tolerance=None, verbose=False, batch_size=best_b), repeats)
    rows.append(dict(model=name, method="lime", what=f"{samples} samples (all drawn), ours vs forward limit",
                     ours_s=ours, other_s=limit, ratio=ours / limit, batch=best_b))
    if native is not None:
        used = len(explainer.lime_explanation(net, image, 285, num_samples=samples, random_state=0,
                                              verbose=False).samples)
        ours = timed(lambda: explainer.image_lime(net, image, 285, num_samples=samples, random_state=0,
                                                  verbose=False, batch_size=best_b), repeats)
        from lime.lime_image import LimeImageExplainer

        small = net.fit_pixels(image.astype(np.float32))
        exp = explainer.lime_explanation(net, image, 285, num_samples=2, verbose=False)
        classifier = lambda imgs: net.predict_model_input(net.to_model_input(np.asarray(imgs, np.float32)), 16)
        results = {}
        for b in ((10,) if quick else (10, 1, 32)):
            results[b] = timed(lambda: LimeImageExplainer(random_state=0).explain_instance(
                small, classifier, labels=(285,), top_labels=None, num_samples=samples, batch_size=b,
                segmentation_fn=lambda _: exp.segments, random_seed=0), 1)
        best = min(results, key=results.get)
        rows.append(dict(model=name, method="lime", what=f"lime package, num_samples={samples} (default "
                         f"batch_size=10: {results[10]:.2f} s; best batch_size={best}) / ours (stopped after "
                         f"{used} samples)", ours_s=ours, other_s=results[best], ratio=results[best] / ours))


def bench_gradients(rows, net, image, repeats, native):
    """Each gradient method per image: ours (converted module) vs the same computation natively."""
    import torch
    from captum.attr import GuidedBackprop, IntegratedGradients, NoiseTunnel, Saliency
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    import explainer

    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    cases = {
        "gradcam": (lambda: explainer.gradcam(net, image, 285),
                    lambda: GradCAM(model=native.model, target_layers=[native.model.core._bn1])(
                        input_tensor=x.clone().requires_grad_(True), targets=[ClassifierOutputTarget(285)])),
        "autodiff": (lambda: explainer.gradient_attribution(net, image, 285),
                     lambda: Saliency(native.model).attribute(x, target=285)),
        "guided-backprop": (lambda: explainer.gradient_attribution(net, image, 285, method="guided-backprop"),
                            lambda: GuidedBackprop(native.model).attribute(x, target=285)),
        "integrated-gradients": (
            lambda: explainer.gradient_attribution(net, image, 285, method="integrated-gradients", verbose=False),
            lambda: IntegratedGradients(native.model).attribute(x, target=285, n_steps=50, internal_batch_size=16)),
        "smoothgrad": (
            lambda: explainer.gradient_attribution(net, image, 285, method="smoothgrad", random_state=0, verbose=False),
            lambda: NoiseTunnel(Saliency(native.model)).attribute(x, nt_type="smoothgrad", nt_samples=25,
                                                                  nt_samples_batch_size=16, stdevs=0.15 * 255, target=285)),
    }
    for method, (ours_fn, native_fn) in cases.items():
        ours = timed(ours_fn, repeats)
        other = timed(native_fn, repeats)
        rows.append(dict(model="efficientnet_lite0", method=method, what="ours / native torch (Captum, "
                         "pytorch-grad-cam)", ours_s=ours, other_s=other, ratio=ours / other))


def markdown(meta, rows) -> str:
    lines = [f"# Benchmarks ({meta['date']})", "",
             f"Machine: {meta['machine']}; {meta['cpus']} CPUs; onnxruntime {meta['onnxruntime']}, "
             f"torch {meta['torch']}; mode: {meta['mode']}.", "",
             "| model | method | comparison | ours (s) | other (s) | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['what']} | {r['ours_s']:.3f} | "
                     f"{r['other_s']:.3f} | {r['ratio']:.2f} |")
    lines += ["", "Ratios: 'ours vs forward limit' = our wall time / onnxruntime's time for the same number "
              "of images at its best batch size (lower is better, 1.0 is the limit); 'X / ours' = how many "
              "times faster we are; 'ours / native' = our time relative to the same computation on the "
              "natively defined torch model."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and samples")
    parser.add_argument("--only", default="blackbox,gradients,deepdream,scaling",
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
    if "blackbox" in parts:
        bench_blackbox(rows, net, "efficientnet_lite0", image, args.quick, repeats, native)
        # GoogLeNet's graph is 4x slower per image: one repeat and three batch sizes keep the run short
        bench_blackbox(rows, explainer.load("seeded-inception_v1"), "googlenet graph (seeded)", image,
                       args.quick, 1, sizes=(1, 4, 16))
    if "gradients" in parts:
        bench_gradients(rows, net, image, repeats, native)
    extra = {}
    if "deepdream" in parts and hasattr(explainer, "deep_dream_image"):
        from . import deepdream

        deepdream.bench(rows, net, native, repeats)
    if "scaling" in parts and not args.quick:
        from . import scaling

        extra["scaling"] = scaling.run(net, image, RESULTS)
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=platform.platform(),
                processor=platform.processor(), cpus=os.cpu_count(), onnxruntime=onnxruntime.__version__,
                torch=torch.__version__, mode="quick" if args.quick else "full",
                torch_threads=torch.get_num_threads())
    RESULTS.mkdir(exist_ok=True)
    payload = dict(meta=meta, rows=rows, **extra)
    name = "quick" if args.quick else "latest"
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))
    return 0
