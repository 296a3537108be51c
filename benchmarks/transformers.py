"""Faithfulness and speed of the explanation methods on a vision transformer that learned something, in
one run on one machine.

    python -m benchmarks.transformers            # full run: writes results/transformers.{json,md}, README
    python -m benchmarks.transformers --quick    # fewer images and masks; prints, writes no file
    python -m benchmarks.transformers --quiet    # no progress lines
    python -m benchmarks.transformers --report benchmarks/results/transformers.json   # tables again, no run

The model is the test fixture ``tests/trained_vit.py``: a small timm ViT (class token, 24 x 24 input,
6 x 6 patches, 4 blocks) trained on scikit-learn's digits, exported to ONNX (made once, cached). The
methods: gradcam, attention_rollout, transformer_attribution, attn_lrp (when the registry has it), rise
and random (uniform noise per pixel: the chance level), each with the library's defaults (RISE:
``num_masks`` 2000, 500 with ``--quick``; seeded), explaining the class the model predicts.

* faithfulness, over the first N held-out digits (N = 50, 10 with ``--quick``), ``explainer.evaluate``
  with 100 steps: deletion AUC with ROAD's noisy linear imputation (``baseline="impute"``, most relevant
  pixels removed first: lower is better), ROAD's least-relevant-first order (the same deletion of the
  negated map: higher is better), and insertion AUC from the blurred digit (the library's default:
  higher is better);
* model randomisation (Adebayo et al. 2018), cascading from the top: the classifier head re-initialised,
  then the blocks from the last to the first, then the embeddings (patch projection, class token,
  positions), each stage keeping the stages before it; every stage exported again to ONNX and explained
  on the first M held-out digits (M = 20, 5 with ``--quick``) for the class the trained model predicts.
  Similarity of each map to the trained model's: Spearman rank correlation of the maps and of their
  absolute values (Adebayo et al. report both: a signed map whose sign flips with a random head but
  whose magnitudes still trace the digit keeps the absolute ranking), and SSIM of the maps scaled to
  [0, 1]. A method *passes* when both mean Spearman correlations are below 0.5 at every stage: its
  maps depend on the weights the model learned, down to the head. A map that the method refuses
  (Grad-CAM's ``DegenerateMapError``) or that is constant keeps nothing of the original: similarity 0;
* speed, on the digits ViT and on the tests' 224-pixel ``vit_tiny`` (seeded weights, legacy export):
  attention rollout over one onnxruntime forward pass of the same image (``net.predict``), and transformer
  attribution over one forward and backward pass of the converted module (``torch_engine(net).pixel_model``,
  the gradient of the class score) on the same image; each pair runs alternately (medians of the
  per-round ratios), the targets are 1.5 and 3; rollout also on 16 images in one call against
  ``net.predict`` of the same 16.

Seeded throughout (RISE ``random_state=0``, random maps one seed per digit, ROAD's noise per step), so
the faithfulness and randomisation figures repeat run to run; the timings vary with the machine's load.
Writes ``benchmarks/results/transformers.json`` and ``transformers.md`` and puts the tables into the
README between its ``transformers table`` markers (full runs only).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .run import paired

RESULTS = Path(__file__).with_name("results")
README = Path(__file__).resolve().parent.parent / "README.md"
README_START = "<!-- transformers table: written by python -m benchmarks.transformers -->"
README_END = "<!-- end of transformers table -->"
METHODS = ("gradcam", "attention_rollout", "transformer_attribution", "attn_lrp", "rise", "random")
PASS_BELOW = 0.5  # mean Spearman correlations (maps, absolute values) at every stage of the cascade
TARGETS = {"attention_rollout": 1.5, "transformer_attribution": 3.0}
STEPS = 100

_quiet = False


def say(*args) -> None:
    if not _quiet:
        print(*args, file=sys.stderr, flush=True)


def _tests_on_path() -> None:
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def available(methods) -> tuple[list[str], list[str]]:
    """(methods in the registry, methods missing from it)."""
    import explainer

    present, missing = [], []
    for name in methods:
        try:
            explainer.get_method(name)
            present.append(name)
        except Exception:  # noqa: BLE001 - a method another change has not added yet
            missing.append(name)
    return present, missing


def explain(net, name: str, image, label: int, index: int, quick: bool):
    """The map of method ``name`` with the library's defaults, seeded; None where the method refuses."""
    import explainer
    from explainer.errors import DegenerateMapError

    chosen = explainer.get_method(name)
    options = {}
    if "verbose" in chosen.options:
        options["verbose"] = False
    if name == "rise":
        options.update(num_masks=500 if quick else 2000, random_state=0)
    if name == "random":
        options.update(random_state=index)  # one map per image, the same on every model
    try:
        return chosen(net, image, label, **options)
    except DegenerateMapError:
        return None


# faithfulness -------------------------------------------------------------------------------------------

def faithfulness(net, methods, images, labels, quick) -> dict:
    from explainer import evaluate

    out = {}
    for name in methods:
        seconds, deletion, lerf, insertion, refused = [], [], [], [], 0
        explain(net, name, images[0], labels[0], 0, quick)  # warm-up: conversion, sessions
        for i, (image, label) in enumerate(zip(images, labels)):
            start = time.perf_counter()
            m = explain(net, name, image, label, i, quick)
            seconds.append(time.perf_counter() - start)
            if m is None:
                refused += 1
                continue
            deletion.append(evaluate.deletion(net, image, m, label, steps=STEPS, baseline="impute", verbose=False).auc)
            lerf.append(evaluate.deletion(net, image, -m, label, steps=STEPS, baseline="impute", verbose=False).auc)
            insertion.append(evaluate.insertion(net, image, m, label, steps=STEPS, verbose=False).auc)
        out[name] = dict(images=len(deletion), refused=refused, map_seconds=float(np.mean(seconds)),
                         deletion=_mean_sem(deletion), lerf=_mean_sem(lerf), insertion=_mean_sem(insertion))
        say(f"faithfulness {name}: {out[name]}")
    return out


def _mean_sem(values) -> list:
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return [None, None]
    return [float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0]


# model randomisation ------------------------------------------------------------------------------------

def stages(model) -> list[tuple[str, list]]:
    """The cascade, top down: (stage name, modules and parameters it re-initialises)."""
    blocks = [(f"block {i + 1}", [model.blocks[i]]) for i in reversed(range(len(model.blocks)))]
    return [("head", [model.head, model.norm]), *blocks,
            ("embeddings", [model.patch_embed, model.cls_token, model.pos_embed])]


def reinitialise(parts, seed: int) -> None:
    """Fresh weights as at construction: ``reset_parameters`` of every submodule that has one (Linear,
    Conv2d, LayerNorm), the class token and positions drawn as timm draws them (normal, std 0.02)."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for part in parts:
            if isinstance(part, torch.nn.Parameter):
                part.normal_(0.0, 0.02)
                continue
            for module in part.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()


def similarity(a, b) -> dict:
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    if a is None or b is None or np.ptp(a) == 0 or np.ptp(b) == 0:
        return dict(spearman=0.0, spearman_abs=0.0, ssim=0.0, constant=True)

    def unit(m):
        return (m - m.min()) / np.ptp(m)

    return dict(spearman=float(spearmanr(a.ravel(), b.ravel())[0]),
                spearman_abs=float(spearmanr(np.abs(a).ravel(), np.abs(b).ravel())[0]),
                ssim=float(structural_similarity(unit(a), unit(b), data_range=1.0)), constant=False)


def randomisation(trained_net, methods, images, labels, quick) -> dict:
    import explainer
    import trained_vit

    model = trained_vit.trained_model()
    pairs = list(enumerate(zip(images, labels)))
    originals = {name: [explain(trained_net, name, im, lab, i, quick) for i, (im, lab) in pairs] for name in methods}
    out = {name: [] for name in methods}
    names = []
    with tempfile.TemporaryDirectory() as folder:
        for seed, (stage, parts) in enumerate(stages(model), start=1):
            reinitialise(parts, seed)
            path = Path(folder) / f"stage{seed}.onnx"
            trained_vit.export_onnx(model, path)
            net = explainer.load(path)
            names.append(stage)
            for name in methods:
                sims = [similarity(originals[name][i], explain(net, name, im, lab, i, quick)) for i, (im, lab) in pairs]
                row = {key: float(np.mean([s[key] for s in sims])) for key in ("spearman", "spearman_abs", "ssim")}
                row.update(stage=stage, constant=int(sum(s["constant"] for s in sims)))
                out[name].append(row)
                say(f"randomisation {stage} {name}: {row}")
            _, _, held_out, truth = trained_vit.digits()
            accuracy = float((net.predict(held_out).argmax(1) == truth).mean())
            for name in methods:
                out[name][-1]["accuracy"] = accuracy
    return dict(stages=names, methods=out, passes=verdicts(out))


def verdicts(methods: dict) -> dict:
    """Method -> passes: both mean Spearman correlations (maps, absolute values) below ``PASS_BELOW`` at
    every stage of the cascade."""
    return {name: bool(all(max(r["spearman"], r["spearman_abs"]) < PASS_BELOW for r in rows))
            for name, rows in methods.items()}


# speed ----------------------------------------------------------------------------------------------------

def speed(net, model_name: str, image, quick: bool) -> list[dict]:
    import explainer
    from explainer.runtime.torch_engine import torch_engine

    label = int(np.argmax(net.predict(image)))
    calls = max(1, int(round(0.2 / _once(lambda: net.predict(image)))))  # about 0.2 s per timing
    rounds = 3 if quick else 7
    rows = []
    rollout = lambda: explainer.attention_rollout(net, image, label)  # noqa: E731
    forward = lambda: net.predict(image)  # noqa: E731
    ours_s, base_s, ratio = paired(rollout, forward, rounds, calls)
    rows.append(dict(model=model_name, method="attention_rollout", baseline="one onnxruntime forward pass "
                     "(net.predict, same image)", ours_s=ours_s, base_s=base_s, ratio=ratio,
                     target=TARGETS["attention_rollout"]))
    batch = np.stack([image] * 16)  # the per-call cost shared by 16 images
    ours_s, base_s, ratio = paired(lambda: explainer.attention_rollout(net, batch, label),
                                      lambda: net.predict(batch), rounds, max(1, calls // 8))
    rows.append(dict(model=model_name, method="attention_rollout", baseline="net.predict, the same 16 images "
                     "in one call", ours_s=ours_s, base_s=base_s, ratio=ratio, target=TARGETS["attention_rollout"]))
    engine = torch_engine(net)
    x = engine.tensor(net.fit_pixels(image)).permute(2, 0, 1)[None]
    attribution = lambda: explainer.transformer_attribution(net, image, label)  # noqa: E731
    calls = max(1, int(round(0.2 / _once(attribution))))
    ours_s, base_s, ratio = paired(attribution, _forward_backward(engine, x, label), rounds, calls)
    rows.append(dict(model=model_name, method="transformer_attribution", baseline="one forward + backward "
                     "pass of the converted module (d class score / d pixels, same image)", ours_s=ours_s,
                     base_s=base_s, ratio=ratio, target=TARGETS["transformer_attribution"]))
    for r in rows:
        say(f"speed {model_name} {r['method']}: {r['ratio']:.2f} ({r['ours_s'] * 1e3:.2f} / "
            f"{r['base_s'] * 1e3:.2f} ms)")
    return rows


def _forward_backward(engine, x, label):
    import torch

    def run():
        with torch.enable_grad():
            pixels = x.clone().requires_grad_(True)
            scores = engine.pixel_model(pixels).reshape(1, -1)
            torch.autograd.grad(scores[0, label], pixels)
    return run


def _once(fn) -> float:
    fn()
    start = time.perf_counter()
    fn()
    return max(time.perf_counter() - start, 1e-6)


# report -------------------------------------------------------------------------------------------------

def _pm(pair) -> str:
    return "—" if pair[0] is None else f"{pair[0]:.3f} ± {pair[1]:.3f}"


def tables(result) -> str:
    """The markdown tables of a run (the README quotes them)."""
    meta, faith, rand, speed_rows = result["meta"], result["faithfulness"], result["randomisation"], result["speed"]
    lines = [f"Run of {meta['date']} ({meta['mode']}, {meta['seconds']:.0f} s). Machine: {meta['cpu']}; "
             f"{meta['cpus']} CPUs; onnxruntime {meta['onnxruntime']}, torch {meta['torch']}; 5-minute load "
             f"average before / after: {meta['load_average'][0]} / {meta['load_average'][1]}. Model: "
             f"{meta['model']}, held-out accuracy {meta['accuracy']:.3f} ({meta['held_out']} digits; trained in "
             f"{meta['train_seconds']:.0f} s)." + (f" Missing from the registry: {', '.join(meta['missing'])}."
                                                  if meta["missing"] else ""), "",
             f"| method | deletion AUC, ROAD (lower is better) | least-relevant-first AUC, ROAD "
             f"(higher is better) | insertion AUC from blur (higher is better) | randomisation: highest Spearman "
             f"over the cascade, maps / absolute values | SSIM, whole model | randomisation test |",
             "|---|---|---|---|---|---|---|"]
    passes = verdicts(rand["methods"])
    for name, row in faith.items():
        cascade = rand["methods"][name]
        verdict = "passes" if passes[name] else "**fails**"
        worst = (max(r["spearman"] for r in cascade), max(r["spearman_abs"] for r in cascade))
        refused = f" ({row['refused']} refused)" if row["refused"] else ""
        lines.append(f"| `{name}` | {_pm(row['deletion'])}{refused} | "
                     f"{_pm(row['lerf'])} | {_pm(row['insertion'])} | {worst[0]:.2f} / {worst[1]:.2f} | "
                     f"{cascade[-1]['ssim']:.2f} | {verdict} |")
    lines += ["", f"Means ± standard errors over {meta['images']} held-out digits, each explained for the class "
              f"the model predicts; {STEPS} steps. Randomisation: mean similarity over {meta['random_images']} "
              "digits between the map on the trained model and on the randomised one.", "",
              "Cascading randomisation, mean Spearman correlation per stage, of the maps / of their absolute "
              "values (each stage re-initialises its part and keeps the ones before it; the model's held-out "
              "accuracy after the stage in the last row):", "",
              "| method | " + " | ".join(f"+ {s}" for s in rand["stages"]) + " |",
              "|---|" + "---|" * len(rand["stages"])]
    for name, rows in rand["methods"].items():
        cells = " | ".join(f"{r['spearman']:.2f} / {r['spearman_abs']:.2f}"
                           + (f" ({r['constant']} constant)" if r["constant"] else "")
                           for r in rows)
        lines.append(f"| `{name}` | {cells} |")
    first = next(iter(rand["methods"].values()))
    lines.append("| accuracy | " + " | ".join(f"{r['accuracy']:.2f}" for r in first) + " |")
    failed = [f"`{name}`" for name, ok in passes.items() if not ok]
    lines += ["", f"A method passes when both mean Spearman correlations are below {PASS_BELOW} at every stage "
              "(a refused or constant map counts as 0). "
              + (f"Fail the randomisation test in this run: {', '.join(failed)}." if failed
                 else "Every method passes in this run."), "",
              "| model | method | baseline | method (ms) | baseline (ms) | ratio | target |",
              "|---|---|---|---|---|---|---|"]
    for r in speed_rows:
        met = "met" if r["ratio"] <= r["target"] else "**missed**"
        lines.append(f"| {r['model']} | `{r['method']}` | {r['baseline']} | {r['ours_s'] * 1e3:.2f} | "
                     f"{r['base_s'] * 1e3:.2f} | {r['ratio']:.2f} | ≤ {r['target']} ({met}) |")
    lines += ["", "Ratio: median over alternating rounds of the method's time per call over the baseline's "
              "(single images unless the baseline says 16)."]
    return "\n".join(lines) + "\n"


def update_readme(text: str) -> bool:
    """Put a full run's tables between the README's markers; False (file untouched) without them."""
    readme = README.read_text()
    start, end = readme.find(README_START), readme.find(README_END)
    if start < 0 or end < start:
        return False
    README.write_text(readme[:start + len(README_START)] + "\n" + text + readme[end:])
    return True


def main(argv=None) -> int:
    global _quiet
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 digits (5 for randomisation), 500 RISE masks, "
                        "fewer timing rounds; prints, writes no file")
    parser.add_argument("--images", type=int, default=None, help="held-out digits for faithfulness (default 50)")
    parser.add_argument("--random-images", type=int, default=None,
                        help="held-out digits for the randomisation test (default 20)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--report", metavar="JSON", default=None,
                        help="measure nothing: write the markdown (and, for a full run, the README tables) again "
                             "from a run's JSON, e.g. benchmarks/results/transformers.json")
    args = parser.parse_args(argv)
    _quiet = args.quiet
    if args.report:
        return write(json.loads(Path(args.report).read_text()))
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    load_before = os.getloadavg()[1]
    _tests_on_path()
    import onnxruntime
    import torch

    import explainer
    import exports
    import trained_vit

    from .run import cpu_model

    say("training or loading the digits ViT ...")
    net = explainer.load(trained_vit.export())
    info = trained_vit.training_info()
    _, _, held_out, truth = trained_vit.digits()
    accuracy = float((net.predict(held_out).argmax(1) == truth).mean())
    n = args.images or (10 if args.quick else 50)
    m = args.random_images or (5 if args.quick else 20)
    images = list(held_out[:n])
    labels = [int(i) for i in net.predict(held_out[:n]).argmax(1)]
    methods, missing = available(METHODS)
    sections = {}
    at = time.perf_counter()
    faith = faithfulness(net, methods, images, labels, args.quick)
    sections["faithfulness"], at = time.perf_counter() - at, time.perf_counter()
    rand = randomisation(net, methods, images[:m], labels[:m], args.quick)
    sections["randomisation"], at = time.perf_counter() - at, time.perf_counter()
    speed_rows = speed(net, "digits ViT (24 px, 37 tokens)", held_out[0], args.quick)
    vit_tiny = explainer.load(exports.export("vit_tiny", "legacy"), preprocessing="imagenet")  # as built
    speed_rows += speed(vit_tiny, "vit_tiny (224 px, 197 tokens, seeded)", explainer.sample_image("chelsea"),
                        args.quick)
    sections["speed"] = time.perf_counter() - at
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), mode="quick" if args.quick else "full",
                cpu=cpu_model(), machine=platform.machine(), cpus=os.cpu_count(),
                onnxruntime=onnxruntime.__version__, torch=torch.__version__,
                model=f"tests/trained_vit.py (recipe {trained_vit.recipe_key()})", accuracy=accuracy,
                held_out=int(len(truth)), train_seconds=info["train_seconds"], images=n, random_images=m,
                methods=methods, missing=missing, rise_masks=500 if args.quick else 2000, steps=STEPS,
                pass_below=PASS_BELOW, section_seconds={k: round(v, 1) for k, v in sections.items()})
    meta["seconds"] = time.perf_counter() - started
    meta["load_average"] = [round(load_before, 2), round(os.getloadavg()[1], 2)]
    meta["defaults"] = not (args.images or args.random_images)
    return write(dict(meta=meta, faithfulness=faith, randomisation=rand, speed=speed_rows))


def write(result) -> int:
    """Print the run's tables; for a full run also write ``transformers.json`` and ``.md`` and, at the
    default sizes, the README's tables (verdicts recomputed from the similarities by ``verdicts``)."""
    meta = result["meta"]
    result["randomisation"]["passes"] = verdicts(result["randomisation"]["methods"])
    meta["criterion"] = (f"passes: mean Spearman correlation of the maps and of their absolute values below "
                         f"{PASS_BELOW} at every stage of the cascade")
    text = tables(result)
    page = f"# Transformers: faithfulness and speed ({meta['date']})\n\n" + text
    print(page)
    if meta["mode"] != "full":
        return 0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "transformers.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "transformers.md").write_text(page)
    if meta.get("defaults", True):
        update_readme(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
