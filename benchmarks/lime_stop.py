"""Does LIME's early stop keep the answer? The default run's top superpixels against full runs'.

    python -m benchmarks.lime_stop [--images 20]

On 20 inputs (the sample photos of scikit-image, scikit-learn and matplotlib, with mirrored centre
crops and two side crops to reach 20 distinct inputs), the embedded model ``explainer.load()``, the
label = the model's top-1 class, and LIME's defaults (SLIC asked for 49 superpixels, computed once per
image; num_samples 2048):

* the default run (``random_state=0``: sampling stops once the top-5 set is stable in 36 of 40
  bootstrap refits) against two full runs (``stop_tolerance=None``, all 2048 samples, seeds 1 and 2):
  top-3 and top-5 agreement = |intersection| / k of the highest-ranked superpixels, each default-vs-full
  pair and the full-vs-full pair, for both surrogates (``model="tree"``, the default, and "linear");
* the previous rule (stop once every ridge weight's sandwich standard error is below 0.15 x the largest
  |weight|, checked every 8 samples from 4 F on), replayed here on the default run's own samples: the
  number of samples it used and the agreement of its map.

All runs of an image and seed draw the same samples (a prefix of the full run's), so their forward passes
are made once and shared (``StreamCache``): LIME's own code runs unchanged, its stream of probabilities
served from the cache where the same samples were evaluated before. The check's cost is timed inside
the library (``differing_resamples``) and compared with the forward passes it saved. Writes
``benchmarks/results/lime_stop.json`` and ``lime_stop.md`` (only with the full 20 images).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).with_name("results")
DEFAULT_SEED, FULL_SEEDS, FULL = 0, (1, 2), 2048
MODELS = ("tree", "linear")
KS = (3, 5)


def images() -> list[tuple[str, np.ndarray]]:
    """20 distinct inputs: 9 sample photos (scikit-image's ``cat`` is ``chelsea``, so it is left out),
    their central 70 % mirrored, and the left 60 % of two wide ones."""
    import matplotlib.cbook
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    base = [(name, getattr(data, name)()) for name in
            ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry")]
    base += list(zip(("china", "flower"), load_sample_images().images))
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as hopper:
        base.append(("grace_hopper", np.asarray(hopper.convert("RGB"))))
    out = list(base)
    for name, image in base:
        h, w = image.shape[:2]
        centre = image[int(0.15 * h):int(0.85 * h), int(0.15 * w):int(0.85 * w)]
        out.append((f"{name} centre, mirrored", centre[:, ::-1]))
    for name, image in base[1:4:2]:  # coffee, rocket
        out.append((f"{name} left", image[:, :int(0.6 * image.shape[1])]))
    return [(name, np.ascontiguousarray(image)) for name, image in out]


class StreamCache:
    """``stream_probabilities`` with memory: probabilities of the samples of ``key`` (image, seed) already
    evaluated are served again; the rest are computed (by the real function) and remembered. Runs with the
    same seed draw the same samples, so their probabilities are the same."""

    def __init__(self, real):
        self.real, self.key, self.probs, self.computed = real, None, {}, 0

    def __call__(self, net, make_batch, total, *, batch_size, backend="onnxruntime", verbose=True, desc="",
                 logits=False):
        have = self.probs.get(self.key, np.zeros((0, net.num_classes), np.float32))
        done = 0
        while done < total and min(done + batch_size, total) <= len(have):
            stop = min(done + batch_size, total)
            yield done, stop, have[done:stop]
            done = stop
        if done == total:
            return
        fresh = []
        try:
            for start, stop, p in self.real(net, lambda a, b: make_batch(a + done, b + done), total - done,
                                            batch_size=batch_size, backend=backend, verbose=verbose, desc=desc,
                                            logits=logits):
                fresh.append(p)
                self.computed += len(p)
                yield start + done, stop + done, p
        finally:
            if fresh and done + sum(map(len, fresh)) > len(have):
                self.probs[self.key] = np.concatenate([have[:done]] + fresh)


def weight_errors(samples, targets, weights, alpha: float = 1.0):
    """The previous rule's statistic: (coefficients, standard errors) of the weighted ridge fit per target
    column, (K, F) each, heteroscedasticity-robust sandwich estimate."""
    n, f = samples.shape
    x = np.hstack([np.ones((n, 1)), samples.astype(np.float64)])
    a = x.T @ (x * weights[:, None])
    a[1:, 1:] += alpha * np.eye(f)
    a_inv = np.linalg.inv(a)
    beta = a_inv @ (x.T @ (weights[:, None] * targets))
    residual = targets - x @ beta
    se = np.empty((targets.shape[1], f))
    for k in range(targets.shape[1]):
        meat = x.T @ (x * ((weights * residual[:, k]) ** 2)[:, None])
        se[k] = np.sqrt(np.clip(np.diag(a_inv @ meat @ a_inv), 0, None))[1:]
    return beta[1:].T, se


def old_rule_stop(samples, probs, weights, batch: int, tolerance: float = 0.15) -> int | None:
    """Where the previous rule stopped within these samples (None: not within them): from 4 F samples
    on, every max(8, batch) samples, once every weight's standard error < tolerance x the largest |weight|."""
    def batch_end(n):  # checks came at the end of a batch
        return -(-n // batch) * batch

    n = batch_end(4 * samples.shape[1])
    while n < min(len(samples), FULL):
        beta, se = weight_errors(samples[:n], probs[:n].astype(np.float64), weights[:n])
        if np.all(se.max(axis=1) <= tolerance * np.maximum(np.abs(beta).max(axis=1), 1e-12)):
            return n
        n = batch_end(n + max(8, batch))
    return FULL if len(samples) >= FULL else None


def agreement(a: np.ndarray, b: np.ndarray, k: int) -> float:
    from explainer.methods.lime import top_k

    return len(set(top_k(a[None], k)[0]) & set(top_k(b[None], k)[0])) / k


def summary(rows: list[dict], model: str) -> dict:
    """Means over images; the paired difference default - full-vs-full with a 95 % interval (normal
    approximation over images); how often the default run agrees at least as well as two full runs."""
    out = {"images": len(rows)}
    for k in KS:
        dvf = np.array([r[model][f"default_vs_full_top{k}"] for r in rows])
        fvf = np.array([r[model][f"full_vs_full_top{k}"] for r in rows])
        old = np.array([r[model][f"old_vs_full_top{k}"] for r in rows])
        diff = dvf - fvf
        half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        out.update({f"default_vs_full_top{k}": dvf.mean(), f"full_vs_full_top{k}": fvf.mean(),
                    f"old_vs_full_top{k}": old.mean(), f"difference_top{k}": diff.mean(),
                    f"difference_top{k}_ci95": [diff.mean() - half, diff.mean() + half],
                    f"default_as_good_top{k}": float(np.mean(dvf >= fvf - 1e-9)),
                    f"old_as_good_top{k}": float(np.mean(old >= fvf - 1e-9))})
    for what in ("samples", "old_samples"):
        used = np.array([r[model][what] for r in rows])
        out.update({f"{what}_mean": used.mean(), f"{what}_min": int(used.min()), f"{what}_max": int(used.max())})
    early = [r[model] for r in rows if r[model]["samples"] < FULL]
    out["stopped_early"] = len(early) / len(rows)
    for k in KS:  # where the rule made a difference: the runs that stopped early
        for what in ("default_vs_full", "full_vs_full"):
            out[f"stopped_early_{what}_top{k}"] = float(np.mean([e[f"{what}_top{k}"] for e in early])) if early \
                else float("nan")
    check = sum(r[model]["check_s"] for r in rows)
    passes = sum(r[model]["samples"] * r["forward_s_per_sample"] for r in rows)
    out["check_s_total"], out["check_share_of_forward_passes"] = check, check / passes
    return out


def run(count: int) -> dict:
    import explainer
    import explainer.methods.lime as lime

    net = explainer.load()
    batch = net.resolve_batch_size("auto", "lime_stop", "onnxruntime")
    cache = StreamCache(lime.stream_probabilities)
    check_s = [0.0]
    differing = lime.differing_resamples

    def timed_check(*args, **kwargs):
        start = time.perf_counter()
        try:
            return differing(*args, **kwargs)
        finally:
            check_s[0] += time.perf_counter() - start

    lime.stream_probabilities, lime.differing_resamples = cache, timed_check
    rows, began = [], time.perf_counter()
    try:
        for index, (name, image) in enumerate(images()[:count]):
            label = int(np.argmax(net.predict(image)))
            segments = lime.segment(net.fit_pixels(image), "superpixels", 49)
            common = dict(segmentation=segments, verbose=False)
            row = dict(image=name, size=list(image.shape[:2]), label=label, class_name=net.class_names[label]
                       if net.class_names else str(label), features=int(segments.max()) + 1, batch=batch)
            full = {m: [] for m in MODELS}
            for seed in FULL_SEEDS:
                cache.key = (index, seed)
                start = time.perf_counter()
                for model in MODELS:  # the second model's run is served from the cache: only its fit is new
                    full[model].append(lime.lime_explanation(net, image, label, model=model, random_state=seed,
                                                             stop_tolerance=None, num_samples=FULL, **common))
                    if model == MODELS[0]:
                        row["forward_s_per_sample"] = (time.perf_counter() - start) / FULL
            cache.key = (index, DEFAULT_SEED)
            defaults = {}
            for model in MODELS:
                check_s[0] = 0.0
                defaults[model] = lime.lime_explanation(net, image, label, model=model, random_state=DEFAULT_SEED,
                                                        **common)
                row[model] = dict(samples=len(defaults[model].samples), stop_reason=defaults[model].stop_reason,
                                  check_s=check_s[0])
            # the previous rule, replayed on the default run's samples (drawn further where it needs more)
            n = max(len(d.samples) for d in defaults.values())
            while True:
                prefix = lime.lime_explanation(net, image, label, random_state=DEFAULT_SEED, stop_tolerance=None,
                                               num_samples=n, **common)
                old = old_rule_stop(prefix.samples, prefix.probabilities, prefix.kernel_weights, batch)
                if old is not None:
                    break
                n = min(FULL, 2 * n)
            for model in MODELS:
                old_weights = lime.fit_surrogate(prefix.samples[:old], prefix.probabilities[:old].astype(np.float64),
                                                 prefix.kernel_weights[:old], model, DEFAULT_SEED)[0]
                fulls = [f.weights[0] for f in full[model]]
                for k in KS:
                    row[model][f"default_vs_full_top{k}"] = float(np.mean(
                        [agreement(defaults[model].weights[0], f, k) for f in fulls]))
                    row[model][f"old_vs_full_top{k}"] = float(np.mean([agreement(old_weights, f, k) for f in fulls]))
                    row[model][f"full_vs_full_top{k}"] = agreement(fulls[0], fulls[1], k)
                row[model]["old_samples"] = old
            cache.probs.clear()
            rows.append(row)
            print(f"[{time.perf_counter() - began:6.0f} s] {name}: label {label}, F={row['features']}, "
                  + "; ".join(f"{m} {row[m]['samples']} samples (old rule {row[m]['old_samples']}), top-3/5 "
                              f"default {row[m]['default_vs_full_top3']:.2f}/{row[m]['default_vs_full_top5']:.2f}"
                              f" full {row[m]['full_vs_full_top3']:.2f}/{row[m]['full_vs_full_top5']:.2f}"
                              for m in MODELS), flush=True)
    finally:
        lime.stream_probabilities, lime.differing_resamples = cache.real, differing
    import onnxruntime

    defaults_of_lime = explainer.get_method("lime").defaults()
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=_cpu(),
                python=platform.python_version(), onnxruntime=onnxruntime.__version__, model=net.name,
                num_samples=FULL, default_seed=DEFAULT_SEED, full_seeds=list(FULL_SEEDS),
                stop=dict(tolerance=defaults_of_lime["stop_tolerance"], top_k=defaults_of_lime["stop_top_k"],
                          resamples=lime.STOP_RESAMPLES, growth=lime.STOP_GROWTH),
                forward_passes=cache.computed, wall_s=time.perf_counter() - began)
    return dict(meta=meta, summary={m: summary(rows, m) for m in MODELS}, images=rows)


def _cpu() -> str:
    from .run import cpu_model

    return cpu_model()


def markdown(result: dict) -> str:
    meta, summaries, lines = result["meta"], result["summary"], []
    features = [r["features"] for r in result["images"]]
    lines += ["# LIME's early stop against full runs", "",
              f"{meta['date']}, {meta['machine']}, onnxruntime {meta['onnxruntime']}, model {meta['model']}; "
              f"{summaries['tree']['images']} images, label = top-1, SLIC asked for 49 superpixels (made "
              f"{min(features)}–{max(features)}). Default run: seed {meta['default_seed']}, stop once the "
              f"top-{meta['stop']['top_k']} set is the same in at least "
              f"{round((1 - meta['stop']['tolerance']) * meta['stop']['resamples'])}/{meta['stop']['resamples']} "
              f"bootstrap refits (checks {meta['stop']['growth']} x apart). Full runs: all {meta['num_samples']} "
              f"samples, seeds {meta['full_seeds']}. Agreement = |top-k ∩ top-k| / k, default vs full averaged "
              f"over the two full runs. {meta['forward_passes']} forward passes, {meta['wall_s'] / 60:.1f} min in "
              "all (`python -m benchmarks.lime_stop`).", ""]
    for model, s in summaries.items():
        inside = all(s[f"difference_top{k}_ci95"][0] <= 0 <= s[f"difference_top{k}_ci95"][1] for k in KS)
        lines.append(f"* {model}: default vs full {s['default_vs_full_top3']:.3f} (top-3) / "
                     f"{s['default_vs_full_top5']:.3f} (top-5), full vs full {s['full_vs_full_top3']:.3f} / "
                     f"{s['full_vs_full_top5']:.3f}: the difference is {'' if inside else 'not '}within its 95 % "
                     f"interval of 0; {s['samples_mean']:.0f} samples on average "
                     f"({s['samples_mean'] / meta['num_samples']:.0%} of a full run). The previous rule: "
                     f"{s['old_samples_mean']:.0f} samples, agreement {s['old_vs_full_top3']:.3f} / "
                     f"{s['old_vs_full_top5']:.3f}. On the {s['stopped_early']:.0%} of images where it stopped "
                     f"early: default vs full {s['stopped_early_default_vs_full_top3']:.3f} / "
                     f"{s['stopped_early_default_vs_full_top5']:.3f}, full vs full "
                     f"{s['stopped_early_full_vs_full_top3']:.3f} / {s['stopped_early_full_vs_full_top5']:.3f}.")
    lines += ["", "| surrogate | k | default vs full | full vs full | default − full-vs-full (95 % CI) | images "
              "default ≥ full-vs-full | old rule vs full | images old ≥ full-vs-full |",
              "|---|---|---|---|---|---|---|---|"]
    for model, s in summaries.items():
        for k in KS:
            lo, hi = s[f"difference_top{k}_ci95"]
            lines.append(f"| {model} | {k} | {s[f'default_vs_full_top{k}']:.3f} | {s[f'full_vs_full_top{k}']:.3f} | "
                         f"{s[f'difference_top{k}']:+.3f} ({lo:+.3f}, {hi:+.3f}) | "
                         f"{s[f'default_as_good_top{k}']:.0%} | "
                         f"{s[f'old_vs_full_top{k}']:.3f} | {s[f'old_as_good_top{k}']:.0%} |")
    lines += ["", "| surrogate | samples used: mean (min–max) | stopped early | old rule: mean (min–max) | "
              "stop checks / forward passes of the samples used |", "|---|---|---|---|---|"]
    for model, s in summaries.items():
        lines.append(f"| {model} | {s['samples_mean']:.0f} ({s['samples_min']}–{s['samples_max']}) | "
                     f"{s['stopped_early']:.0%} of images | {s['old_samples_mean']:.0f} ({s['old_samples_min']}–"
                     f"{s['old_samples_max']}) | {s['check_s_total']:.1f} s = "
                     f"{s['check_share_of_forward_passes']:.1%} |")
    lines += ["", "| image | class | F | tree: samples (old rule), top-3/5 default vs full, full vs full | "
              "linear: the same |", "|---|---|---|---|---|"]
    for r in result["images"]:
        cells = [f"{r[m]['samples']} ({r[m]['old_samples']}), {r[m]['default_vs_full_top3']:.2f}/"
                 f"{r[m]['default_vs_full_top5']:.2f}, {r[m]['full_vs_full_top3']:.2f}/"
                 f"{r[m]['full_vs_full_top5']:.2f}" for m in MODELS]
        lines.append(f"| {r['image']} | {r['class_name']} | {r['features']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20, help="how many of the 20 inputs (fewer: nothing written)")
    args = parser.parse_args(argv)
    result = run(args.images)
    text = markdown(result)
    print(text)
    if args.images >= 20:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "lime_stop.json").write_text(json.dumps(result, indent=1, default=float))
        (RESULTS / "lime_stop.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
