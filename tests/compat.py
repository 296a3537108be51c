"""Every public method on one exported model, each checked against independent truth where there is
one; used by tests/test_compatibility.py and, to write docs/compatibility.md, run as a script:

    python tests/compat.py --write docs/compatibility.md
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import exports  # noqa: E402

METHODS = ("load", "scores", "batch", "activations", "gradcam", "occlusion", "lime", "gradient",
           "guided-backprop", "deep-dream")


def image(seed: int = 0) -> np.ndarray:
    from skimage import data

    return data.chelsea() if seed == 0 else data.coffee()


def reference_scores(family: str, variant: str, pixels: np.ndarray) -> np.ndarray:
    """The torch model the file was exported from, on the same pixels (at the network's size): (N, K)
    scores; kept beside the exports (building the model again costs seconds per case)."""
    import hashlib
    import zlib

    key = hashlib.sha256(pixels.tobytes()).hexdigest()[:16]
    recipe = zlib.crc32(repr(exports.FAMILIES[family]).encode())
    path = exports.cache_root() / "reference-scores" / f"{family}-{variant}-{recipe:08x}-{key}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    scores = _torch_scores(family, variant, pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, scores, allow_pickle=False)
    return scores


def _torch_scores(family: str, variant: str, pixels: np.ndarray) -> np.ndarray:
    import torch

    model = exports.build(family)
    if variant == "production":
        model = exports.Production(model).eval()
        x = torch.from_numpy(np.rint(pixels).astype(np.uint8))
    elif variant.startswith("ingraph"):
        raise ValueError("the in-graph variants are compared with the plain export's scores")
    else:
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255.0
        x = (x - torch.tensor(exports.MEAN).view(1, 3, 1, 1)) / torch.tensor(exports.STD).view(1, 3, 1, 1)
        if variant in ("fp16", "mixed"):
            model, x = model.half(), x.half()
    with torch.no_grad():
        return model(x).float().numpy()


def check(family: str, exporter: str, variant: str = "plain", methods=METHODS) -> dict[str, str]:
    """method -> "ok" or the error; raises nothing."""
    import explainer

    results: dict[str, str] = {}

    def run(name, fn):
        if name not in methods:
            return None
        try:
            value = fn()
            results[name] = "ok"
            return value
        except Exception as exc:  # recorded, the table shows it
            results[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            if "-v" in sys.argv:
                traceback.print_exc()
            return None

    net = run("load", lambda: explainer.load(exports.export(family, exporter, variant)))
    if net is None:
        return results
    img = image()

    def scores():
        pixels, _ = net.prepare([img])
        ours = net.logits(img) if net.output.softmax_input or not net.output.is_probability else net.predict(img)
        expected = reference_scores(family, variant, pixels)[0]
        if variant == "production":  # the graph ends in its own softmax: compare probabilities
            ours = net.predict(img)
        tol = 2e-2 if variant in ("fp16", "mixed") else 1e-3
        error = np.abs(ours - expected).max() / np.abs(expected).max()
        assert error <= tol, f"scores differ from the torch model by {error:.2e} (relative)"

    run("scores", scores)

    def batch():
        assert net.max_batch is None, "the graph runs one image at a time (batch not freed)"
        two = net.predict([img, image(1)])
        one = np.stack([net.predict(img), net.predict(image(1))])
        np.testing.assert_allclose(two, one, rtol=1e-3, atol=1e-3 if variant in ("fp16", "mixed") else 1e-5)

    run("batch", batch)
    feature = run("activations", lambda: _activations(net, img))
    top = [p.index for p in net.top_k(img, 2)]  # the classes the image moves most
    run("gradcam", lambda: _finite(explainer.gradcam(net, img, top), (2, *img.shape[:2])))
    run("occlusion", lambda: _finite(explainer.occlusion_sensitivity(
        net, img, top[0], mask_size=112, stride=56, verbose=False), img.shape[:2]))
    run("lime", lambda: _finite(explainer.image_lime(net, img, top[0], num_features=16, num_samples=64,
                                                     model="linear", verbose=False), img.shape[:2]))
    run("gradient", lambda: _finite(explainer.gradient_attribution(net, img, top[0], verbose=False),
                                    img.shape[:2]))
    run("guided-backprop", lambda: _finite(explainer.gradient_attribution(
        net, img, top[0], method="guided-backprop", verbose=False), img.shape[:2]))
    run("deep-dream", lambda: _finite(explainer.deep_dream_image(
        net, feature or explainer.gradcam_layers(net)[0], [0], num_iterations=1, pyramid_levels=1,
        verbose=False, random_state=0), (1, *net.input.size, 3)))
    return results


def _activations(net, img):
    import explainer

    layer = explainer.gradcam_layers(net)[0]
    acts = net.activations(img, layer)
    layout = net.layout(layer)
    assert acts.shape == (layout.channels, *layout.grid) and np.all(np.isfinite(acts)), acts.shape
    return layer


def _finite(m, shape):
    m = np.asarray(m)
    assert m.shape == tuple(shape) and np.all(np.isfinite(m)), (m.shape, shape)
    assert np.ptp(m) > 0, "the map is constant"
    return m


# the matrix of the table: every family by both exporters, variants on a few
def cases(published: bool = False) -> list[tuple[str, str, str]]:
    """The main suite's cases; ``published``: the families at their published size (exports.PUBLISHED),
    by both exporters and as older torch versions wrote them (opset 14)."""
    if published:
        return [(f, e, "plain") for f in exports.PUBLISHED for e in ("legacy", "legacy-old", "dynamo")]
    found = [(f, e, "plain") for f in exports.FAMILIES if f not in exports.PUBLISHED or f == "levit_128s"
             for e in ("legacy", "dynamo")]
    found += [(f, e, "plain") for f in ("resnet18", "vit_tiny", "swin_timm") for e in ("legacy-dynamic", "dynamo-dynamic")]
    found += [(f, "legacy-old", "plain") for f in ("resnet18", "vit_tiny", "deit_tiny_distilled", "swin_timm")]
    found += [(f, "legacy", v) for f in ("resnet18", "vit_tiny") for v in ("production", "fp16", "mixed", "slim")]
    found += [(f, "dynamo", v) for f in ("efficientnet_b0", "deit_tiny_distilled") for v in ("production", "slim")]
    return found


def table(rows: list[tuple[tuple[str, str, str], dict[str, str], float]]) -> str:
    import onnx
    import onnxruntime
    import timm
    import torch

    lines = ["# Compatibility", "",
             "Every public method on real exports of torchvision and timm classifiers (seeded weights, "
             "BatchNorm calibrated on random images; the families' real shapes, some with fewer blocks: Swin "
             "1-1-2-1 at width 32, CaiT 4 of its 24 blocks, which also run at their published size: swin_t, "
             "swin_tiny, cait_xxs24_full; see tests/exports.py), then other frameworks' exporters "
             "(below), written by `python tests/compat.py --write "
             "docs/compatibility.md`; `tests/test_compatibility.py` runs the same checks. "
             f"torch {torch.__version__}, timm {timm.__version__}, onnx {onnx.__version__}, onnxruntime "
             f"{onnxruntime.__version__}.", "",
             "Exports: `legacy` = `torch.onnx.export(dynamo=False, opset_version=17)` at batch 1; "
             "`legacy-old` = the legacy exporter at opset 13 (14 where attention needs it) with a dynamic "
             "batch, as older torch versions wrote files; "
             "`dynamo` = the default exporter (opset 18+, weights in `model.onnx.data`); `-dynamic` = "
             "a dynamic batch axis. Variants: `production` = NHWC uint8 input, normalisation and softmax in "
             "the graph; `fp16` = the whole model in half precision; `mixed` = float32 input and output, float16 "
             "inside; `slim` = onnxslim's copy.", "",
             "Checks: `scores` = our onnxruntime scores equal the torch model's (relative 1e-3, fp16 2e-2); "
             "`batch` = a batch of two equals two single runs; `activations` = the default Grad-CAM layer "
             "as (C, H, W); the maps are finite, of the image's size and not constant. Gradient methods "
             "run on the converted module, which is checked against onnxruntime first.", "",
             "| family | export | variant | " + " | ".join(METHODS) + " | seconds |",
             "|" + "---|" * (len(METHODS) + 4)]
    for (family, exporter, variant), result, seconds in rows:
        cells = ["✓" if result.get(m) == "ok" else ("✗ " + result[m].replace("|", "/") if m in result else "–")
                 for m in METHODS]
        lines.append(f"| {family} | {exporter} | {variant} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return "\n".join(lines) + "\n"


def frameworks_section() -> str:
    """The cross-framework cases (tests/frameworks: every subset that is built) as a section of the page."""
    import json

    sys.path.insert(0, str(Path(__file__).parent / "frameworks"))
    import check as frameworks  # tests/frameworks/check.py

    rows = []
    for name in frameworks.cases_mod.selected(set(frameworks.cases_mod.SUBSETS)):
        try:
            results, facts = frameworks.check(name)
        except frameworks.MissingCase:
            continue
        info = json.loads((frameworks.cases_mod.cases_root() / name / "case.json").read_text())
        rows.append((name, info, results, facts))
        print(name, frameworks.failures(results) or "all ok", flush=True)
    return frameworks.table(rows).replace("# Compatibility with", "## Compatibility with", 1)


def main() -> None:
    rows = []
    for case in cases() + cases(published=True):
        start = time.perf_counter()
        result = check(*case)
        rows.append((case, result, time.perf_counter() - start))
        print(case, {k: v for k, v in result.items() if v != "ok"} or "all ok", flush=True)
    text = table(rows) + "\n" + frameworks_section()
    if "--write" in sys.argv:
        Path(sys.argv[sys.argv.index("--write") + 1]).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
