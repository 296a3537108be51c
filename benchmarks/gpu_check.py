"""GPU check: every method on the torch CUDA backend equals the CPU results, and how much faster it is.

Runs on the default model and GoogLeNet's graph (seeded). onnxruntime may be CPU-only there (the
onnxruntime-gpu wheel is too large to carry), so forward-only methods use ``backend="torch"``.
"""
from __future__ import annotations

import sys
import time
import warnings

import numpy as np


def _compare(a, b):
    """(largest difference, L2 difference, share of values off by > 1e-3), each relative to ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-12)
    diff = np.abs(a - b)
    return (float(diff.max() / scale), float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)),
            float(np.mean(diff > 1e-3 * scale)))


# Pixel-gradient maps are compared as wholes: cuDNN and the CPU kernels round differently in float32,
# which flips a few ReLU gates and max-pool winners (ties) and with them the gradient at a few pixels.
# The CPU alone does the same when the input moves by one float32 rounding (x * (1 - 1e-6)): that is the
# "floor" printed beside these rows. They pass when the L2 difference is below 1e-2; everything else
# is compared pointwise.
WHOLE_MAP_L2 = 1e-2


def _cases(label, scores) -> dict:
    """name: (method(net, image), pointwise tolerance, or None for a whole-map comparison)."""
    import explainer

    return {
        "gradcam": (lambda n, x: explainer.gradcam(n, x, label), 1e-3),
        "autodiff": (lambda n, x: explainer.gradient_attribution(n, x, label), None),
        "guided-backprop": (lambda n, x: explainer.gradient_attribution(n, x, label, method="guided-backprop"),
                            None),
        "integrated-gradients": (lambda n, x: explainer.gradient_attribution(
            n, x, label, method="integrated-gradients", verbose=False), None),
        "smoothgrad": (lambda n, x: explainer.gradient_attribution(n, x, label, method="smoothgrad",
                                                                   random_state=0, verbose=False), None),
        "occlusion (torch)": (lambda n, x: explainer.occlusion_sensitivity(
            n, x, label, stride=32, mask_size=48, backend="torch", batch_size=64, verbose=False), 1e-3),
        "lime (torch)": (lambda n, x: explainer.image_lime(n, x, label, num_samples=128, stop_tolerance=None,
                                                           model="linear", random_state=0, backend="torch",
                                                           batch_size=64, verbose=False), 1e-3),
        "deep dream (2 it.)": (lambda n, x: explainer.deep_dream_image(n, scores, [label], num_iterations=2,
                                                                       pyramid_levels=1, random_state=0,
                                                                       verbose=False, output_scaling="none"),
                               1e-2),
    }


def _throughput(net, sync, count: int = 256, batch: int = 64) -> float:
    """Forward passes per second of the converted module on the net's torch device."""
    import torch

    from explainer.runtime.torch_engine import torch_engine

    engine = torch_engine(net)
    x = engine.tensor(net.to_model_input(np.full((batch, *net.input.size, net.input.channels), 120, np.float32)))
    with torch.no_grad():
        engine.logits_from_model_input(x)
        sync()
        start = time.perf_counter()
        for _ in range(count // batch):
            engine.logits_from_model_input(x)
        sync()
    return count / (time.perf_counter() - start)


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
    from skimage import data

    from explainer.model.preprocess import resize

    image = np.rint(resize(data.chelsea().astype(np.float32), (224, 224))).astype(np.uint8)
    nudged = image.astype(np.float32) / 255 * np.float32(1 - 1e-6)  # the same image, one rounding away
    failures = 0
    print(f"{'model':<22} {'method':<22} {'cpu s':>8} {'gpu s':>8} {'speed-up':>9} {'max err':>9} {'L2 err':>9} "
          f"{'px off':>8} {'CPU floor':>9}  ok")
    for source in (None, "seeded-inception_v1"):
        cpu = explainer.load(source, torch_device="cpu")
        gpu = explainer.load(source, torch_device=device)
        label = cpu.top_k(image, 1)[0].index
        cases = _cases(label, explainer.gradcam_layers(cpu)[1])
        for name, (fn, tol) in cases.items():
            fn(gpu, image)  # warm-up: conversion, cuDNN autotuning
            sync()
            t0 = time.perf_counter()
            ref = fn(cpu, image)
            t1 = time.perf_counter()
            out = fn(gpu, image)
            sync()
            t2 = time.perf_counter()
            largest, l2, share = _compare(out, ref)
            if tol is None:
                floor = f"{_compare(fn(cpu, nudged), ref)[1]:9.2e}"
                ok = l2 <= WHOLE_MAP_L2
            else:
                floor, ok = f"{'-':>9}", largest <= tol
            failures += not ok
            print(f"{cpu.name:<22} {name:<22} {t1 - t0:8.3f} {t2 - t1:8.3f} {(t1 - t0) / max(t2 - t1, 1e-9):8.1f}x "
                  f"{largest:9.2e} {l2:9.2e} {share:8.2%} {floor}  {'yes' if ok else 'NO'}")
        rates = [_throughput(n, sync if n is gpu else (lambda: None)) for n in (cpu, gpu)]
        print(f"{cpu.name:<22} {'forward images/s':<22} {rates[0]:8.0f} {rates[1]:8.0f} {rates[1] / rates[0]:8.1f}x "
              "(torch, batch 64, 256 images)")
    print("all equal within tolerance" if failures == 0 else f"{failures} check(s) differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
