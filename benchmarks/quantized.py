"""How faithfully the int8 models that ship are explained: onnxruntime.quantization's static QDQ and
dynamic copies of compatibility-suite families, against onnxruntime and against their float parents.

    python -m benchmarks.quantized [--families resnet18 vit_tiny ...]

For each (family, int8 format): the converted module's largest score difference from onnxruntime
(relative to the largest score) beside onnxruntime's own spread on the same graph (fused int8 kernels
vs node-by-node evaluation, and inputs 1e-6 apart) and the scores' quantisation step; how often the
int8 model's top-1 class equals its float parent's; and the Pearson correlation of the int8 model's
maps with the float parent's maps (Grad-CAM, gradient, guided backpropagation) for the parent's
top-1 class, on photographs that are not in the calibration set.

Writes ``benchmarks/results/quantized.json`` and ``quantized.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).with_name("results")
FAMILIES = ("resnet18", "efficientnet_b0", "mobilenet_v3_small", "vit_tiny")
VARIANTS = ("int8-qdq", "int8-dynamic")


def photographs() -> dict[str, np.ndarray]:
    """Six photographs, none of them among the int8 variants' calibration set."""
    import matplotlib.cbook
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    return {"china": china, "flower": flower, "hopper": hopper, "cat": data.cat(),
            "hubble": data.hubble_deep_field(), "immunohistochemistry": data.immunohistochemistry()}


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def measure(family: str, variant: str, images: dict) -> dict:
    import explainer
    from explainer.convert.quantized import output_quantisation_step
    from explainer.runtime.torch_engine import torch_engine

    import exports

    parent = explainer.load(exports.export(family, "legacy"), preprocessing="imagenet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dynamic format's fallback to batch 1 is expected
        net = explainer.load(exports.export(family, "legacy", variant), preprocessing="imagenet")
    engine = torch_engine(net)
    photos = np.stack([np.rint(net.fit_pixels(p.astype(np.float32))).astype(np.uint8) for p in images.values()])
    # onnxruntime, the int8 model as it runs in production; the tensor the module differentiates
    # (the scores before their own rounding, which saturates above the calibrated range)
    shipped = net.ort.run_batched(net.to_model_input(photos.astype(np.float32)), [net.gradient_scores],
                                  net.max_batch or len(photos))[0].reshape(len(photos), -1)
    import torch

    with torch.no_grad():
        ours = engine.pixel_model(engine.tensor(photos).permute(0, 3, 1, 2)).double().cpu().numpy()
    scale = np.abs(shipped).max(axis=1)
    step = output_quantisation_step(net.source_model, net.output.softmax_input or net.output.name)
    methods = {"gradcam": lambda n, x, k: explainer.gradcam(n, x, k),
               "gradient": lambda n, x, k: explainer.gradient_attribution(n, x, k, verbose=False),
               "guided": lambda n, x, k: explainer.gradient_attribution(n, x, k, method="guided-backprop",
                                                                        verbose=False)}
    correlations = {m: [] for m in methods}
    agree = 0
    for name, image in images.items():
        label = parent.top_k(image, 1)[0].index
        agree += net.top_k(image, 1)[0].index == label
        for m, fn in methods.items():
            correlations[m].append(_correlation(fn(net, image, label), fn(parent, image, label)))
    return dict(
        family=family, format=variant, max_batch=net.max_batch,
        check_error=engine.max_relative_error, check_allowed=engine.allowed_relative_error,
        photo_error=float((np.abs(ours - shipped).max(axis=1) / scale).max()),
        photo_error_steps=float(np.abs(ours - shipped).max() / step) if step else None,
        top1_agreement=f"{agree}/{len(images)}",
        **{f"{m}_correlation": float(np.mean(v)) for m, v in correlations.items()},
        **{f"{m}_correlation_min": float(np.min(v)) for m, v in correlations.items()})


def markdown(rows: list[dict]) -> str:
    lines = ["| family | int8 format | module vs onnxruntime (photos) | in score steps | onnxruntime's own spread "
             "(x2) | top-1 = float parent | Grad-CAM r | gradient r | guided r |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        steps = f"{r['photo_error_steps']:.1f}" if r["photo_error_steps"] is not None else "(float scores)"
        lines.append(f"| {r['family']} | {r['format']} | {r['photo_error']:.1e} | {steps} | {r['check_allowed']:.1e} | "
                     f"{r['top1_agreement']} | {r['gradcam_correlation']:.3f} (min {r['gradcam_correlation_min']:.2f}) | "
                     f"{r['gradient_correlation']:.3f} | {r['guided_correlation']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the suite's exports
    images = photographs()
    rows = []
    for family in args.families:
        for variant in VARIANTS:
            rows.append(measure(family, variant, images))
            print(json.dumps(rows[-1]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantized.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "quantized.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
