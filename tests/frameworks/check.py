"""Every public method of the library on one cross-framework export, checked against the SOURCE
framework's own probabilities (reference.npz, written by build.py). Used by test_frameworks.py and,
to write the table, run as a script (main venv, after build.py):

    python tests/frameworks/check.py [--write docs/compatibility-frameworks.md] [--published] [--extra] [-v] [CASE ...]

``table(rows)`` returns the markdown, for a docs writer that wants to call it.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases as cases_mod  # noqa: E402

CHECKS = ("load", "probs", "activations", "gradcam", "gradient", "guided-backprop", "occlusion", "lime",
          "rise", "deep-dream")
PROB_TOLERANCE = 1e-4
BUILD_HINT = "run `python tests/frameworks/build.py` (main venv) first"


class MissingCase(Exception):
    pass


def files(name: str) -> tuple[Path, dict, np.ndarray, np.ndarray]:
    """(model path, case.json, pixels, probs) of a built case; MissingCase when it is not built."""
    folder = cases_mod.cases_root() / name
    needed = [folder / f for f in ("model.onnx", "reference.npz", "case.json")]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise MissingCase(f"case {name!r} is not built (no {', '.join(missing)} in {folder}): {BUILD_HINT}"
                          + (f" --{cases_mod.CASES[name]['optional']}" if cases_mod.CASES[name]["optional"] else ""))
    info = json.loads((folder / "case.json").read_text())
    with np.load(folder / "reference.npz", allow_pickle=False) as ref:
        pixels, probs = ref["pixels"], ref["probs"]
    return folder / "model.onnx", info, pixels, probs


def onnxruntime_probs(path: Path, info: dict, pixels: np.ndarray) -> np.ndarray:
    """The export run by plain onnxruntime on the declared preprocessing (no library but its
    Preprocessing): tells the exporter's own error from the library's."""
    import onnxruntime as ort

    from explainer.model import preprocess

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pre = preprocess.resolve(info["preprocessing"])
    x = pre.normalise(pixels.astype(np.float32))
    if info["layout"] == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    feed = session.get_inputs()[0]
    fixed = isinstance(feed.shape[0], int) and feed.shape[0] == 1
    outs = [session.run(None, {feed.name: np.ascontiguousarray(x[i:i + 1])})[0] for i in range(len(x))] \
        if fixed else [session.run(None, {feed.name: np.ascontiguousarray(x)})[0]]
    raw = np.concatenate(outs).reshape(len(x), -1).astype(np.float64)
    if info["outputs"] == "probabilities":
        return raw.astype(np.float32)
    z = np.exp(raw - raw.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def check(name: str, checks=CHECKS, verbose: bool = False) -> tuple[dict[str, str], dict]:
    """(check -> "ok" or the error, facts: max |Δprob| vs the source framework, onnxruntime's own
    |Δprob|, the default layer, seconds per check); raises only MissingCase."""
    import explainer

    path, info, pixels, expected = files(name)
    results: dict[str, str] = {}
    facts: dict = {"seconds": {}}
    started = time.perf_counter()
    try:
        _run_checks(explainer, path, info, pixels, expected, checks, verbose, results, facts)
    finally:
        facts["total_seconds"] = round(time.perf_counter() - started, 1)
    return results, facts


def _run_checks(explainer, path, info, pixels, expected, checks, verbose, results, facts) -> None:

    def run(what, fn):
        if what not in checks:
            return None
        start = time.perf_counter()
        try:
            value = fn()
            results[what] = "ok"
            return value
        except Exception as exc:  # recorded: the table and the test show it
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            results[what] = f"{type(exc).__name__}: {text}"
            if verbose:
                traceback.print_exc()
            return None
        finally:
            facts["seconds"][what] = round(time.perf_counter() - start, 2)

    try:
        facts["ort_delta"] = float(np.abs(onnxruntime_probs(path, info, pixels) - expected).max())
    except Exception as exc:
        facts["ort_delta_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    net = run("load", lambda: explainer.load(str(path), preprocessing=info["preprocessing"]))
    if net is None:
        return
    img = pixels[0]
    size = tuple(info["input_size"])

    def probs():
        ours = net.predict(pixels)
        assert ours.shape == expected.shape, f"predict gave {ours.shape}, the source framework {expected.shape}"
        facts["delta"] = delta = float(np.abs(ours - expected).max())
        top_ours, top_theirs = ours.argmax(axis=1).tolist(), expected.argmax(axis=1).tolist()
        assert top_ours == top_theirs, f"top-1 {top_ours} vs the source framework's {top_theirs}"
        assert delta <= PROB_TOLERANCE, f"probabilities differ from the source framework's by {delta:.2e}"

    run("probs", probs)
    try:
        top = [int(i) for i in np.argsort(-net.predict(img), kind="stable")[:2]]
    except Exception:  # the probs check has recorded why
        top = [0, 1]
    try:
        layer = explainer.gradcam_layers(net)[0]
    except Exception as exc:  # reported by the checks that need it
        layer = None
        facts["layer_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    facts["layer"] = layer

    def activations():
        assert layer is not None, f"no default Grad-CAM layer: {facts.get('layer_error')}"
        acts = net.activations(img, layer)
        layout = net.layout(layer)
        assert layout is not None, f"layer {layer!r} is not a feature map"
        finite(acts, (layout.channels, *layout.grid))
        return acts

    run("activations", activations)
    run("gradcam", lambda: finite(explainer.gradcam(net, img, top), (2, *size)))

    def gradient():
        finite(explainer.gradient_attribution(net, img, top[0], verbose=False), size)
        rise_along_gradient(net, img, top[0], facts)

    run("gradient", gradient)
    run("guided-backprop", lambda: finite(explainer.gradient_attribution(
        net, img, top[0], method="guided-backprop", verbose=False), size))
    mask = max(2, size[0] // 2)
    run("occlusion", lambda: finite(explainer.occlusion_sensitivity(
        net, img, top[0], mask_size=mask, stride=max(1, mask // 2), verbose=False), size))
    run("lime", lambda: finite(explainer.image_lime(net, img, top[0], num_features=16, num_samples=64,
                                                    model="linear", random_state=0, verbose=False), size))
    run("rise", lambda: finite(explainer.rise(net, img, top[0], num_masks=32, random_state=0, verbose=False),
                               size))

    def deep_dream():
        assert layer is not None, f"no default Grad-CAM layer: {facts.get('layer_error')}"
        dream = np.asarray(explainer.deep_dream_image(net, layer, [0], num_iterations=1, pyramid_levels=1,
                                                      verbose=False, random_state=0))
        assert dream.ndim == 4 and dream.shape[:3] == (1, *size), dream.shape
        finite(dream, dream.shape)

    run("deep-dream", deep_dream)


#: how far the score's rise along our gradient, measured on the file with onnxruntime, may be from what
#: the gradient says (a relative band: central differences of a smooth score over a step of 0.1 logit)
RISE_BAND = 0.1


def rise_along_gradient(net, img, label: int, facts: dict) -> None:
    """The gradient is the file's: stepping the pixels along our gradient of the class's pre-softmax score
    (the signed gradient w.r.t. the pixels at the network's size, ``pixel_attributions``) raises the
    score, as onnxruntime computes it on the file, by |gradient| per unit step (central differences,
    steps giving about 0.1 of the score, or 0.03 or 0.01 where a longer one is off). An independent truth that does not need the source framework's
    autograd: Hugging Face's LeViT-128S in torch gives a reverse-mode gradient that its own forward
    pass does not follow (0.0087 per unit step where it says 1.95; forward-mode jvp and our module
    agree on 0.0087)."""
    from explainer.methods.gradients import pixel_attributions

    pixels = net.prepare(img)[0][0].astype(np.float64)  # at the network's size, 0..255, as the gradient's
    g = np.asarray(pixel_attributions(net, img, [label], method="autodiff"), np.float64)[0]  # (C, H, W)
    g = g.transpose(1, 2, 0)  # as the pixels, H x W x C
    norm = float(np.linalg.norm(g))
    assert norm > 0, "the gradient is zero"
    logits = net.gradient_scores  # the tensor the library differentiates (the scores before a Softmax)

    def score(p):
        return float(net.ort.run(net.to_model_input(p[None].astype(np.float32)), [logits])[0].reshape(-1)[label])

    u = g / norm
    ratios = []
    # the step (in pixel units, along the unit direction) that moves the score by about 0.1, then by less:
    # a long step crosses ReLU and max-pool kinks where the gradient is small (Paddle's AlexNet, |g| 0.0016:
    # 62 pixel units, ratio 0.89; 0.99 at a change of 0.01); a wrong gradient stays off at every step
    for change in (0.1, 0.03, 0.01):
        step = change / norm
        rise = (score(pixels + step * u) - score(pixels - step * u)) / (2 * step)
        ratios.append(rise / norm)
        if abs(ratios[-1] - 1) <= RISE_BAND:
            break
    facts["gradient_rise"] = ratios[-1]
    assert abs(ratios[-1] - 1) <= RISE_BAND, (
        f"onnxruntime's score rises by {rise:.3g} per unit step along our gradient, which says {norm:.3g} "
        f"(ratios {', '.join(f'{r:.3f}' for r in ratios)} at steps moving the score by 0.1, 0.03, 0.01): the "
        "gradient is not the file's")


def finite(m, shape):
    m = np.asarray(m)
    assert m.shape == tuple(shape), f"shape {m.shape}, expected {tuple(shape)}"
    assert np.all(np.isfinite(m)), "non-finite values"
    assert np.ptp(m) > 0, "the map is constant"
    return m


def failures(results: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in results.items() if v != "ok"}


def table(rows: list[tuple[str, dict, dict[str, str], dict]]) -> str:
    """rows: (case, case.json, results, facts) → the markdown page."""
    import onnx
    import onnxruntime

    import explainer

    lines = [
        "# Compatibility with other frameworks' exporters", "",
        "Every public method on ONNX files written by other frameworks' own exporters, checked against the "
        "SOURCE framework's probabilities on the same pixels. Written by `python tests/frameworks/check.py "
        "--write docs/compatibility-frameworks.md` after `python tests/frameworks/build.py`; "
        "`tests/frameworks/test_frameworks.py` runs the same checks (see tests/frameworks/README.md). "
        f"onnx-explainer {explainer.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}.",
        "",
        f"Checks: `probs` = `net.predict` on the reference pixels equals the source framework's probabilities "
        f"(max |Δ| ≤ {PROB_TOLERANCE:g}, same top-1); `activations` = the default Grad-CAM layer as (C, H, W); "
        "maps are finite, of the image's size and not constant. Weights are seeded, not trained. "
        "`|Δprob|` = ours vs the source framework; `ort |Δ|` = plain onnxruntime on the file vs the source "
        "framework (the exporter's own error).", "",
        "| case | framework | exporter | opset | layout | " + " | ".join(CHECKS) + " | \\|Δprob\\| | ort \\|Δ\\| | s |",
        "|" + "---|" * (len(CHECKS) + 8)]
    notes = []
    for name, info, results, facts in rows:
        cells = []
        for c in CHECKS:
            if c not in results:
                cells.append("–")
            elif results[c] == "ok":
                cells.append("✓")
            else:
                notes.append((name, c, results[c]))
                cells.append(f"✗ [{len(notes)}]")
        delta = f"{facts['delta']:.1e}" if "delta" in facts else "–"
        ort = f"{facts['ort_delta']:.1e}" if "ort_delta" in facts else "–"
        version = info.get("exporter_version", "")
        exporter = version if version.startswith(info["exporter"]) else f"{info['exporter']} ({version})"
        lines.append(f"| {name} | {info.get('framework_version', '?')} | {exporter} | {info.get('opset')} | "
                     f"{info['layout']} | "
                     + " | ".join(cells) + f" | {delta} | {ort} | {facts.get('total_seconds', 0):.0f} |")
    if notes:
        lines += ["", "Failures:", ""]
        lines += [f"{i}. `{name}` {c}: {why.replace('|', '/')}" for i, (name, c, why) in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    write = argv[argv.index("--write") + 1] if "--write" in argv else None
    verbose = "-v" in argv
    subsets = {s for s in cases_mod.SUBSETS if f"--{s}" in argv} | cases_mod.enabled_subsets()
    names = [a for a in argv if a in cases_mod.CASES] or cases_mod.selected(subsets)
    rows, missing = [], []
    for name in names:
        try:
            results, facts = check(name, verbose=verbose)
        except MissingCase as exc:
            missing.append(str(exc))
            continue
        info = json.loads((cases_mod.cases_root() / name / "case.json").read_text())
        rows.append((name, info, results, facts))
        print(name, failures(results) or "all ok", f"Δprob={facts.get('delta')}", f"ort={facts.get('ort_delta')}",
              f"layer={facts.get('layer')}", f"seconds={facts.get('total_seconds')} {facts['seconds']}", flush=True)
    text = table(rows)
    if write:
        Path(write).write_text(text)
    else:
        print(text)
    for line in missing:
        print(line, file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
