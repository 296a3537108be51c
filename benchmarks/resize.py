"""The library's bicubic resize (``explainer/model/bicubic.py``: PIL's coefficients as sparse float64
passes) against the code it replaced (PIL's ``Image.resize(..., BICUBIC)`` per channel or map as a float
image, kept here only), in one process, alternating.

    python -m benchmarks.resize [--repeats 15]

Cases: the chelsea-sized photo 300 x 451 x 3 -> 224 x 224 (``Classifier.fit_pixels``), a 12 MP photo
3000 x 4000 x 3 -> 224 x 224, one 7 x 7 map -> 300 x 451 and 1000 of them (``resize_map``: the CAMs'
and Recipro-CAM's upsampling). Each round times PIL then the library on the same input, the next round the
other way round; medians over rounds, ratio = PIL's median / the library's. The outputs are compared too
(max |difference| / max |x|). Records the load average before and after: the figures are only as quiet
as the machine was. Writes ``benchmarks/results/resize.json`` and ``resize.md``.
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

RESULTS = Path(__file__).with_name("results")


def pil_resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The replaced code path: PIL on each channel as a float ('F') image (unclipped)."""
    from PIL import Image

    h, w = size
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(pixels[:, :, c], dtype=np.float32))
                                .resize((w, h), Image.BICUBIC), dtype=np.float32)
                     for c in range(pixels.shape[2])], axis=2)


def pil_resize_map(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.stack([pil_resize(m[:, :, None], size)[:, :, 0] for m in maps])


def cases(rng) -> list[dict]:
    from explainer.model.preprocess import resize, resize_map

    chelsea = rng.uniform(0, 255, (300, 451, 3)).astype(np.float32)
    photo = rng.uniform(0, 255, (3000, 4000, 3)).astype(np.float32)
    maps = (rng.standard_normal((1000, 7, 7)) * 100).astype(np.float32)
    return [
        {"name": "photo 300x451x3 -> 224x224", "x": chelsea, "size": (224, 224), "rounds": 1.0,
         "pil": pil_resize, "ours": lambda x, s: resize(x, s, clip=False)},
        {"name": "photo 3000x4000x3 -> 224x224", "x": photo, "size": (224, 224), "rounds": 0.4,
         "pil": pil_resize, "ours": lambda x, s: resize(x, s, clip=False)},
        {"name": "1 map 7x7 -> 300x451", "x": maps[:1], "size": (300, 451), "rounds": 1.0,
         "pil": pil_resize_map, "ours": resize_map},
        {"name": "1000 maps 7x7 -> 300x451", "x": maps, "size": (300, 451), "rounds": 0.4,
         "pil": pil_resize_map, "ours": resize_map},
    ]


def timed(fn, x, size, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(x, size)
    return (time.perf_counter() - start) / calls


def run(repeats: int) -> dict:
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()
    rows = []
    for case in cases(rng):
        x, size = case["x"], case["size"]
        ours, theirs = case["ours"](x, size), case["pil"](x, size)  # warm: caches, imports
        error = float(np.abs(ours.astype(np.float64) - theirs).max() / np.abs(x).max())
        calls = 20 if case["rounds"] == 1.0 else 1
        rounds = max(3, int(repeats * case["rounds"]))
        times = {"pil": [], "ours": []}
        for r in range(rounds):
            order = ("pil", "ours") if r % 2 == 0 else ("ours", "pil")
            for side in order:
                times[side].append(timed(case[side], x, size, calls))
        pil_ms, ours_ms = (1e3 * float(np.median(times[s])) for s in ("pil", "ours"))
        rows.append({"case": case["name"], "rounds": rounds, "calls_per_round": calls, "pil_ms": pil_ms,
                     "ours_ms": ours_ms, "ratio": pil_ms / ours_ms, "max_abs_diff_over_max_abs_x": error})
        print(f"{case['name']}: PIL {pil_ms:.3f} ms, library {ours_ms:.3f} ms, {pil_ms / ours_ms:.2f}x; "
              f"difference {error:.2g} x max|x|", flush=True)
    import PIL
    import scipy

    return {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor()
            or platform.machine(), "cpus": os.cpu_count(), "numpy": np.__version__, "scipy": scipy.__version__,
            "pillow": PIL.__version__, "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()), "rows": rows}


def write(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "resize.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Bicubic resize: the library's sparse float64 passes against PIL per channel", "",
             f"{result['when']}, {result['machine']}, {result['cpus']} CPUs, numpy {result['numpy']}, scipy "
             f"{result['scipy']}, Pillow {result['pillow']}. Load average (1, 5, 15 min) before "
             f"{', '.join(f'{v:.2f}' for v in result['load_average_before'])}, after "
             f"{', '.join(f'{v:.2f}' for v in result['load_average_after'])} (`python -m benchmarks.resize`). "
             "Medians over alternating rounds; ratio = PIL / library; difference = max |library - PIL| / max |x|.",
             "", "| case | rounds x calls | PIL (ms) | library (ms) | ratio | difference |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['case']} | {row['rounds']} x {row['calls_per_round']} | {row['pil_ms']:.3f} | "
                     f"{row['ours_ms']:.3f} | {row['ratio']:.2f}x | {row['max_abs_diff_over_max_abs_x']:.2g} |")
    (RESULTS / "resize.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="rounds of the small cases (two fifths for the large)")
    args = parser.parse_args(argv)
    write(run(args.repeats))


if __name__ == "__main__":
    main()
