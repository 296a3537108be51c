"""OpenVINO XAI beside ours on both engines, in one run on one machine, on the same ONNX files.

    python -m benchmarks.openvino [--quick] [--masks 1000] [--peer-python /path/to/venv/bin/python]

Models: the embedded EfficientNet-Lite0 (the file ``explainer.load()`` reads) and a torchvision
resnet18 export (seeded weights, ``tests/exports.py``, legacy exporter with a dynamic batch); the
chelsea photo, each model's top-1 class on it.

* forward throughput (images/s, medians of the rounds): ours at the batch size and parallel streams the perturbation methods
  use (``net.stream_batch_size``), on onnxruntime f32 and OpenVINO f32 and bf16; OpenVINO XAI's
  forward pass as its black-box methods run it (its compiled model, one image per call), f32 and
  bf16;
* RISE with the same number of masks (grid 7, p 0.5, masked pixels blended toward the input zero,
  the paper's estimator on both sides): ours (``explainer.rise`` with ``engine=`` onnxruntime /
  openvino, ``precision=`` f32 / bf16) against ``openvino_xai``'s ``RISE`` compiled at the same
  precision (``INFERENCE_PRECISION_HINT``); the ratio is their time over ours, f32 vs f32 and bf16 vs
  bf16 (> 1: ours is faster);
* OpenVINO XAI's AISE (preset BALANCE: about 300 adaptive forward passes) beside, with its pass count;
* bf16 against f32 on our side: the largest change of any probability on the photo (score drift),
  and the Pearson correlation of the bf16 map with the f32 map on the same masks (RISE) and the same
  occlusion windows (occlusion).

RISE runs in alternating rounds (ours on the three configurations, then OpenVINO XAI's f32 and bf16;
default 3 rounds, medians; forward rates in the same rounds), so that a slow spell of a shared
machine hits both sides; the ratios are medians of the rounds' ratios. Occlusion and AISE are timed
once.

OpenVINO XAI pins an older OpenVINO and numpy 1.x, so it runs in its own virtual environment
(``--peer-python``, default ``$EXPLAINER_OVXAI_PYTHON``): python -m venv /tmp/ovxai && /tmp/ovxai/bin/pip
install openvino-xai. The run hands it the files and the preprocessed image and reads back its times
and maps. The machine's CPU flags are recorded (bf16 speed depends on avx512_bf16 / AMX).

Writes ``benchmarks/results/openvino.json`` and ``openvino.md`` and puts the tables into README.md
between ``<!-- openvino table: written by python -m benchmarks.openvino -->`` and
``<!-- end of openvino table -->`` (``--quick`` only prints).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).with_name("results")
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_fp16")
GRID = 7


def once(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def correlation(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def cpu_flags() -> list[str]:
    from .run import cpuinfo

    return (cpuinfo("flags") or "").split()


# OpenVINO XAI's side (runs under --peer-python: numpy and openvino only) -------------------------
def _softmax(out):
    z = np.asarray(out[0], np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _rate(call, x, seconds: float) -> float:
    call(x)
    start, runs = time.perf_counter(), 0
    while time.perf_counter() - start < seconds or runs < 3:
        call(x)
        runs += 1
    return len(x) * runs / (time.perf_counter() - start)


def peer(job: dict) -> dict:
    """OpenVINO XAI's forward pass, RISE and AISE on each model at each precision."""
    from importlib.metadata import version

    import openvino as ov
    from openvino_xai.methods.black_box.aise.classification import AISEClassification
    from openvino_xai.methods.black_box.base import Preset
    from openvino_xai.methods.black_box.rise import RISE

    core = ov.Core()
    out = dict(openvino=ov.__version__.split("-")[0], openvino_xai=version("openvino-xai"),
               numpy=np.__version__, models={})
    for m in job["models"]:
        x = np.load(m["input"])
        rows = {}
        for precision in job["precisions"]:
            model = core.read_model(m["path"])
            compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
            forward = _rate(lambda v: compiled(v), x, job["seconds"])
            rise = RISE(model, _softmax, prepare_model=False)
            rise._model_compiled = compiled
            rise_s, rise_map = once(lambda: rise.generate_saliency_map(
                x, [m["label"]], num_masks=job["masks"], num_cells=GRID, prob=0.5, seed=0,
                scale_output=False)[m["label"]])
            row = dict(forward_ips=forward, rise_s=rise_s)
            np.save(f"{job['dir']}/{m['name']}_{precision}_rise.npy", np.asarray(rise_map, np.float32))
            if job["aise"]:
                aise = AISEClassification(model, _softmax, prepare_model=False)
                aise._model_compiled = compiled
                passes = [0]
                plain = aise.model_forward

                def counted(v, preprocess=True):
                    passes[0] += 1
                    return plain(v, preprocess=preprocess)

                aise.model_forward = counted
                aise_s, aise_map = once(lambda: aise.generate_saliency_map(
                    x, [m["label"]], preset=Preset.BALANCE, scale_output=False)[m["label"]])
                row.update(aise_s=aise_s, aise_passes=passes[0])
                np.save(f"{job['dir']}/{m['name']}_{precision}_aise.npy", np.asarray(aise_map, np.float32))
            rows[precision] = row
            print(m["name"], precision, row, file=sys.stderr, flush=True)
        out["models"][m["name"]] = rows
    return out


# ours ---------------------------------------------------------------------------------------------
def model_files() -> dict[str, Path]:
    from explainer.zoo import registry

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import exports

    return {"efficientnet_lite0": registry.REGISTRY[registry.DEFAULT].path(),
            "resnet18": exports.export("resnet18", "legacy-dynamic")}


def stream_rate(net, seconds: float) -> tuple[float, int]:
    """Images/s of ``net``'s engine at the perturbation methods' batch size on their parallel streams."""
    from concurrent.futures import ThreadPoolExecutor

    batch = net.stream_batch_size
    streams = net.ort.parallel_streams()
    x = np.repeat(net._grey_input()[None], batch, axis=0)
    session = net.ort.session([net.output.name], single_thread=streams > 1)
    feed, names = {net.input.name: x}, [net.output.name]

    def timed(_):
        start, runs = time.perf_counter(), 0
        while time.perf_counter() - start < seconds or runs < 2:
            session.run(names, feed)
            runs += 1
        return runs

    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(lambda _: session.run(names, feed), range(streams)))
        start = time.perf_counter()
        runs = sum(pool.map(timed, range(streams)))
        return batch * runs / (time.perf_counter() - start), batch


CONFIGS = (("onnxruntime", "f32"), ("openvino", "f32"), ("openvino", "bf16"))


def load_all(name: str, path: Path, image):
    """Our three classifiers of one file, the label explained (onnxruntime's top-1) and the pixel that
    becomes the model input 0 (what OpenVINO XAI's masks blend toward)."""
    import explainer

    pre = "imagenet" if name == "resnet18" else None  # the torchvision export; Lite0's is in its metadata
    nets = {c: explainer.load(path, engine=c[0], precision=c[1], preprocessing=pre) for c in CONFIGS}
    ref = nets[CONFIGS[0]]
    label = int(np.argmax(ref.predict(image)))
    p = ref.preprocessing
    zero = np.clip(np.asarray(p.mean, np.float64) / p.scale, 0, 255)
    return nets, label, zero


def our_rise(net, image, label, zero, masks: int):
    from explainer.methods.rise import rise

    return rise(net, image, label, num_masks=masks, grid_size=GRID, mask_value=zero, estimator="paper",
                random_state=0, verbose=False)


def run_peer(python: str, job: dict, path: str) -> dict:
    Path(path).write_text(json.dumps(job))
    subprocess.run([python, "-m", "benchmarks.openvino", "--peer", path], check=True,
                   cwd=Path(__file__).resolve().parents[1])
    return json.loads(Path(job["result"]).read_text())


def compare(name: str, path: Path, image, masks: int, seconds: float, rounds: int, python: str, tmp: str) -> dict:
    """One model: occlusion once, then ``rounds`` rounds of our three forward rates and RISEs followed by
    OpenVINO XAI's (f32 and bf16, its AISE in the first round only); medians over the rounds."""
    import explainer

    nets, label, zero = load_all(name, path, image)
    ref = nets[CONFIGS[0]]
    np.save(f"{tmp}/{name}_input.npy", ref.to_model_input(ref.fit_pixels(image)[None]))
    rows, maps = {}, {}
    for config, net in nets.items():
        batch = net.stream_batch_size
        our_rise(net, image, label, zero, 4 * batch * net.ort.parallel_streams())  # warm-up
        occ_s, maps[config + ("occlusion",)] = once(
            lambda: explainer.occlusion_sensitivity(net, image, label, verbose=False))
        rows[config] = dict(engine=net.engine, precision=net.precision, stream_batch=batch, occlusion_s=occ_s,
                            probabilities=net.predict(image), rise_runs=[], forward_runs=[])
    theirs, meta = {"f32": [], "bf16": []}, {}
    for round_ in range(rounds):
        for config, net in nets.items():
            rows[config]["forward_runs"].append(stream_rate(net, seconds)[0])
            seconds_, maps[config + ("rise",)] = once(lambda: our_rise(net, image, label, zero, masks))
            rows[config]["rise_runs"].append(seconds_)
        job = dict(models=[dict(name=name, path=str(path), input=f"{tmp}/{name}_input.npy", label=label)],
                   precisions=["f32", "bf16"], masks=masks, seconds=seconds, aise=round_ == 0, dir=tmp,
                   result=f"{tmp}/peer.json")
        found = run_peer(python, job, f"{tmp}/job.json")
        meta = dict(peer_openvino=found["openvino"], openvino_xai=found["openvino_xai"])
        for precision, row in found["models"][name].items():
            theirs[precision].append(row)
    for row in rows.values():
        row["rise_s"] = float(np.median(row["rise_runs"]))
        row["forward_ips"] = float(np.median(row["forward_runs"]))
        print(name, {k: v for k, v in row.items() if k != "probabilities"}, flush=True)
    out = {}
    size = image.shape[:2]
    from explainer.methods._common import resize_map

    for precision, runs in theirs.items():
        first = runs[0]
        out[precision] = dict(forward_ips=float(np.median([r["forward_ips"] for r in runs])),
                              rise_s=float(np.median([r["rise_s"] for r in runs])),
                              rise_runs=[r["rise_s"] for r in runs], forward_runs=[r["forward_ips"] for r in runs],
                              aise_s=first["aise_s"],
                              aise_passes=first["aise_passes"])
        theirs_map = resize_map(np.load(f"{tmp}/{name}_{precision}_rise.npy")[None], size)[0]
        out[precision]["r_rise_ours_openvino"] = correlation(theirs_map, maps[("openvino", precision, "rise")])
        aise = resize_map(np.load(f"{tmp}/{name}_{precision}_aise.npy")[None], size)[0]
        out[precision]["r_aise_ours_rise"] = correlation(aise, maps[("openvino", "f32", "rise")])
    return dict(path=Path(path).name, label=label, ours={f"{e}-{p}": r for (e, p), r in rows.items()},
                theirs=out, maps=maps, meta=meta)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 masks, short timings; prints, writes no file")
    parser.add_argument("--masks", type=int, default=None, help="RISE masks on both sides (default 1000)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds of the RISE timings "
                        "(default 3; medians)")
    parser.add_argument("--peer-python", default=os.environ.get("EXPLAINER_OVXAI_PYTHON"),
                        help="python of a virtual environment with openvino-xai")
    parser.add_argument("--peer", help=argparse.SUPPRESS)  # internal: run OpenVINO XAI's side on a job file
    args = parser.parse_args(argv)
    if args.peer:
        job = json.loads(Path(args.peer).read_text())
        Path(job["result"]).write_text(json.dumps(peer(job)))
        return 0
    if not args.peer_python:
        parser.error("OpenVINO XAI runs in its own environment: pass --peer-python or set EXPLAINER_OVXAI_PYTHON")
    import onnxruntime
    import openvino

    import explainer

    masks = args.masks or (200 if args.quick else 1000)
    seconds = 0.5 if args.quick else 2.0
    rounds = args.rounds or (1 if args.quick else 3)
    image = explainer.sample_image("chelsea")
    flags = cpu_flags()
    from .run import cpu_model

    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), cpu=cpu_model(),
                machine=platform.machine(), cpus=len(os.sched_getaffinity(0)), masks=masks, grid=GRID, rounds=rounds,
                onnxruntime=onnxruntime.__version__, openvino=openvino.__version__.split("-")[0],
                cpu_flags=[f for f in FLAGS if f in flags], all_cpu_flags=" ".join(flags),
                load_before=os.getloadavg()[1], quick=args.quick)
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in model_files().items():
            models[name] = compare(name, Path(path), image, masks, seconds, rounds, args.peer_python, tmp)
            meta.update(models[name].pop("meta"))
    summary = summarise(models)
    meta["load_average"] = [round(meta.pop("load_before"), 2), round(os.getloadavg()[1], 2)]
    text = markdown(meta, summary)
    print(text)
    if args.quick:
        return 0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "openvino.json").write_text(json.dumps(dict(meta=meta, models=summary), indent=2) + "\n")
    (RESULTS / "openvino.md").write_text(text)
    from .run import write_between

    readme = Path(__file__).resolve().parent.parent / "README.md"
    body = f"Run of {meta['date']}. " + text.split("\n", 2)[2]  # without the title line
    if not write_between(readme, README_START, README_END, body):
        print(f"README.md has no {README_START!r} marker: the table is in {RESULTS / 'openvino.md'} only")
    return 0


README_START, README_END = ("<!-- openvino table: written by python -m benchmarks.openvino -->",
                            "<!-- end of openvino table -->")


def round_ratio(theirs: dict, ours: dict) -> float:
    """RISE: their time over ours, the median of the rounds' ratios."""
    return float(np.median(np.divide(theirs["rise_runs"], ours["rise_runs"])))


def forward_ratio(theirs: dict, ours: dict) -> float:
    """Forward: our rate over theirs, the median of the rounds' ratios."""
    return float(np.median(np.divide(ours["forward_runs"], theirs["forward_runs"])))


def summarise(models: dict) -> dict:
    out = {}
    for name, m in models.items():
        o, t, maps = m["ours"], m["theirs"], m["maps"]
        f32, bf16 = o["openvino-f32"], o["openvino-bf16"]
        drift = float(np.abs(bf16["probabilities"] - f32["probabilities"]).max())
        ort_drift = float(np.abs(f32["probabilities"] - o["onnxruntime-f32"]["probabilities"]).max())
        out[name] = dict(
            file=m["path"], label=m["label"],
            ours={k: {kk: vv for kk, vv in v.items() if kk != "probabilities"} for k, v in o.items()},
            theirs=t,
            # their time over ours (> 1: ours is faster), the median of the rounds' ratios: each round
            # runs ours just before theirs, so a slow spell of the machine hits both
            rise_ratio=dict(f32_openvino=round_ratio(t["f32"], f32),
                            f32_onnxruntime=round_ratio(t["f32"], o["onnxruntime-f32"]),
                            bf16=round_ratio(t["bf16"], bf16)),
            forward_ratio=dict(f32_openvino=forward_ratio(t["f32"], f32),
                               f32_onnxruntime=forward_ratio(t["f32"], o["onnxruntime-f32"]),
                               bf16=forward_ratio(t["bf16"], bf16)),
            aise_over_our_rise_f32=t["f32"]["aise_s"] / f32["rise_s"],
            bf16=dict(score_drift=drift, top1_f32=float(f32["probabilities"].max()),
                      top1_bf16=float(bf16["probabilities"][int(np.argmax(f32["probabilities"]))]),
                      r_rise=correlation(maps[("openvino", "bf16", "rise")], maps[("openvino", "f32", "rise")]),
                      r_occlusion=correlation(maps[("openvino", "bf16", "occlusion")],
                                              maps[("openvino", "f32", "occlusion")])),
            f32=dict(max_probability_difference_vs_onnxruntime=ort_drift,
                     rise_relative_difference_vs_onnxruntime=float(
                         np.abs(maps[("openvino", "f32", "rise")] - maps[("onnxruntime", "f32", "rise")]).max()
                         / np.abs(maps[("onnxruntime", "f32", "rise")]).max())))
    return out


def markdown(meta: dict, summary: dict) -> str:
    lines = [f"# OpenVINO XAI beside ours ({meta['date']})", "",
             f"Machine: {meta['cpu']}; {meta['cpus']} CPUs; flags {', '.join(meta['cpu_flags']) or 'none of note'}; "
             f"onnxruntime {meta['onnxruntime']}, OpenVINO {meta['openvino']} (ours); OpenVINO XAI "
             f"{meta['openvino_xai']} on OpenVINO {meta['peer_openvino']} (its own environment). RISE: "
             f"{meta['masks']} masks, grid {meta['grid']}, p 0.5 on both sides, medians of {meta['rounds']} alternating "
             "rounds, ratios the medians of the rounds' ratios (occlusion and AISE: one run). 5-minute load "
             f"average before / after: {meta['load_average'][0]} / {meta['load_average'][1]} on {meta['cpus']} "
             "CPUs (a shared machine: read the ratios, not the absolute times).", "",
             "| model | engine | precision | forward (img/s) | batch | RISE (s) | OpenVINO XAI forward (img/s) "
             "| OpenVINO XAI RISE (s) | RISE: theirs / ours (median of rounds) | forward: ours / theirs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        for key, row in s["ours"].items():
            precision = row["precision"]
            t = s["theirs"][precision]
            lines.append(f"| {name} | {row['engine']} | {precision} | {row['forward_ips']:.0f} | "
                         f"{row['stream_batch']} | {row['rise_s']:.2f} | {t['forward_ips']:.0f} | {t['rise_s']:.2f} | "
                         f"{round_ratio(t, row):.2f} | {forward_ratio(t, row):.2f} |")
    lines += ["", "| model | OpenVINO XAI AISE f32 (s) | passes | AISE / our RISE (openvino f32) | "
              "r(AISE, our RISE) | bf16 score drift | top-1 p f32 → bf16 | r(RISE bf16, f32) | "
              "r(occlusion bf16, f32) | f32 vs onnxruntime: max |Δp| | RISE max rel. Δ |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        t, b, f = s["theirs"]["f32"], s["bf16"], s["f32"]
        lines.append(f"| {name} | {t['aise_s']:.2f} | {t['aise_passes']} | {s['aise_over_our_rise_f32']:.2f} | "
                     f"{t['r_aise_ours_rise']:.3f} | {b['score_drift']:.4f} | {b['top1_f32']:.4f} → "
                     f"{b['top1_bf16']:.4f} | {b['r_rise']:.4f} | {b['r_occlusion']:.4f} | "
                     f"{f['max_probability_difference_vs_onnxruntime']:.1e} | "
                     f"{f['rise_relative_difference_vs_onnxruntime']:.1e} |")
    lines += ["", "Forward: ours at the perturbation methods' batch size on their parallel streams; OpenVINO "
              "XAI's black-box methods forward one image per call on its compiled model. RISE: theirs / "
              "ours > 1 means ours is faster, at the same precision (f32 rows against their f32, bf16 "
              "against their bf16). bf16 score drift: the largest change of any class probability on the "
              "photo, bf16 against f32 (both OpenVINO); r: Pearson correlation of the maps on the same "
              "masks / windows. AISE adapts its samples (DIRECT search over Gaussian kernels), so its map "
              "is compared with RISE's by correlation only (the resnet18 export has seeded, untrained weights: "
              "its maps carry no meaning, its timings do)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
