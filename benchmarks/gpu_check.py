"""GPU check: every method on the torch CUDA backend equals the CPU results, and how much faster it is.

Runs on the default model and GoogLeNet's graph (seeded). onnxruntime may be CPU-only there (the
onnxruntime-gpu wheel is too large to carry), so forward-only methods use ``backend="torch"``.
"""
from __future__ import annotations

import sys
import time
import warnings

import numpy as np


def _close(a, b, rel):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-12)
    return float(np.abs(a - b).max() / scale), bool(np.abs(a - b).max() <= rel * scale)


def main() -> int:
    warnings.filterwarnings("ignore")
    import os

    import torch

    import explainer

    device = os.environ.get("GPU_CHECK_DEVICE", "cuda")  # "cpu": a dry run of this script's code paths
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible to torch; nothing to check")
        return 1
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    print(f"device: {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu (dry run)'}; torch {torch.__version__}")
    from explainer.model.preprocess import resize
    from skimage import data

    image = np.rint(resize(data.chelsea().astype(np.float32), (224, 224))).astype(np.uint8)
    failures = 0
    print(f"{'model':<22} {'method':<22} {'cpu s':>8} {'gpu s':>8} {'speed-up':>9} {'rel err':>9}  ok")
    for source in (None, "seeded-inception_v1"):
        cpu = explainer.load(source, torch_device="cpu")
        gpu = explainer.load(source, torch_device=device)
        label = cpu.top_k(image, 1)[0].index
        scores = explainer.gradcam_layers(cpu)[1]
        cases = {
            "gradcam": (lambda n: explainer.gradcam(n, image, label), 1e-3),
            "autodiff": (lambda n: explainer.gradient_attribution(n, image, label), 1e-3),
            "guided-backprop": (lambda n: explainer.gradient_attribution(n, image, label, method="guided-backprop"), 1e-3),
            "integrated-gradients": (lambda n: explainer.gradient_attribution(
                n, image, label, method="integrated-gradients", verbose=False), 1e-3),
            "smoothgrad": (lambda n: explainer.gradient_attribution(n, image, label, method="smoothgrad",
                                                                    random_state=0, verbose=False), 1e-3),
            "occlusion (torch)": (lambda n: explainer.occlusion_sensitivity(
                n, image, label, stride=32, mask_size=48, backend="torch", batch_size=64, verbose=False), 1e-3),
            "lime (torch)": (lambda n: explainer.image_lime(n, image, label, num_samples=128, stop_tolerance=None,
                                                            model="linear", random_state=0, backend="torch",
                                                            batch_size=64, verbose=False), 1e-3),
            "deep dream (2 it.)": (lambda n: explainer.deep_dream_image(n, scores, [label], num_iterations=2,
                                                                        pyramid_levels=1, random_state=0,
                                                                        verbose=False, output_scaling="none"), 1e-2),
        }
        for name, (fn, tol) in cases.items():
            fn(gpu)  # warm-up: conversion, cuDNN autotuning
            sync()
            t0 = time.perf_counter()
            ref = fn(cpu)
            t1 = time.perf_counter()
            out = fn(gpu)
            sync()
            t2 = time.perf_counter()
            err, ok = _close(out, ref, tol)
            failures += not ok
            print(f"{cpu.name:<22} {name:<22} {t1 - t0:8.3f} {t2 - t1:8.3f} {(t1 - t0) / max(t2 - t1, 1e-9):8.1f}x "
                  f"{err:9.2e}  {'yes' if ok else 'NO'}")
    print("all equal within tolerance" if failures == 0 else f"{failures} check(s) differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
