"""Incremental occlusion against the forward-pass limit, side by side in one run.

    python -m benchmarks.incremental_occlusion            # full run (3 interleaved repeats)
    python -m benchmarks.incremental_occlusion --quick    # 1 repeat, fewer batch sizes, no Captum

For EfficientNet-Lite0 and GoogLeNet's zoo graph (seeded), at mask 15 / stride 10 (529 masks on
224 x 224) and at the defaults (mask 45, stride 23: 100 masks): ``occlusion_sensitivity(...,
incremental=True)`` against onnxruntime forwarding the same number of whole images at its best batch
size (the forward-pass limit every non-incremental occlusion is bound by; ``benchmarks.run``'s
``forward_pass``). The two run alternately and the ratio is the median of the per-pair ratios, so a
slow spell of a shared machine hits both. Also reported: the chosen cuts and crops, the share of the
incremental time in the prefix stages, pasting and the suffix, the cost model's static estimate and the
per-mask times it measured, what ``incremental="auto"`` picks, the largest difference from the plain
maps, and (full run) Captum's Occlusion on the same windows for one case.

Writes ``benchmarks/results/incremental_occlusion.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from datetime import datetime, timezone

import numpy as np

from .run import RESULTS, best_batch, cpu_model, forward_pass, paired, timed

CASES = {"mask 15 / stride 10": dict(mask_size=15, stride=10), "defaults": dict()}


def _masks(net, options) -> int:
    from explainer.methods.occlusion import _resolve, mask_positions
    import math

    size = net.input.size
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    mask = _resolve(pair(options.get("mask_size", "auto")), size, 0.2, round)
    step = _resolve(pair(options.get("stride", "auto")), size, 0.1, math.ceil)
    return len(mask_positions(size[0], mask[0], step[0], True)) * len(mask_positions(size[1], mask[1], step[1], True))


def occlusion(net, image, batch, incremental, **options):
    import explainer

    return lambda: explainer.occlusion_sensitivity(net, image, 285, batch_size=batch, verbose=False,
                                                   incremental=incremental, output_upsampling="none", **options)


def our_incremental(image, batch: int):
    """For the Captum comparison (isolated process): Captum's windows lie inside the image."""
    import explainer

    net = explainer.load()
    return lambda: explainer.occlusion_sensitivity(net, image, 285, mask_size=15, stride=10, mask_value=120,
                                                   mask_clipping=False, batch_size=batch, verbose=False,
                                                   incremental=True)


def bench_case(net, name, image, case, options, repeats, sizes, ours_sizes):
    from explainer.runtime import incremental as inc

    n = _masks(net, options)
    limit_batch = best_batch(net, n + 1, sizes)
    # our best batch size (each first call at a size also sets up and measures the split: untimed here)
    timings = {}
    for b in ours_sizes:
        occlusion(net, image, b, True, **options)()
        timings[b] = min(timed(occlusion(net, image, b, True, **options), 1) for _ in range(2))
    batch = min(timings, key=timings.get)
    ours_s, limit_s, ratio = paired(occlusion(net, image, batch, True, **options),
                                    forward_pass(net, n + 1, limit_batch), repeats)
    decision = inc.last_decision(net)
    ours_map = occlusion(net, image, batch, True, **options)()
    plain_map = occlusion(net, image, limit_batch, False, **options)()
    error = float(np.abs(ours_map.astype(np.float64) - plain_map).max() / np.abs(plain_map).max())
    # what "auto" picks at our batch size (its first call decides; a second call uses the decision)
    occlusion(net, image, batch, "auto", **options)()
    auto = inc.last_decision(net)
    streams = net.ort.parallel_streams()
    chain = " > ".join(decision.cuts)
    per_mask = decision.seconds_per_mask.get(chain)
    plain_per_mask = auto.seconds_per_mask.get("plain")
    return dict(model=name, case=case, masks=n, limit_batch=limit_batch, ours_batch=batch,
                ours_batch_timings={str(k): v for k, v in timings.items()}, ours_s=ours_s, limit_s=limit_s,
                ratio=ratio, speedup=1 / ratio, max_relative_difference_from_plain=error,
                cuts=list(decision.cuts), crops=[list(c) for c in decision.crops], parts=decision.parts,
                estimated_share=decision.estimated_share, seconds_per_mask=decision.seconds_per_mask,
                predicted_s=per_mask * n / streams if per_mask else None,
                auto=dict(incremental=auto.incremental, reason=auto.reason,
                          plain_seconds_per_mask=plain_per_mask,
                          measured_speedup=auto.measured_speedup),
                # if the stages on crops and the pasting cost nothing: the suffix's time alone
                suffix_bound=limit_s / (ours_s * decision.parts["suffix"]) if decision.parts.get("suffix") else None)


def markdown(meta, rows, captum) -> str:
    lines = [f"# Incremental occlusion vs the forward-pass limit ({meta['date']})", "",
             f"Machine: {meta['cpu']}; {meta['cpus']} CPUs ({meta['load']}); onnxruntime {meta['onnxruntime']}; "
             f"mode: {meta['mode']}; {meta['repeats']} interleaved repeat(s), medians.", "",
             "| model | masks | ours: incremental (s) | forward limit (s) | speed-up | cuts (crops) | prefix / paste / suffix | "
             "estimated work share | predicted (s) | max rel. diff. from plain | auto picks |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        parts = r["parts"]
        share = (f"{parts['prefix']:.0%} / {parts['paste']:.0%} / {parts['suffix']:.0%}" if parts else "-")
        cuts = "<br>".join(f"`{c}` ({h}x{w})" for c, (h, w) in zip(r["cuts"], r["crops"]))
        auto = "incremental" if r["auto"]["incremental"] else "plain"
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"| {r['model']}, {r['case']} | {r['masks']} | {r['ours_s']:.3f} (batch {r['ours_batch']}) | "
                     f"{r['limit_s']:.3f} (batch {r['limit_batch']}) | **{r['speedup']:.2f}x** | {cuts} | {share} | "
                     f"{fmt(r['estimated_share'], '.2f')} | {fmt(r['predicted_s'], '.3f')} | "
                     f"{r['max_relative_difference_from_plain']:.1e} | {auto}: {r['auto']['reason']} |")
    if captum:
        lines += ["", f"Captum's Occlusion on the same {captum['windows']} windows (15 x 15, stride 10, inside the "
                  f"image; native torch EfficientNet-Lite0, perturbations_per_eval={captum['ppe']}; each side in its "
                  f"own process): Captum {captum['captum_s']:.3f} s, ours (incremental) {captum['ours_s']:.3f} s: "
                  f"**{captum['speedup']:.1f}x** faster."]
    lines += ["", "Speed-up = forward limit / ours (median of the per-pair ratios): the limit is onnxruntime "
              "forwarding masks + 1 whole images at its best batch size on the library's parallel one-core "
              "streams, the bound of every occlusion that forwards each masked image whole. "
              "Cuts: the tensors the graph is split at (the first stage runs on a crop of the image, each next "
              "on a crop of the previous cut, the suffix on the whole last cut); crops: the crop size of each "
              "stage's input. Prefix / paste / suffix: shares of the incremental time per batch, measured while "
              "deciding (the cost model's measurements are those of its first decision for the model, geometry and "
              "batch size on this machine, remembered in the cache folder, possibly from an earlier run). Estimated work share: the static cost model's incremental work per mask over the plain "
              "work per image (multiply-adds and elements moved, from the graph's attributes); predicted: the "
              "measured time per mask of the chosen split times the masks over the streams. "
              "Max rel. diff.: largest |incremental - plain| over the largest |plain| drop (0: bit for bit). "
              "Auto picks: what incremental=\"auto\" decided at the same batch size (fewer than "
              "128 masks run the plain path: the set-up would cost more than it saves)."]
    bound = [r for r in rows if r.get("suffix_bound")]
    if bound:
        lines += ["", "Where the speed-up stops: the suffix (the layers after the last cut, run whole for every "
                  "mask) bounds it. With the stages on crops and the pasting free, the suffix's share of our time would allow at most: " + "; ".join(
                      f"{r['model']}, {r['case']}: {r['suffix_bound']:.2f}x" for r in bound) + ". Deeper cuts do not "
                  "lower it: there a mask's projective field covers most of the feature map (EfficientNet-Lite0 "
                  "at stride 16: a 15-pixel mask reaches 9 of 14 rows), so a crop is nearly the whole map."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="efficientnet_lite0,googlenet")
    parser.add_argument("--rewrite", action="store_true", help="write the .md again from the last run's .json")
    args = parser.parse_args(argv)
    if args.rewrite:
        saved = json.loads((RESULTS / "incremental_occlusion.json").read_text())
        text = markdown(saved["meta"], saved["rows"], saved["captum"])
        (RESULTS / "incremental_occlusion.md").write_text(text)
        print(text)
        return 0
    warnings.filterwarnings("ignore")
    import onnxruntime
    from skimage import data

    import explainer

    repeats = 1 if args.quick else 3
    from explainer.model import preprocess

    image = np.rint(preprocess.resize(data.chelsea().astype(np.float32), (224, 224))).astype(np.uint8)
    load = os.getloadavg()[0]
    rows = []
    started = time.time()
    for key in args.models.split(","):
        net = explainer.load() if key == "efficientnet_lite0" else explainer.load("seeded-inception_v1")
        name = "efficientnet_lite0" if key == "efficientnet_lite0" else "googlenet graph (seeded)"
        sizes = (1, 2, 4, 8, 16) if key == "efficientnet_lite0" else (1, 4, 16)
        for case, options in CASES.items():
            row = bench_case(net, name, image, case, options, repeats, sizes, (4, 8) if args.quick else (4, 8, 16))
            rows.append(row)
            print(f"{name}, {case}: ours {row['ours_s']:.3f} s, limit {row['limit_s']:.3f} s, "
                  f"{row['speedup']:.2f}x, cuts {row['cuts']}, diff {row['max_relative_difference_from_plain']:.1e}",
                  flush=True)
    captum = None
    if not args.quick and "efficientnet_lite0" in args.models:
        from . import isolated

        ppe = isolated.call("benchmarks.run:captum_best_ppe", image, (1, 16))
        ours_s, captum_s, ratio = isolated.paired(("benchmarks.incremental_occlusion:our_incremental", (image, 8)),
                                                  ("benchmarks.run:captum_occlusion", (image, ppe)), repeats)
        captum = dict(windows=21 * 21, ppe=ppe, ours_s=ours_s, captum_s=captum_s, speedup=1 / ratio)
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), cpu=cpu_model(), cpus=os.cpu_count(),
                onnxruntime=onnxruntime.__version__, mode="quick" if args.quick else "full", repeats=repeats,
                load=f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
                     + ("; the machine was shared with other work" if max(load, os.getloadavg()[0]) > 1.5 else ""),
                seconds=time.time() - started)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "incremental_occlusion.json").write_text(json.dumps(dict(meta=meta, rows=rows, captum=captum), indent=1))
    text = markdown(meta, rows, captum)
    (RESULTS / "incremental_occlusion.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
