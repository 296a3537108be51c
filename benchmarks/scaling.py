"""Scaling curves: time vs number of occlusion masks (stride), vs LIME samples, vs batch size."""
from __future__ import annotations

import time

import numpy as np


def run(net, image, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import explainer

    curves = {"occlusion": [], "lime": [], "batch": []}
    for stride in (56, 28, 16, 10):
        start = time.perf_counter()
        grid = explainer.occlusion_sensitivity(net, image, 285, stride=stride, mask_size=20,
                                               output_upsampling="none", verbose=False)
        curves["occlusion"].append((int(np.prod(grid.shape)), time.perf_counter() - start))
    for n in (64, 256, 1024):
        start = time.perf_counter()
        explainer.image_lime(net, image, 285, num_samples=n, stop_tolerance=None, random_state=0, verbose=False)
        curves["lime"].append((n, time.perf_counter() - start))
    x = net.to_model_input(np.full((64, *net.input.size, 3), 120, np.float32))
    session = net.ort.session([net.output.name])
    for b in (1, 2, 4, 8, 16, 32, 64):
        start = time.perf_counter()
        for i in range(0, 64, b):
            session.run([net.output.name], {net.input.name: x[i:i + b]})
        curves["batch"].append((b, 64 / (time.perf_counter() - start)))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, xlabel, ylabel) in zip(axes, [("occlusion", "masks", "seconds"), ("lime", "samples", "seconds"),
                                                ("batch", "batch size", "images / second")]):
        xs, ys = zip(*curves[key])
        ax.plot(xs, ys, "o-")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{key} (EfficientNet-Lite0, onnxruntime)")
        if key == "batch":
            ax.set_xscale("log", base=2)
    fig.tight_layout()
    fig.savefig(out_dir / "scaling.png", dpi=90)
    plt.close(fig)
    return curves
