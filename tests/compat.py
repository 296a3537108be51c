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
import source_references  # noqa: E402

METHODS = ("load", "scores", "batch", "activations", "gradcam", "occlusion", "lime", "rise", "gradient",
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
    # every map below is of integer pixels at the network's size (no resize between them and the model
    # input) and compared with independent truth: the source torch model through pytorch-grad-cam and
    # Captum (tests/source_references.py), or the file run on onnxruntime by hand
    pixels = np.rint(net.fit_pixels(img)).astype(np.uint8)
    top = [p.index for p in net.top_k(pixels, 2)]  # the classes the image moves most
    half = variant in HALF
    refs = _lazy(lambda: source_references.references(family, pixels.astype(np.float32), top))
    path = exports.export(family, exporter, variant)
    run("gradcam", lambda: _gradcam(net, pixels, top, refs, half))
    run("occlusion", lambda: _occlusion(net, path, variant, pixels, top, half))
    run("lime", lambda: _lime(net, path, variant, pixels, top, half))
    run("rise", lambda: _rise(net, path, variant, pixels, top, half))
    run("gradient", lambda: _gradient(net, pixels, top, refs(), "gradient", "autodiff", half))
    run("guided-backprop", lambda: _gradient(net, pixels, top, refs(), "guided", "guided-backprop", half))
    run("deep-dream", lambda: _deep_dream(net, feature or explainer.gradcam_layers(net)[0], pixels, top, refs(), half))
    return results


#: variants computing in float16: onnxruntime rounds every intermediate to 11 bits
HALF = ("fp16", "mixed")
#: fp32 maps: max |ours - reference| <= TOL x the reference's range (Grad-CAM's at the feature layer,
#: unnormalised, and its public map; gradients signed, per pixel and channel, and their public maps;
#: deep dream's step in pixels). float16 graphs: TOL_HALF.
TOL, TOL_HALF = 1e-4, 5e-2
#: forward-only methods: probabilities (drops, LIME's samples, RISE's weighted masks) vs onnxruntime run
#: by hand on the same file, absolute
PROB_TOL, PROB_TOL_HALF = 2e-5, 2e-3


def _lazy(fn):
    cell = []

    def get():
        if not cell:
            cell.append(fn())
        return cell[0]

    return get


#: what -> (max error / the reference's range, correlation) of the last comparisons (for reports)
MEASURED: dict[str, tuple[float, float]] = {}


def _close(ours, expected, tol, what):
    """max |ours - expected| <= tol x the range of ``expected`` (its max |value| for signed maps)."""
    ours, expected = np.asarray(ours, np.float64), np.asarray(expected, np.float64)
    assert ours.shape == expected.shape, (what, ours.shape, expected.shape)
    assert np.all(np.isfinite(ours)), f"{what}: not finite"
    scale = max(np.ptp(expected), np.abs(expected).max())
    assert scale > 0, f"{what}: the reference is zero everywhere"
    error = np.abs(ours - expected).max() / scale
    MEASURED[what] = (float(error), _correlation(ours, expected) if np.ptp(expected) > 0 else 1.0)
    assert error <= tol, f"{what} differs from the reference by {error:.2e} of its range (tolerance {tol:.0e})"
    return error


def _agree(ours, expected, tol, what, corr_tol=1e-4):
    """``_close``, or where a few ReLU gates sit within float rounding of zero (the export folds
    BatchNorm into the convolutions, so pre-activations differ from the source model's by ~1e-7: a gate
    at -5e-8 in resnet18's layer2.0 flips and the gradient changes over its 51 x 51 receptive field),
    the maps agree everywhere else: at most 10 % of the values beyond 10 ``tol``, correlation >= 1 -
    ``corr_tol``, and the same scale (least squares, within 1e-3; float16 graphs within ``tol``)."""
    try:
        return _close(ours, expected, tol, what)
    except AssertionError:
        ours, expected = np.asarray(ours, np.float64), np.asarray(expected, np.float64)
        if ours.shape != expected.shape or not np.all(np.isfinite(ours)):
            raise
        scale = max(np.ptp(expected), np.abs(expected).max())
        outside = float((np.abs(ours - expected) > 10 * tol * scale).mean())
        corr = _correlation(ours, expected)
        ratio = float((ours * expected).sum() / (expected * expected).sum())
        MEASURED[what] = (float(np.abs(ours - expected).max() / scale), corr)
        assert outside <= 0.1 and corr >= 1 - corr_tol and abs(ratio - 1) <= max(1e-3, tol if tol > 1e-3 else 0), (
            f"{what} differs from the reference: {outside:.2%} of the values beyond {10 * tol:.0e} of its range, "
            f"correlation {corr:.6f}, scale {ratio:.5f}")
        return float(np.abs(ours - expected).max() / scale)


def _correlation(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def _gradcam(net, pixels, top, refs, half):
    """Our default layer's raw map at the feature resolution equals pytorch-grad-cam's on the source
    model at source_references.TARGETS' module (unnormalised); the public map equals that reference upsampled
    by PIL's bicubic (Keys, a = -0.5: what our "bicubic" is) to the image's size, negatives clipped."""
    from PIL import Image

    import explainer
    from explainer.errors import DegenerateMapError
    from explainer.methods.gradcam import GradCAM

    expected = refs()["cam"]
    tol = TOL_HALF if half else TOL
    cam = GradCAM(net)
    empty = [k for k, m in zip(top, expected) if not np.any(m > 0)]
    if empty:  # pytorch-grad-cam's map is zero everywhere (every location lowers the score): ours refuses
        for k in empty:  # it by name (DegenerateMapError), never returns it
            try:
                cam.low_resolution(pixels, [k])
            except DegenerateMapError as exc:
                assert f"class {k} " in str(exc) and "zero everywhere" in str(exc), str(exc)
            else:
                raise AssertionError(f"Grad-CAM of class {k}: the reference is zero everywhere, ours returned a map")
        keep = [i for i, k in enumerate(top) if k not in empty]
        if not keep:
            return
        top, expected = [top[i] for i in keep], expected[keep]
    _close(cam.low_resolution(pixels, top), expected, tol, "Grad-CAM (feature resolution)")
    public = explainer.gradcam(net, pixels, top)
    size = pixels.shape[1::-1]
    up = np.stack([np.maximum(np.asarray(Image.fromarray(m.astype(np.float32)).resize(size, Image.BICUBIC)), 0)
                   for m in expected])
    _close(public, up, tol, "Grad-CAM (public map)")


def _gradient(net, pixels, top, refs, key, method, half):
    """Signed attributions (K, 3, H, W) equal Captum's on the source model w.r.t. the pixels; the public
    map is the sum over channels of their magnitude, rescaled to [0, 1] per map. Tolerance: TOL, or
    twice the reference's own float32 sensitivity where that is larger (source_references.py: the same
    gradient in another memory layout; GoogLeNet's 3e-2)."""
    import explainer
    from explainer.methods.gradients import pixel_attributions

    expected = refs[key]
    tol = max(TOL_HALF if half else TOL, 2 * float(refs[key + "_noise"]))
    corr_tol = 2e-2 if half else 1e-4
    _agree(pixel_attributions(net, pixels, top, method=method), expected, tol, f"{method} (signed)", corr_tol)
    public = explainer.gradient_attribution(net, pixels, top, method=method, verbose=False)
    summed = np.abs(expected).sum(axis=1)
    lo, hi = summed.min(axis=(1, 2), keepdims=True), summed.max(axis=(1, 2), keepdims=True)
    _agree(public, (summed - lo) / (hi - lo), tol, f"{method} (public map)", corr_tol)


def _deep_dream(net, layer, start, top, refs, half):
    """One step from the image on the first label's score, and on the default Grad-CAM layer's channel
    varying most over the image, equals the source model's gradient-ascent step (source_references.py), as the
    gradients agree (``_agree``: ReLU gates within rounding of zero; the reference's own float32
    sensitivity, here the larger of the step's and the score gradient's). The layer's step is compared
    where its mean gradient is above 1e-8: the seeded MobileNetV3's, GoogLeNet's and LeViT's last
    features barely depend on the image (1e-13, 5e-11, 3e-9: rounding noise, LeViT's correlating
    -0.006 with the source model's, no direction to compare)."""
    import explainer

    tol = max(TOL_HALF if half else TOL, 2 * float(refs["dream_noise"]), 2 * float(refs["gradient_noise"]))
    corr_tol = 2e-2 if half else 1e-4
    steps = [(net.layer(net.gradient_scores).name, top[0], refs["dream_score"], "deep dream step (score)")]
    if float(refs["dream_gradient"]) > 1e-8:
        steps.append((layer, int(refs["dream_channel"]), refs["dream"], "deep dream step (layer)"))
    for name, channel, expected, what in steps:
        ours = explainer.deep_dream_image(net, name, [channel], num_iterations=1, pyramid_levels=1,
                                          output_scaling="none", initial_image=start, verbose=False)
        assert ours.shape == (1, *net.input.size, 3), ours.shape
        _agree(ours[0] - start.astype(np.float32), expected - start, tol, what, corr_tol)


def _mean_colour(pixels):  # the documented "auto" mask value: the image's mean colour
    return pixels.reshape(-1, 3).astype(np.float64).mean(axis=0)


def _occlusion(net, path, variant, pixels, top, half):
    """A few cells of the grid of probability drops (112-pixel masks every 56, centres from the first
    pixel, clipped at the borders, filled with the image's mean colour) equal the drops onnxruntime
    gives by hand."""
    import explainer

    grid = explainer.occlusion_sensitivity(net, pixels, top, mask_size=112, stride=56, output_upsampling="none",
                                           verbose=False)
    h, w = pixels.shape[:2]
    assert grid.shape == (len(top), len(range(0, h, 56)), len(range(0, w, 56))), grid.shape
    cells = [(0, 0), (1, 2), (grid.shape[1] - 1, 1)]
    images = [pixels.astype(np.float64)]
    for i, j in cells:
        img = pixels.astype(np.float64).copy()
        img[max(0, i * 56 - 56):i * 56 + 56, max(0, j * 56 - 56):j * 56 + 56] = _mean_colour(pixels)
        images.append(img)
    probs = source_references.ort_probabilities(path, variant, np.stack(images))[:, top]
    expected = probs[0] - probs[1:]
    got = np.stack([grid[:, i, j] for i, j in cells])
    error = np.abs(got - expected).max()
    MEASURED["occlusion (absolute)"] = (float(error), float("nan"))
    assert error <= (PROB_TOL_HALF if half else PROB_TOL), f"occlusion drops differ from onnxruntime by {error:.2e}"
    assert np.abs(expected).max() > 0


def _lime(net, path, variant, pixels, top, half):
    """The first samples' probabilities equal onnxruntime's on the images they describe (switched-off
    superpixels in the image's mean colour), and the linear surrogate equals scikit-learn's Ridge
    (alpha 1, the lime package's regressor) with lime's kernel on the cosine distance."""
    from sklearn.linear_model import Ridge

    import explainer

    exp = explainer.lime_explanation(net, pixels, top[0], num_features=16, num_samples=64, model="linear",
                                     stop_tolerance=None, random_state=0, verbose=False)
    assert exp.map.shape == (1, *pixels.shape[:2]) and exp.samples.shape[0] == 64, (exp.map.shape, exp.samples.shape)
    picks = [0, 1, 2]
    images = []
    for i in picks:
        img = pixels.astype(np.float64).copy()
        img[exp.samples[i][exp.segments] == 0] = _mean_colour(pixels)
        images.append(img)
    expected = source_references.ort_probabilities(path, variant, np.stack(images))[:, top[0]]
    error = np.abs(exp.probabilities[picks, 0] - expected).max()
    MEASURED["lime samples (absolute)"] = (float(error), float("nan"))
    assert error <= (PROB_TOL_HALF if half else PROB_TOL), f"LIME sample probabilities differ by {error:.2e}"
    s = exp.samples.astype(np.float64)
    norms = np.linalg.norm(s, axis=1) * np.sqrt(s.shape[1])
    distance = np.where(norms > 0, 1 - s.sum(axis=1) / np.where(norms > 0, norms, 1), 1.0)
    kernel = np.sqrt(np.exp(-distance ** 2 / 0.25 ** 2))
    ridge = Ridge(alpha=1.0).fit(s, exp.probabilities[:, 0].astype(np.float64), sample_weight=kernel)
    _close(exp.weights[0], ridge.coef_, 1e-4, "LIME weights vs sklearn Ridge")
    _close(exp.map[0], ridge.coef_[exp.segments], 1e-4, "LIME map")


def _rise(net, path, variant, pixels, top, half):
    """RISE with 4 masks and the paper's estimator equals sum_i P(M_i x image + (1 - M_i) x fill) M_i /
    (N p) with the probabilities from onnxruntime by hand (fill: the image's mean colour)."""
    import explainer
    from explainer.methods.rise import rise_masks

    ours = explainer.rise(net, pixels, top, num_masks=4, estimator="paper", random_state=0, verbose=False)
    masks = rise_masks(net, 4, 7, 0.5, random_state=0).masks().astype(np.float64)
    fill = _mean_colour(pixels)  # unrounded: a uint8 input gets the blend rounded, once
    images = fill + masks[..., None] * (pixels.astype(np.float64) - fill)
    probs = source_references.ort_probabilities(path, variant, images)[:, top]
    expected = np.einsum("nk,nhw->khw", probs, masks) / (4 * 0.5)
    error = np.abs(ours - expected).max()
    MEASURED["rise (absolute)"] = (float(error), float("nan"))
    tol = (PROB_TOL_HALF if half else PROB_TOL) * 4 / (4 * 0.5)  # 4 probabilities, each / (N p)
    assert error <= tol, f"RISE differs from onnxruntime by {error:.2e}"
    assert np.ptp(expected) > 0


def _activations(net, img):
    import explainer

    layer = explainer.gradcam_layers(net)[0]
    acts = net.activations(img, layer)
    layout = net.layout(layer)
    assert acts.shape == (layout.channels, *layout.grid) and np.all(np.isfinite(acts)), acts.shape
    return layer


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
             "as (C, H, W). Every map is of the image at the network's size (integer pixels) for its top "
             "2 classes and equals an independent reference. The gradient methods: the same method on the "
             "source torch model the file was exported from (tests/source_references.py): `gradcam` = "
             "pytorch-grad-cam's raw map (no min-max scaling) at the module its README documents "
             "(source_references.TARGETS, the one table of target layers, says where ours is another tensor and "
             "why), at the feature resolution and as our public bicubic-upsampled map; `gradient` and "
             "`guided-backprop` = Captum's Saliency and GuidedBackprop w.r.t. the pixels (signed, per "
             "channel, and our public maps); `deep-dream` = one gradient-ascent step on the top class's "
             "score and on the layer's channel varying most over the image (where its mean gradient is "
             "above 1e-8, float32 noise on some seeded models). Tolerance: 1e-4 of the reference's range, or twice the "
             "reference's own float32 sensitivity (the same computation in another memory layout) where "
             "larger; gradients where ReLU gates within rounding of zero flip: at most 10 % of the values "
             "beyond 10 times it, correlation 0.9999, the same scale; `fp16` and `mixed` 5e-2 (correlation 0.98). "
             "The forward-only methods against the file run on onnxruntime by hand (a session of its own, "
             "preprocessing written in the test): `occlusion` = three cells of the grid of probability "
             "drops, `lime` = three samples' probabilities and the linear surrogate against "
             "scikit-learn's Ridge with lime's kernel, `rise` = the whole map of 4 masks (the paper's "
             "estimator); absolute 2e-5 in probability (fp16 2e-3).", "",
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
