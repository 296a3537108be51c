"""onnxruntime's spinning pool threads, three ways, idle and beside a busy process per core, in one run.

    python -m benchmarks.spinning [--quick]

The library opens every multi-threaded CPU session with ``session.intra_op.allow_spinning=0``
(``OrtEngine.spinning``): its pool threads never spin, where onnxruntime's default has them spin within
a run and for a while after it; beside both, threads that spin within a run and stop when it ends
(``session.force_spinning_stop=1``). Two questions, on EfficientNet-Lite0 and a
torchvision ResNet-18 (the seeded export of tests/exports.py), each under two loads (idle: nothing
added; loaded: one ``while True: pass`` process per core, started by this run):

* back to back: one session's runs of a batch of 1 and of 16, one after the other (a forward-only
  method's stream), in ms per image;
* the next call: ``predict`` then, 20 ms later, Recipro-CAM's in-graph session (another session of
  the same process, the library's), timed, after a classifier session of each kind
  (``explainer.recipro_cam`` right after ``explainer.classify``).

Calls alternate between the variants turn by turn (a slow spell of the machine hits all); medians.
Writes ``benchmarks/results/spinning.json`` and ``spinning.md`` (``--quick`` only prints). Run it on an
otherwise idle machine: the load it adds is the only load it should measure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .run import cpu_model

RESULTS = Path(__file__).with_name("results")
TESTS = Path(__file__).resolve().parent.parent / "tests"
CORES = len(os.sched_getaffinity(0))
GAP = 0.02


@contextmanager
def load(busy: int):
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0)
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def files() -> list[tuple[str, str, dict]]:
    sys.path.insert(0, str(TESTS))
    import exports
    from explainer.zoo import registry

    return [("EfficientNet-Lite0", str(registry.REGISTRY["efficientnet_lite0"].fetch()), {}),
            ("ResNet-18 (torchvision, seeded)", str(exports.export("resnet18", "legacy")), {"preprocessing": "imagenet"})]


def alternate(calls: dict, turns: int, per_call: int = 1, gap: float = GAP) -> dict:
    """Median seconds per call of each variant, calling them turn by turn (the first rotating)."""
    order = list(calls.items())
    times = {k: [] for k in calls}
    for turn in range(turns):
        for key, (before, fn) in order[turn % len(order):] + order[:turn % len(order)]:
            time.sleep(gap)
            if before is not None:
                before()
                time.sleep(gap)
            start = time.perf_counter()
            for _ in range(per_call):
                fn()
            times[key].append((time.perf_counter() - start) / per_call)
    return {k: statistics.median(v) for k, v in times.items()}


def bench(name: str, path: str, keywords: dict, image, turns: int) -> list[dict]:
    import explainer
    from explainer.methods.gradcam import default_feature_layer
    from explainer.methods.recipro_cam import _in_graph_entry
    from explainer.runtime.ort_engine import OrtEngine

    net = explainer.load(path, batch_size=1, **keywords)
    layer = net.layer(default_feature_layer(net)[0])
    in_graph = _in_graph_entry(net, layer, "auto")[1]
    import onnxruntime as ort

    def opened(entries: dict):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 4
        for key, value in entries.items():
            options.add_session_config_entry(key, value)
        return ort.InferenceSession(net.model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    library = OrtEngine(net.model, net.input.name, ["CPUExecutionProvider"], "library").session([])
    assert library.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    sessions = {"on": opened({}), "stop": opened({"session.force_spinning_stop": "1"}), "never": library}
    x1 = net.to_model_input(net.fit_pixels(image)[None])
    x16 = np.repeat(x1, 16, axis=0)
    feed = lambda x: {net.input.name: x}  # noqa: E731
    rows = []
    for busy in (0, CORES):
        with load(busy):
            for batch, x, per_call in ((1, x1, 8), (16, x16, 1)):
                for s in sessions.values():
                    s.run(None, feed(x))
                got = alternate({k: (None, lambda s=s, x=x: s.run(None, feed(x))) for k, s in sessions.items()},
                                turns, per_call)
                rows.append(dict(model=name, load=busy, what=f"back to back, batch {batch}",
                                 **{f"{k}_ms": 1000 * v / batch for k, v in got.items()}))
            explain = lambda: in_graph.run(None, feed(x1))  # noqa: E731
            explain()
            got = alternate({k: (lambda s=s: s.run(None, feed(x1)), explain) for k, s in sessions.items()}, turns)
            rows.append(dict(model=name, load=busy, what="Recipro-CAM's session 20 ms after a forward",
                             **{f"{k}_ms": 1000 * v for k, v in got.items()}))
    for r in rows:
        r["on_over_never"], r["stop_over_never"] = r["on_ms"] / r["never_ms"], r["stop_ms"] / r["never_ms"]
        print(json.dumps(r), flush=True)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# onnxruntime's spinning threads ({meta['date']})", "",
             f"Machine: {meta['cpu']}; {meta['cpus']} CPUs; onnxruntime {meta['onnxruntime']}. Medians of "
             f"{meta['turns']} alternating turns. Load average (1 min) before the run: {meta['load1_before']:.2f}. "
             "loaded: one busy process per core added by the run.", "",
             "| model | load | what | spinning (onnxruntime's default) (ms) | stopped when a run ends (ms) "
             "| never spinning, the library's (ms) | spinning / never | stopped / never |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'loaded' if r['load'] else 'idle'} | {r['what']} | {r['on_ms']:.2f} | "
                     f"{r['stop_ms']:.2f} | {r['never_ms']:.2f} | **{r['on_over_never']:.2f}** | "
                     f"**{r['stop_over_never']:.2f}** |")
    lines += ["", "back to back: ms per image of one session's runs one after the other. Recipro-CAM's session "
              "20 ms after a forward: the in-graph session's call (its threads never spin) 20 ms after a run of "
              "the classifier's session of each kind. Ratios above 1: slower than the library's way "
              "(`OrtEngine.spinning`: `session.intra_op.allow_spinning=0`).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer turns; prints only")
    args = parser.parse_args(argv)
    import onnxruntime

    import explainer

    turns = 5 if args.quick else 25
    image = explainer.sample_image("chelsea")
    load1_before = os.getloadavg()[0]
    rows = []
    for name, path, keywords in files():
        rows += bench(name, path, keywords, image, turns)
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), cpu=cpu_model(), cpus=CORES,
                onnxruntime=onnxruntime.__version__, turns=turns, load1_before=load1_before)
    text = markdown(meta, rows)
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "spinning.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
        (RESULTS / "spinning.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
