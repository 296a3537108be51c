"""Speed on a busy machine: the walkthrough (and, with --suite, the test suite) idle and with a
background CPU load of one busy process per core, side by side in one run; the OpenMP wait policy's
share of it (deep dream, the torch-heaviest step, under each policy); and how fast the command line
answers --help and argument errors.

    python -m benchmarks.contention [--suite] [--suite-args "-m 'not slow'"]

Writes benchmarks/results/contention.json and .md. Run it on an otherwise idle machine: the load it
adds is the only load it should measure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
SPIN = "while True: pass"

DREAM = """
import time
{first}
import explainer
net = explainer.load()
layer = explainer.gradcam_layers(net)[1]
explainer.deep_dream_image(net, layer, [285], num_iterations=1, pyramid_levels=1, verbose=False)
start = time.perf_counter()
explainer.deep_dream_image(net, layer, [285, 282, 281], num_iterations=10, pyramid_levels=4, random_state=0,
                           verbose=False)
print(time.perf_counter() - start)
"""


@contextmanager
def busy(processes: int):
    """``processes`` pure-Python busy loops (one core each), stopped on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(processes)]
    try:
        time.sleep(1.0)
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update(extra)
    return env


def walkthrough_seconds(quick: bool) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "explainer", "walkthrough", "--quiet", "--out", out]
                       + (["--quick"] if quick else []), check=True, env=_env())
        wall = time.perf_counter() - start
        return wall, json.loads((Path(out) / "timings.json").read_text())


#: deep dream under each OpenMP wait policy: ours, PASSIVE, and libgomp's default (torch imported
#: before explainer, with no policy set, so that the library leaves it alone)
POLICIES = {"OMP_WAIT_POLICY=PASSIVE, sleep at once (the library's)": ("", {}),
            "GOMP_SPINCOUNT=3000, spin briefly, then sleep": ("", {"GOMP_SPINCOUNT": "3000"}),
            "libgomp default (spin 300,000 rounds, then sleep)": ("import torch", {})}


def dream_seconds(policy: str, repeats: int = 3) -> float:
    """Median seconds of deep dream in a fresh process under ``policy``."""
    return statistics.median(_dream_once(policy) for _ in range(repeats))


def _dream_once(policy: str) -> float:
    first, extra = POLICIES[policy]
    env = {k: v for k, v in _env().items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(extra)
    out = subprocess.run([sys.executable, "-c", DREAM.format(first=first)], check=True, capture_output=True,
                         text=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def suite_seconds(args: str, log: Path) -> tuple[float, str]:
    """Wall time of the test suite and pytest's summary line (its output goes to ``log``)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=20",
                        *shlex.split(args)], check=False, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    lines = [l for l in log.read_text().splitlines() if l.strip()]
    return wall, lines[-1] if lines else ""


def cli_seconds(argv: list[str], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "explainer", *argv], capture_output=True, env=_env())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", action="store_true", help="also the test suite, idle and loaded (long)")
    parser.add_argument("--suite-args", default="", help="pytest arguments for the suite runs")
    parser.add_argument("--quick", action="store_true", help="the walkthrough's --quick variant")
    parser.add_argument("--load", type=int, default=CORES, help="busy processes (default: one per core)")
    parser.add_argument("--parts", default="cli,dream,walkthrough",
                        help="what to measure (cli, dream, walkthrough; --suite adds suite); parts not measured "
                             "keep their figures from the last results file")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(",")) | ({"suite"} if args.suite else set())
    previous = RESULTS / "contention.json"
    rows: dict = json.loads(previous.read_text()) if previous.is_file() else {}
    rows.update(cores=CORES, load_processes=args.load, machine=platform.platform(),
                python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M"))

    if "cli" in parts:
        rows["cli"] = {"explainer --help": cli_seconds(["--help"]),
                       "explainer explain --help": cli_seconds(["explain", "--help"]),
                       "unknown method": cli_seconds(["explain", "sample:chelsea", "--methods", "nope"]),
                       "unknown option": cli_seconds(["explain", "sample:chelsea", "--set", "occlusion.strid=3"])}
        print("cli", rows["cli"], flush=True)

    if "dream" in parts:
        dream = {}
        for policy in POLICIES:
            dream[policy] = {"idle": dream_seconds(policy)}
            with busy(args.load):
                dream[policy]["loaded"] = dream_seconds(policy)
            dream[policy]["ratio"] = dream[policy]["loaded"] / dream[policy]["idle"]
            print("deep dream", policy, dream[policy], flush=True)
        rows["deep_dream_by_policy"] = dream

    if "walkthrough" in parts:
        idle, idle_steps = walkthrough_seconds(args.quick)
        print("walkthrough idle", idle, flush=True)
        with busy(args.load):
            loaded, loaded_steps = walkthrough_seconds(args.quick)
        print("walkthrough loaded", loaded, flush=True)
        rows["walkthrough"] = dict(quick=args.quick, idle_s=idle, loaded_s=loaded, ratio=loaded / idle,
                                   idle_steps=idle_steps, loaded_steps=loaded_steps)

    if "suite" in parts:
        logs = Path(tempfile.gettempdir())
        idle, idle_summary = suite_seconds(args.suite_args, logs / "contention-suite-idle.log")
        print("suite idle", idle, idle_summary, flush=True)
        with busy(args.load):
            loaded, loaded_summary = suite_seconds(args.suite_args, logs / "contention-suite-loaded.log")
        print("suite loaded", loaded, loaded_summary, flush=True)
        rows["suite"] = dict(args=args.suite_args, idle_s=idle, loaded_s=loaded, ratio=loaded / idle,
                             idle_summary=idle_summary, loaded_summary=loaded_summary)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "contention.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "contention.md").write_text(_markdown(rows))
    print(_markdown(rows))
    return 0


def _markdown(r: dict) -> str:
    lines = [f"# Speed on a busy machine ({r['date']}, {r['cores']} cores, load: {r['load_processes']} busy "
             "processes)", "",
             "| what | idle | loaded | loaded / idle |", "|---|---|---|---|"]
    w = r["walkthrough"]
    lines.append(f"| walkthrough{' --quick' if w['quick'] else ''} (whole command) | {w['idle_s']:.1f} s | "
                 f"{w['loaded_s']:.1f} s | {w['ratio']:.2f} |")
    for step in w["idle_steps"]:
        a, b = w["idle_steps"][step], w["loaded_steps"][step]
        lines.append(f"| &nbsp; step {step} | {a:.1f} s | {b:.1f} s | {b / a:.2f} |" if a else
                     f"| &nbsp; step {step} | {a:.1f} s | {b:.1f} s | |")
    if "suite" in r:
        s = r["suite"]
        lines.append(f"| test suite `pytest {s['args']}` ({s['idle_summary'].strip('= ')}) | {s['idle_s'] / 60:.1f} min | "
                     f"{s['loaded_s'] / 60:.1f} min | {s['ratio']:.2f} |")
    for policy, d in r["deep_dream_by_policy"].items():
        lines.append(f"| deep dream, 3 classes x 10 iterations x 4 levels (median of 3), OpenMP: {policy} | "
                     f"{d['idle']:.1f} s | {d['loaded']:.1f} s | {d['ratio']:.2f} |")
    lines += ["", "| command line | median of 5 (s) |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r["cli"].items()]
    lines += ["", "The library sets OMP_WAIT_POLICY=PASSIVE at import unless the user chose a wait policy or spin "
              "count or imported torch first (explainer/threads.py); a short spin and libgomp's default are shown "
              "for comparison."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
