"""Dataset jobs: images per second of engine="local" against engine="ray" on this machine, for
Grad-CAM, occlusion and LIME over the same images, and Ray's throughput against its number of
workers. Side by side in one run; one Ray instance is started once and reused, so its start-up (a few
seconds, paid once per job) is reported apart from the throughput.

    python -m benchmarks.dataset [--images 24]

Writes benchmarks/results/dataset.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
METHODS = {"gradcam": {}, "occlusion": {"stride": 20}, "lime": {"num_samples": 512}}


def _images(folder: Path, n: int) -> Path:
    """n photographs: the library's samples, cropped at shifting offsets so that no two are equal."""
    from PIL import Image

    import explainer
    from explainer.samples import SAMPLES

    folder.mkdir(parents=True, exist_ok=True)
    photos = [explainer.sample_image(s) for s in SAMPLES]
    for i in range(n):
        p = photos[i % len(photos)]
        dy, dx = (7 * i) % max(1, p.shape[0] // 4), (11 * i) % max(1, p.shape[1] // 4)
        Image.fromarray(p[dy:, dx:]).save(folder / f"img{i:04d}.png")
    return folder


def _run(net, folder, method, engine, workers="auto") -> float:
    import explainer

    out = Path(tempfile.mkdtemp(prefix="bench-dataset-"))
    try:
        start = time.perf_counter()
        explainer.explain_dataset(folder, net, methods=[method], options={method: METHODS[method]},
                                  metrics=("deletion", "insertion"), steps=20, out=out, engine=engine,
                                  workers=workers, verbose=False)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    parser.add_argument("--out", default="dataset", help="results file stem under benchmarks/results/")
    args = parser.parse_args(argv)
    chosen = [m for m in args.methods.split(",") if m in METHODS]
    import ray

    import explainer

    net = explainer.load()
    folder = _images(Path(tempfile.mkdtemp(prefix="bench-images-")), args.images)
    start = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_start = time.perf_counter() - start
    rows = []
    try:
        for method in chosen:
            local = _run(net, folder, method, "local")
            on_ray = {w: _run(net, folder, method, "ray", workers=w) for w in range(1, CORES + 1)}
            best = min(on_ray.values())
            rows.append(dict(method=method, images=args.images, local_s=local,
                             local_images_per_s=args.images / local,
                             ray_s=on_ray, ray_images_per_s={w: args.images / t for w, t in on_ray.items()},
                             ray_over_local=best / local))
            print(rows[-1], flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    result = dict(date=time.strftime("%Y-%m-%d %H:%M"), cores=CORES, machine=platform.platform(),
                  python=platform.python_version(), ray=ray.__version__, ray_start_s=ray_start, rows=rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{args.out}.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _markdown(r: dict) -> str:
    workers = sorted({int(w) for row in r["rows"] for w in row["ray_s"]})
    lines = [f"# Dataset jobs: local vs Ray ({r['date']}, {r['cores']} cores, Ray {r['ray']})", "",
             f"{r['rows'][0]['images']} images, deletion and insertion curves of 20 steps per map; Ray started once "
             f"({r['ray_start_s']:.1f} s, not counted below).", "",
             "| method | local (img/s) | " + " | ".join(f"Ray, {w} worker{'s' if w > 1 else ''} (img/s)" for w in workers)
             + " | Ray's best time / local |", "|---|---|" + "---|" * len(workers) + "---|"]
    for row in r["rows"]:
        ray_cells = " | ".join(f"{row['ray_images_per_s'][w] if w in row['ray_images_per_s'] else row['ray_images_per_s'][str(w)]:.2f}"
                               for w in workers)
        lines.append(f"| {row['method']} | {row['local_images_per_s']:.2f} | {ray_cells} | {row['ray_over_local']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
