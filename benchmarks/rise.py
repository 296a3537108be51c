"""RISE beside DIANNA's RISE and beside the forward-pass limit, and its faithfulness beside occlusion
and LIME, in one run on one machine.

    python -m benchmarks.rise [--quick] [--masks 1000 2000]

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

Ours and the limit run in turn twice (medians); DIANNA once: a full run takes minutes. Writes
``benchmarks/results/rise.json`` and ``rise.md`` (``--quick`` only prints).
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 and 500 masks, fewer chance maps; prints, "
                        "writes no file")
    parser.add_argument("--masks", type=int, nargs="+", default=None, help="numbers of masks (default 1000 2000)")
    args = parser.parse_args(argv)
    import dianna
    import onnxruntime

    import explainer
    from explainer.zoo import registry

    net = explainer.load()
    path = registry.REGISTRY[registry.DEFAULT].path()  # the file explainer.load() read
    image = explainer.sample_image("chelsea")
    counts = args.masks or ([200, 500] if args.quick else [1000, 2000])
    batch = best_batch(net, 128)
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), cpu=cpu_model(),
                machine=platform.machine(), cpus=net.ort.parallel_streams(), onnxruntime=onnxruntime.__version__,
                dianna=dianna.__version__, model=path.name, quick=args.quick, label=LABEL,
                load_before=os.getloadavg()[1])  # other work on a shared machine skews timings
    speed_rows = speed(net, image, str(path), counts, batch)
    faith_rows = faithfulness(net, image, args.quick)
    meta["load_average"] = [round(meta.pop("load_before"), 2), round(os.getloadavg()[1], 2)]
    print(markdown(meta, speed_rows, faith_rows))
    if args.quick:
        return 0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rise.json").write_text(json.dumps(dict(meta=meta, speed=speed_rows, faithfulness=faith_rows),
                                                  indent=2) + "\n")
    (RESULTS / "rise.md").write_text(markdown(meta, speed_rows, faith_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
