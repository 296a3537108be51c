"""RISE beside DIANNA's RISE and beside the forward-pass limit, and its faithfulness beside occlusion
and LIME, in one run on one machine.

    python -m benchmarks.rise [--quick] [--masks 1000 2000] [--parts speed faithfulness efficiency stopping]

Everything runs on the embedded EfficientNet-Lite0, one ONNX file (the cached file ``explainer.load()``
reads), the chelsea photo and class 285 (Egyptian cat):

* speed, per number of masks N: ``explainer`` RISE at onnxruntime's best batch size; DIANNA's
  ``RISEImage(n_masks=N, feature_res=7, p_keep=0.5)`` (p_keep fixed, so it does not spend passes
  tuning it) on the same file, through DIANNA's own ``SimpleModelRunner`` with a softmax after it (the
  file outputs logits; RISE weights masks by probabilities), on the preprocessed image, its default
  batch_size 100; and onnxruntime alone on N images at the same batch size (the limit). Both RISEs
  blend masked pixels toward the input zero (DIANNA multiplies the model input by the mask; ours is
  given ``mask_value`` = the preprocessing's mean), so their maps estimate the same quantity from
  different random masks: the Pearson correlation between them is shown beside the correlation of two
  of our runs with different seeds (the noise floor at that N);
* faithfulness: deletion AUC (to the input zero; lower is better) and insertion AUC (from a blur;
  higher is better), ``explainer.evaluate``, of RISE, occlusion and LIME maps, each with the library's
  defaults, beside random 7 x 7 maps (chance).

* sample efficiency (``--parts efficiency``; issue #31 point 3): RISE at <= 500 passes
  (``estimator="regression"``: complementary mask pairs, ridge on the masks' block means, the masks'
  exact covariance) against the full map, a 4,000-mask run of the library's default RISE
  (``estimator="centred"``, the reference), on the embedded
  EfficientNet-Lite0 and the torchvision resnet18 export of ``benchmarks.openvino`` (seeded weights),
  chelsea / astronaut / coffee, each model's top-1 class, 3 seeds: Pearson r with the references,
  deletion and insertion AUC (``explainer.evaluate``) against the reference's, wall times; the same at
  1,000 passes, and a 4,000-pass regression run (seed 0) against the reference (bias or variance: its
  r against the reference's ceiling); OpenVINO XAI's AISE (preset BALANCE, f32, its pass count) on the same file, image and class beside, run in its
  own environment as ``benchmarks.openvino`` runs it (``--peer-python`` or
  ``$EXPLAINER_OVXAI_PYTHON``; skipped without one);
* stopping on the map's reliability (``--parts stopping``, ``--stop-models``): the same references (made
  once per process when both parts run), and
  ``rise(num_masks=2000, estimator="regression", stop_reliability=0.95)`` over 3 seeds: the passes each
  run drew, r, AUC changes beside the reference halves' own (how far AUCs stray by chance).

Ours and the limit run in turn twice (medians); DIANNA once: a full run takes minutes. Writes
``benchmarks/results/rise.json`` and ``rise.md`` (``--quick`` only prints); ``--parts`` reruns some
parts and keeps the others' last results (each table says the date of its own run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .run import best_batch, cpu_model, forward_pass

RESULTS = Path(__file__).with_name("results")
LABEL = 285


def once(fn):
    """(wall seconds, result) of one call."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def alternate(ours, other, rounds: int = 2):
    """(median time of ``ours``, of ``other``, median per-round ratio, ``ours``' first result): the two
    run in turn, so that a slow spell of a shared machine hits both sides."""
    a, b, first = [], [], None
    for _ in range(rounds):
        seconds, out = once(ours)
        a.append(seconds)
        first = out if first is None else first
        b.append(once(other)[0])
    return float(np.median(a)), float(np.median(b)), float(np.median(np.divide(a, b))), first


def correlation(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def dianna_rise(path: str, model_input: np.ndarray, n: int, batch: int, seed: int):
    """DIANNA's RISE map (H, W) at the network's size; ``model_input`` is the preprocessed (C, H, W) image."""
    from dianna.methods.rise_image import RISEImage
    from dianna.utils.onnx_runner import SimpleModelRunner

    runner = SimpleModelRunner(path)  # a new onnxruntime session per call, as DIANNA runs a file

    def probabilities(x):
        z = runner(x).astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    np.random.seed(seed)  # DIANNA draws its masks from numpy's global generator
    explainer = RISEImage(n_masks=n, feature_res=7, p_keep=0.5, axis_labels={0: "channels"})
    return explainer.explain(probabilities, model_input, labels=[LABEL], batch_size=batch)[0]


def speed(net, image, path, counts, batch) -> list[dict]:
    from explainer.methods._common import resize_map
    from explainer.methods.rise import rise

    pre = net.preprocessing
    zero = np.clip(np.asarray(pre.mean, np.float64) / pre.scale, 0, 255)  # the pixel that becomes input 0
    small = net.fit_pixels(image)
    model_input = net.to_model_input(small[None])[0]

    def ours(n, seed):
        return rise(net, image, LABEL, num_masks=n, mask_value=zero, estimator="paper", batch_size=batch,
                    random_state=seed, verbose=False)

    once(lambda: ours(batch * 4, 0))  # warm-up: sessions made, threads started
    rows = []
    for n in counts:
        ours_s, limit_s, ratio, ours_map = alternate(lambda: ours(n, 0), forward_pass(net, n, batch))
        dianna_s, dianna_map = once(lambda: dianna_rise(path, model_input, n, 100, 0))
        other_seed = ours(n, 1)
        dianna_map = resize_map(dianna_map[None].astype(np.float32), image.shape[:2])[0]
        rows.append(dict(masks=n, batch=batch, ours_s=ours_s, limit_s=limit_s, dianna_s=dianna_s,
                         ours_over_limit=ratio, dianna_over_ours=dianna_s / ours_s,
                         r_ours_dianna=correlation(ours_map, dianna_map),
                         r_ours_ours=correlation(ours_map, other_seed),
                         dianna_mask_bytes=int(n * np.prod(net.input.size) * 4 * (1 + net.input.channels))))
        print(rows[-1], flush=True)
    return rows


def faithfulness(net, image, quick: bool) -> list[dict]:
    import explainer
    from explainer import evaluate
    from explainer.methods.rise import rise

    maps = {
        "rise": lambda: rise(net, image, LABEL, num_masks=500 if quick else 2000, random_state=0, verbose=False),
        "occlusion": lambda: explainer.occlusion_sensitivity(net, image, LABEL, verbose=False),
        "lime": lambda: explainer.image_lime(net, image, LABEL, random_state=0, verbose=False),
    }
    rows = []
    for name, make in maps.items():
        seconds, m = once(make)
        rows.append(dict(method=name, seconds=seconds,
                         deletion_auc=evaluate.deletion(net, image, m, LABEL, verbose=False).auc,
                         insertion_auc=evaluate.insertion(net, image, m, LABEL, verbose=False).auc))
        print(rows[-1], flush=True)
    chance = evaluate.random_map_auc(net, image, LABEL, seeds=2 if quick else 5, cells=7)
    rows.append(dict(method="random 7 x 7 maps (chance)", seconds=None, **chance))
    return rows


EFFICIENT_PASSES = 500
MORE_PASSES = 1000  # the regression at twice the budget: where the criterion is met when 500 falls short
REFERENCE_MASKS = 4000
EFFICIENCY_IMAGES = ("chelsea", "astronaut", "coffee")
_REFERENCES: dict = {}  # (model, image, masks) -> (seconds, halves): made once per process, shared by the parts


def reference_halves(net, model: str, name: str, image, label: int, masks: int):
    """(seconds, the two halves): ``rise(num_masks=masks // 2)`` of the default (centred) estimator with
    seeds 1000 and 1001, whose mean is the reference; computed once per process (efficiency and stopping
    use the same maps)."""
    from explainer.methods.rise import rise

    key = (model, name, masks)
    if key not in _REFERENCES:
        timed = [once(lambda: rise(net, image, label, num_masks=masks // 2, random_state=seed, verbose=False))
                 for seed in (1000, 1001)]
        _REFERENCES[key] = (sum(t for t, _ in timed), [m for _, m in timed])
    return _REFERENCES[key]


def aise_maps(python: str, jobs: list[dict], tmp: str) -> dict:
    """OpenVINO XAI's AISE (f32, preset BALANCE) on each job's file, model input and class, in its own
    environment (``benchmarks.openvino``'s peer): {name: (seconds, passes, map at the network's size)}."""
    from .openvino import run_peer

    job = dict(models=jobs, precisions=["f32"], masks=1, seconds=0.05, aise=True, dir=tmp,
               result=f"{tmp}/peer.json")
    found = run_peer(python, job, f"{tmp}/job.json")
    return {m["name"]: (found["models"][m["name"]]["f32"]["aise_s"], found["models"][m["name"]]["f32"]["aise_passes"],
                        np.load(f"{tmp}/{m['name']}_f32_aise.npy")) for m in jobs}


def efficiency(quick: bool, peer_python: str | None) -> list[dict]:
    """Per model and image: the 4,000-mask references, the <= 500-pass regression maps over seeds, AISE."""
    import tempfile

    import explainer
    from explainer import evaluate
    from explainer.methods._common import resize_map
    from explainer.methods.rise import rise

    from .openvino import model_files

    files = model_files()
    images = EFFICIENCY_IMAGES[:1] if quick else EFFICIENCY_IMAGES
    seeds = (0, 1) if quick else (0, 1, 2)
    reference_masks = 1000 if quick else REFERENCE_MASKS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        loaded, jobs = {}, []
        for model, path in files.items():
            net = explainer.load(path, preprocessing="imagenet" if model == "resnet18" else None)
            for name in images:
                image = explainer.sample_image(name)
                label = int(np.argmax(net.predict(image)))
                key = f"{model}_{name}"
                np.save(f"{tmp}/{key}_input.npy", net.to_model_input(net.fit_pixels(image)[None]))
                jobs.append(dict(name=key, path=str(path), input=f"{tmp}/{key}_input.npy", label=label))
                loaded[key] = (model, net, name, image, label)
        theirs = aise_maps(peer_python, jobs, tmp) if peer_python else {}
        for key, (model, net, name, image, label) in loaded.items():
            def auc(m):
                return dict(deletion=evaluate.deletion(net, image, m, label, verbose=False).auc,
                            insertion=evaluate.insertion(net, image, m, label, verbose=False).auc)

            def run(n, estimator, seed):
                return once(lambda: rise(net, image, label, num_masks=n, estimator=estimator, random_state=seed,
                                         verbose=False))

            rise(net, image, label, num_masks=64, verbose=False)  # warm-up: sessions made, threads started
            # the reference: 4,000 masks of the default estimator, as two halves of 2,000 (seeds 1000, 1001)
            # whose mean is the map; the halves' agreement says how noisy the reference itself is
            reference_s, halves = reference_halves(net, model, name, image, label, reference_masks)
            ref, split = (halves[0] + halves[1]) / 2, correlation(*halves)
            ref_auc = auc(ref)
            row = dict(model=model, image=name, label=label, reference_masks=reference_masks, reference_s=reference_s,
                       r_reference_halves=split, reference_reliability=2 * split / (1 + split),
                       reference_auc=ref_auc, passes=EFFICIENT_PASSES, runs=[], more_passes=MORE_PASSES, more=[])
            for seed in seeds:
                seconds, m = run(EFFICIENT_PASSES, "regression", seed)
                row["runs"].append(dict(seed=seed, seconds=seconds, r=correlation(m, ref), auc=auc(m)))
            for seed in seeds:
                seconds, m = run(MORE_PASSES, "regression", seed)
                row["more"].append(dict(seed=seed, seconds=seconds, r=correlation(m, ref), auc=auc(m)))
            # bias or variance: the regression at the reference's passes (seed 0). Its noise is then small,
            # so r(limit, ref) near the ceiling says that the regression estimates the reference's map
            # (no bias), and what 500 passes lack is passes (variance)
            seconds, m = run(reference_masks, "regression", 0)
            row["limit"] = dict(passes=reference_masks, seed=0, seconds=seconds, r=correlation(m, ref), auc=auc(m))
            if key in theirs:
                seconds, passes, m = theirs[key]
                m = resize_map(m[None].astype(np.float32), image.shape[:2])[0]
                row["aise"] = dict(seconds=seconds, passes=passes, r=correlation(m, ref), auc=auc(m))
            rows.append(row)
            print({k: v for k, v in row.items()}, flush=True)
    return rows


def change(a: float, b: float) -> float:
    """(a - b) / b: the relative change of an AUC from the reference's."""
    return (a - b) / abs(b)


def _worst(runs, ref):
    """The runs' correlations with the reference, and their worst AUC changes over the seeds: deletion's
    largest (a higher deletion AUC is worse), insertion's smallest."""
    return ([x["r"] for x in runs], max(change(x["auc"]["deletion"], ref["deletion"]) for x in runs),
            min(change(x["auc"]["insertion"], ref["insertion"]) for x in runs))


def efficiency_markdown(meta: dict, rows: list[dict]) -> list[str]:
    first = rows[0]
    lines = [f"## Sample efficiency ({meta['date']})", "",
             f"Machine: {meta['cpu']}; {meta['cpus']} CPUs; onnxruntime {meta['onnxruntime']}; 5-minute load "
             f"average before / after the run: {meta['load_average'][0]} / {meta['load_average'][1]}. "
             f"`rise(num_masks={first['passes']}, estimator=\"regression\")` with seeds "
             f"{', '.join(str(r['seed']) for r in first['runs'])} against the reference: "
             f"{first['reference_masks']} masks of the default (centred) estimator, the mean of two "
             f"`rise(num_masks={first['reference_masks'] // 2})` runs (seeds 1000, 1001); grid 7, p 0.5, masked "
             "pixels blended toward the image's mean colour; each model's top-1 class. OpenVINO XAI's AISE: "
             "preset BALANCE, f32, on the same ONNX file, image and class.", "",
             "| model | image | class | reference: r of its halves → reliability | ceiling | r(500, ref) min / median "
             "| deletion AUC: ref; 500, worst change | insertion AUC: ref; 500, worst change | ref (s) | 500 (s) "
             "| AISE passes | AISE (s) | r(AISE, ref) | AISE deletion / insertion AUC (change) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        runs, ref = row["runs"], row["reference_auc"]
        r, dd, di = _worst(runs, ref)
        a = row.get("aise")
        aise = (f"{a['passes']} | {a['seconds']:.2f} | {a['r']:.3f} | {a['auc']['deletion']:.3f} "
                f"({100 * change(a['auc']['deletion'], ref['deletion']):+.0f} %) / {a['auc']['insertion']:.3f} "
                f"({100 * change(a['auc']['insertion'], ref['insertion']):+.0f} %)") if a else "| | |"
        lines.append(f"| {row['model']} | {row['image']} | {row['label']} | {row['r_reference_halves']:.3f} → "
                     f"{row['reference_reliability']:.3f} | {np.sqrt(row['reference_reliability']):.3f} | "
                     f"{min(r):.3f} / {np.median(r):.3f} | {ref['deletion']:.3f}; {100 * dd:+.1f} % | "
                     f"{ref['insertion']:.3f}; {100 * di:+.1f} % | {row['reference_s']:.2f} | "
                     f"{np.median([x['seconds'] for x in runs]):.2f} | {aise} |")
    lines += ["", "r: Pearson correlation of the maps. The reference carries its own sampling noise: its two "
              "halves' correlation r_h gives its reliability 2 r_h / (1 + r_h) (Spearman-Brown: the expected "
              "correlation of two such 4,000-mask maps), and its square root, the ceiling, is about the "
              "correlation a noise-free map would reach with it. Worst change: the seeds' largest relative "
              "change of the AUC from the reference's, toward worse (deletion: + is worse, lower is better; "
              "insertion: - is worse). Times: wall seconds of one call on this machine (500 passes: median "
              "over the seeds); AISE's from its own run in its environment."]
    if not all(row.get("limit") for row in rows):  # results of a run before the bias-or-variance columns
        return lines
    lines += ["", f"### Bias or variance ({meta['date']}, the same run)", "",
              f"What keeps r(500, ref) below the ceiling: `rise(num_masks={first['limit']['passes']}, "
              "estimator=\"regression\", random_state=0)` (the limit: the estimator with little noise left) "
              f"and `rise(num_masks={first['more_passes']}, estimator=\"regression\")` with the same seeds, "
              "against the same reference.", "",
              f"| model | image | ceiling | r({first['limit']['passes']} regression, ref) | r(500, ref) min / median "
              f"| r({first['more_passes']}, ref) min / median | deletion AUC: {first['more_passes']}, worst change "
              f"| insertion AUC: {first['more_passes']}, worst change | {first['more_passes']} (s) "
              f"| {first['limit']['passes']} regression (s) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ref, limit = row["reference_auc"], row["limit"]
        r, _, _ = _worst(row["runs"], ref)
        r2, dd, di = _worst(row["more"], ref)
        lines.append(f"| {row['model']} | {row['image']} | {np.sqrt(row['reference_reliability']):.3f} | "
                     f"{limit['r']:.3f} | {min(r):.3f} / {np.median(r):.3f} | {min(r2):.3f} / {np.median(r2):.3f} | "
                     f"{100 * dd:+.1f} % | {100 * di:+.1f} % | "
                     f"{np.median([x['seconds'] for x in row['more']]):.2f} | {limit['seconds']:.2f} |")
    lines += ["", "A limit at the ceiling means no bias: the regression and the reference estimate the same map, "
              "and a 500-pass map falls short by its sampling noise alone (whose variance falls as 1 / passes); a limit "
              "below the ceiling would be a bias no number of passes removes."]
    return lines


STOP_RELIABILITY = 0.95
STOP_CAP = 2000


def stopping(quick: bool, models: list[str]) -> list[dict]:
    """``stop_reliability``: per model and image, the reference as in ``efficiency`` (whose two halves'
    AUCs against the whole say how far a 2,000-mask map's AUCs stray by chance) and
    ``rise(num_masks=STOP_CAP, estimator="regression", stop_reliability=STOP_RELIABILITY)`` over seeds:
    the passes each drew, r with the reference, AUC changes, wall time."""
    import explainer
    from explainer import evaluate
    from explainer.methods.rise import Rise, rise

    from .openvino import model_files

    images = EFFICIENCY_IMAGES[:1] if quick else EFFICIENCY_IMAGES
    seeds = (0, 1) if quick else (0, 1, 2)
    reference_masks = 1000 if quick else REFERENCE_MASKS
    rows = []
    for model, path in model_files().items():
        if model not in models:
            continue
        net = explainer.load(path, preprocessing="imagenet" if model == "resnet18" else None)
        for name in images:
            image = explainer.sample_image(name)
            label = int(np.argmax(net.predict(image)))

            def auc(m):
                return dict(deletion=evaluate.deletion(net, image, m, label, verbose=False).auc,
                            insertion=evaluate.insertion(net, image, m, label, verbose=False).auc)

            rise(net, image, label, num_masks=64, verbose=False)  # warm-up
            halves = reference_halves(net, model, name, image, label, reference_masks)[1]
            ref = (halves[0] + halves[1]) / 2
            row = dict(model=model, image=name, label=label, reference_masks=reference_masks, reference_auc=auc(ref),
                       r_reference_halves=correlation(*halves), halves_auc=[auc(h) for h in halves],
                       target=STOP_RELIABILITY, cap=STOP_CAP, runs=[])
            for seed in seeds:
                explain = Rise(net, num_masks=STOP_CAP, grid_size=7, keep_probability=0.5, mask_value="auto",
                               estimator="regression", stop_reliability=STOP_RELIABILITY, batch_size="auto",
                               backend="onnxruntime", random_state=seed, verbose=False)
                seconds, m = once(lambda: explain(image, label))
                row["runs"].append(dict(seed=seed, seconds=seconds, passes=explain.passes[0], r=correlation(m, ref),
                                        auc=auc(m)))
            rows.append(row)
            print(row, flush=True)
    return rows


def stopping_markdown(meta: dict, rows: list[dict]) -> list[str]:
    first = rows[0]
    lines = [f"## Stopping on the map's reliability ({meta['date']})", "",
             f"Machine: {meta['cpu']}; {meta['cpus']} CPUs; 5-minute load average before / after the run: "
             f"{meta['load_average'][0]} / {meta['load_average'][1]}. `rise(num_masks={first['cap']}, "
             f"estimator=\"regression\", stop_reliability={first['target']})` with seeds "
             f"{', '.join(str(r['seed']) for r in first['runs'])} against the reference of the table above "
             f"({first['reference_masks']} masks of the default estimator in two halves, the same seeds: the same "
             "maps); the halves' AUC changes "
             "say how far a map of half the reference's masks strays from the reference's AUCs by chance.", "",
             "| model | image | passes drawn (seeds) | r(stopped, ref) min / median | deletion AUC: ref; stopped, "
             "worst change; halves' changes | insertion AUC: ref; stopped, worst change; halves' changes "
             "| stopped (s) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        runs, ref = row["runs"], row["reference_auc"]
        r, dd, di = _worst(runs, ref)
        hd = ", ".join(f"{100 * change(h['deletion'], ref['deletion']):+.1f}" for h in row["halves_auc"])
        hi = ", ".join(f"{100 * change(h['insertion'], ref['insertion']):+.1f}" for h in row["halves_auc"])
        lines.append(f"| {row['model']} | {row['image']} | {', '.join(str(x['passes']) for x in runs)} | "
                     f"{min(r):.3f} / {np.median(r):.3f} | {ref['deletion']:.3f}; {100 * dd:+.1f} %; {hd} % | "
                     f"{ref['insertion']:.3f}; {100 * di:+.1f} %; {hi} % | "
                     f"{np.median([x['seconds'] for x in runs]):.2f} |")
    return lines


def markdown(meta, speed_rows, faith_rows) -> str:
    lines = [f"# RISE ({meta['date']})", "",
             f"Machine: {meta['cpu']}; {meta['cpus']} CPUs; onnxruntime {meta['onnxruntime']}; DIANNA "
             f"{meta['dianna']}. EfficientNet-Lite0 (`{meta['model']}`), chelsea, class {LABEL}; grid 7, "
             f"p_keep 0.5; ours and the limit: medians of 2 alternating runs, DIANNA: one run. 5-minute load "
             f"average before / after the run: {meta['load_average'][0]} / {meta['load_average'][1]} on "
             f"{meta['cpus']} CPUs.", "",
             "| masks | batch | ours (s) | forward limit (s) | DIANNA (s) | ours / limit | DIANNA / ours "
             "| r(ours, DIANNA) | r(ours, ours other seed) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in speed_rows:
        lines.append(f"| {r['masks']} | {r['batch']} | {r['ours_s']:.2f} | {r['limit_s']:.2f} | "
                     f"{r['dianna_s']:.2f} | {r['ours_over_limit']:.2f} | {r['dianna_over_ours']:.2f} | "
                     f"{r['r_ours_dianna']:.3f} | {r['r_ours_ours']:.3f} |")
    lines += ["", "ours / limit: our wall time over onnxruntime alone on as many images at the same batch "
              "size (median of the per-round ratios; 1.0 is the limit). DIANNA / ours: how many times "
              "longer DIANNA takes (its own batch_size default 100, one onnxruntime session per batch; it "
              "weights the masks for all classes and picks the labels afterwards, and it holds all N masks and "
              f"masked images at once: {speed_rows[-1]['dianna_mask_bytes'] / 1e9:.1f} GB at "
              f"N={speed_rows[-1]['masks']}, where ours holds a few batches). r: Pearson correlation of the "
              "maps; RISE maps from different random masks differ by sampling noise, so r(ours, DIANNA) "
              "is read against r between two of our seeds (low r at these N: the paper's estimator "
              "sum P_i M_i / (N p) carries the chance coverage of each pixel by the masks, weighted by the "
              "mean probability, as noise).", "",
              "| method (library defaults) | map (s) | deletion AUC (lower is better) | insertion AUC "
              "(higher is better) |", "|---|---|---|---|"]
    for r in faith_rows:
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['method']} | {seconds} | {r['deletion_auc']:.3f} | {r['insertion_auc']:.3f} |")
    lines += ["", "Deletion to the network's zero input (RISE's protocol), insertion from a blurred copy, "
              "100 steps, `explainer.evaluate`."]
    return "\n".join(lines) + "\n"


def document(results: dict) -> str:
    """rise.md: the speed and faithfulness tables (one run) and the sample-efficiency table (its own run)."""
    text = markdown(results["meta"], results["speed"], results["faithfulness"]) if "speed" in results else ""
    if results.get("efficiency"):
        text += "\n" + "\n".join(efficiency_markdown(results["efficiency_meta"], results["efficiency"])) + "\n"
    if results.get("stopping"):
        text += "\n" + "\n".join(stopping_markdown(results["stopping_meta"], results["stopping"])) + "\n"
    return text


PARTS = ("speed", "faithfulness", "efficiency", "stopping")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 and 500 masks, fewer chance maps, one image "
                        "and two seeds for efficiency (1,000-mask references); prints, writes no file")
    parser.add_argument("--masks", type=int, nargs="+", default=None, help="numbers of masks (default 1000 2000)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="what to run (default all; speed and faithfulness run together); the others' "
                             "last results are kept")
    parser.add_argument("--stop-models", nargs="+", default=["efficientnet_lite0", "resnet18"],
                        help="models of the stopping part (default both)")
    parser.add_argument("--peer-python", default=os.environ.get("EXPLAINER_OVXAI_PYTHON"),
                        help="python of a virtual environment with openvino-xai (efficiency: AISE beside)")
    args = parser.parse_args(argv)
    import onnxruntime

    import explainer
    from explainer.zoo import registry

    saved = RESULTS / "rise.json"
    results = json.loads(saved.read_text()) if saved.exists() and not args.quick else {}
    net = explainer.load()
    path = registry.REGISTRY[registry.DEFAULT].path()  # the file explainer.load() read
    load_before = os.getloadavg()[1]  # other work on a shared machine skews timings
    if {"speed", "faithfulness"} & set(args.parts):
        import dianna

        image = explainer.sample_image("chelsea")
        counts = args.masks or ([200, 500] if args.quick else [1000, 2000])
        batch = best_batch(net, 128)
        meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), cpu=cpu_model(),
                    machine=platform.machine(), cpus=net.ort.parallel_streams(), onnxruntime=onnxruntime.__version__,
                    dianna=dianna.__version__, model=path.name, quick=args.quick, label=LABEL)
        results.update(speed=speed(net, image, str(path), counts, batch),
                       faithfulness=faithfulness(net, image, args.quick))
        meta["load_average"] = [round(load_before, 2), round(os.getloadavg()[1], 2)]
        results["meta"], load_before = meta, os.getloadavg()[1]
    if "efficiency" in args.parts:
        meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), cpu=cpu_model(),
                    machine=platform.machine(), cpus=net.ort.parallel_streams(), onnxruntime=onnxruntime.__version__,
                    quick=args.quick, peer_python=bool(args.peer_python))
        results["efficiency"] = efficiency(args.quick, args.peer_python)
        meta["load_average"] = [round(load_before, 2), round(os.getloadavg()[1], 2)]
        results["efficiency_meta"] = meta
        load_before = os.getloadavg()[1]
    if "stopping" in args.parts:
        meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), cpu=cpu_model(),
                    machine=platform.machine(), cpus=net.ort.parallel_streams(), quick=args.quick,
                    models=args.stop_models)
        results["stopping"] = stopping(args.quick, args.stop_models)
        meta["load_average"] = [round(load_before, 2), round(os.getloadavg()[1], 2)]
        results["stopping_meta"] = meta
    text = document(results)
    print(text)
    if args.quick:
        return 0
    RESULTS.mkdir(exist_ok=True)
    saved.write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "rise.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
