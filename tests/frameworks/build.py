"""Builds the cross-framework exports: one venv per framework (their numpy/protobuf pins conflict),
then each case's ONNX file, reference probabilities and description, cached.

    python tests/frameworks/build.py [--only NAME ...] [--jobs N] [--published] [--extra] [--force]

Run with the main venv's python (the Hugging Face cases run in it, and it makes the pixels). NAME is
an environment (tf, paddle, jax, main) or a case (cases.py). Everything lives under
``$EXPORT_CACHE/frameworks`` (default ``~/.cache/onnx-explainer-tests/frameworks``):

- ``venv-<env>-<hash>/``: ``python -m venv`` + ``pip install`` of the pinned requirement lists below
  (the hash is that of the lists and the Python version); ``.complete`` is written last, so a venv
  left half-built by a crash is built again;
- ``v<BUILD_VERSION>/<case>/``: ``model.onnx`` (+ external data), ``reference.npz`` (``pixels`` uint8
  N x H x W x C, ``probs`` float32 N x K: the source framework's own probabilities on those pixels),
  ``case.json`` and ``export.log``; made in a ``.partial-*`` folder renamed at the end, so a crash
  leaves no half case. A case is made again when its recipe changes (its venv's requirements, its
  export script, common.py, or its entry in cases.py);
- ``timings.json``: seconds per venv build and per export, and each export's peak resident memory,
  from the runs that built them. A failed export leaves its log in ``v<BUILD_VERSION>/.failed-<case>.log``.

Venv builds run in the background from the start (pip is mostly downloading and unpacking); exports
run ``--jobs`` at a time (default 2) as their venv becomes ready, the main venv's from the start.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cases as cases_mod  # noqa: E402

# Pinned versions that were found to work together (Python 3.11, Linux x86-64, 2026-12). Each list
# is one `pip install` call, in order; a list starting with "--no-deps" installs without dependencies.
# tensorflow-cpu is TensorFlow 2.21.0 without the CUDA kernels (the same Python package and Keras 3);
# tf2onnx 1.17's own requirements (protobuf~=3.20, numpy<2) would downgrade what TensorFlow 2.21
# needs, so it comes without them and its imports are listed beside TensorFlow.
ENVS: dict[str, dict] = {
    "tf": {
        "script": "export_tf.py",
        "requirements": [
            ["tensorflow-cpu==2.21.0", "keras==3.15.1", "numpy==2.4.6", "protobuf==7.36.2", "onnx==1.23.2",
             "flatbuffers==25.12.19", "requests==2.34.2", "six==1.17.0", "ml_dtypes==0.7.0"],
            ["--no-deps", "tf2onnx==1.17.0"],
        ],
    },
    "paddle": {
        "script": "export_paddle.py",
        # paddle2onnx folds constants with polygraphy, which pip-installs onnxruntime, onnx_graphsurgeon
        # and sympy at run time when they are missing: they are listed here instead
        "requirements": [
            ["paddlepaddle==3.3.1", "paddle2onnx==2.1.0", "numpy==2.4.6", "protobuf==7.36.2", "packaging",
             "onnxruntime==1.32.0", "onnx_graphsurgeon==0.6.1", "sympy==1.14.0"],
        ],
    },
    "jax": {
        "script": "export_jax.py",
        "requirements": [
            ["jax==0.10.2", "jaxlib==0.10.2", "flax==0.12.8", "jax2onnx==0.17.1", "onnx==1.23.2",
             "onnxruntime==1.32.0", "numpy==2.4.6", "protobuf==7.36.2", "ml_dtypes==0.7.0"],
        ],
    },
    # the main venv (pip install -e '.[dev]' brings transformers): nothing to build
    "main": {"script": "export_transformers.py", "requirements": None},
}

EXPORT_TIMEOUT = 1200  # seconds for one case


def env_hash(env: str) -> str:
    spec = ENVS[env]["requirements"]
    if spec is None:
        from importlib.metadata import version

        spec = [f"{name}=={version(name)}" for name in ("torch", "transformers", "onnx", "onnxscript")]
    text = json.dumps([spec, sys.version_info[:2]])
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def venv_dir(env: str) -> Path:
    return cases_mod.cache_root() / f"venv-{env}-{env_hash(env)}"


def env_python(env: str) -> Path:
    return Path(sys.executable) if env == "main" else venv_dir(env) / "bin" / "python"


def recipe(name: str) -> str:
    """What a case's files are made from: a changed recipe makes them again."""
    case = cases_mod.CASES[name]
    parts = [env_hash(case["env"]), json.dumps(case, sort_keys=True), str(cases_mod.BUILD_VERSION),
             (HERE / ENVS[case["env"]]["script"]).read_text(), (HERE / "common.py").read_text()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def case_dir(name: str) -> Path:
    return cases_mod.cases_root() / name


def is_built(name: str) -> bool:
    folder = case_dir(name)
    try:
        info = json.loads((folder / "case.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("recipe") == recipe(name) and (folder / "model.onnx").is_file() and \
        (folder / "reference.npz").is_file()


def photographs(size, channels: int):
    """uint8 N x H x W x C: scikit-image's chelsea and coffee, gray (rgb2gray) for 1-channel models,
    resized with cv2.INTER_AREA to ``size`` = (height, width)."""
    import cv2
    import numpy as np
    from skimage import data
    from skimage.color import rgb2gray

    out = []
    for picture in (data.chelsea(), data.coffee()):
        if channels == 1:
            picture = np.rint(rgb2gray(picture) * 255).astype(np.uint8)
        small = cv2.resize(picture, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        out.append(small.reshape(size[0], size[1], channels))
    return np.stack(out).astype(np.uint8)


class Log:
    lock = threading.Lock()

    @classmethod
    def say(cls, text: str) -> None:
        with cls.lock:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def build_env(env: str) -> float:
    """Makes the env's venv unless it is complete; seconds spent (0 when reused)."""
    folder = venv_dir(env)
    if ENVS[env]["requirements"] is None or (folder / ".complete").is_file():
        return 0.0
    start = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    Log.say(f"venv {env}: building {folder.name}")
    log = folder.parent / f"{folder.name}.log"
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, stdout=out, stderr=out)
        pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
               "--no-input", "--progress-bar", "off"]
        for group in ENVS[env]["requirements"]:
            out.write(f"$ pip install {' '.join(group)}\n")
            out.flush()
            done = subprocess.run(pip + group, stdout=out, stderr=out)
            if done.returncode != 0:
                raise RuntimeError(f"pip install {' '.join(group)} failed in venv {env}; see {log}:\n"
                                   + tail(log))
    (folder / ".complete").write_text(json.dumps(ENVS[env]["requirements"]) + "\n")
    seconds = time.perf_counter() - start
    Log.say(f"venv {env}: built in {seconds:.0f} s")
    return seconds


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    keep = [l for l in text if "is ignored: it is neither a file nor a directory" not in l]
    return "\n".join(keep[-lines:])


def run_measured(command: list[str], cwd: Path, env: dict, out) -> tuple[int, int]:
    """(exit status, peak resident memory in MB) of ``command``, killed after EXPORT_TIMEOUT."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    timer = threading.Timer(EXPORT_TIMEOUT, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, int(usage.ru_maxrss // 1024)


def export_case(name: str, threads: int) -> tuple[float, int]:
    """Runs the case's export script in its venv and puts the case in place; (seconds, the script's
    peak resident memory in MB)."""
    import numpy as np

    case = dict(cases_mod.CASES[name], name=name, recipe=recipe(name))
    root = cases_mod.cases_root()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=root, prefix=f".partial-{name}-"))
    start = time.perf_counter()
    try:
        np.save(work / "pixels.npy", photographs(case["input_size"], case["channels"]), allow_pickle=False)
        (work / "job.json").write_text(json.dumps(case, indent=1))
        env = dict(os.environ, PYTHONHASHSEED="0", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
                   OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   OPENBLAS_NUM_THREADS=str(threads), P2O_KEEP_TEMP_MODEL="0",
                   POLYGRAPHY_AUTOINSTALL_DEPS="0", KERAS_BACKEND="tensorflow",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.pop("PYTHONPATH", None)
        script = HERE / ENVS[case["env"]]["script"]
        with open(work / "export.log", "w") as out:
            returncode, peak_mb = run_measured([str(env_python(case["env"])), str(script), str(work)], work, env,
                                               out)
        if returncode != 0:
            raise RuntimeError(f"export of {name} failed (exit {returncode}):\n" + tail(work / "export.log"))
        for required in ("model.onnx", "reference.npz", "case.json"):
            if not (work / required).is_file():
                raise RuntimeError(f"export of {name} wrote no {required}")
        info = json.loads((work / "case.json").read_text())
        info["export_peak_rss_mb"] = peak_mb
        (work / "case.json").write_text(json.dumps(info, indent=1) + "\n")
        with np.load(work / "reference.npz", allow_pickle=False) as ref:
            assert ref["pixels"].dtype == np.uint8 and ref["probs"].dtype == np.float32
        (work / "pixels.npy").unlink()
        (work / "job.json").unlink()
        final = case_dir(name)
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
        (root / f".failed-{name}.log").unlink(missing_ok=True)
    except BaseException:
        failed = root / f".failed-{name}.log"
        if (work / "export.log").is_file():
            shutil.copy(work / "export.log", failed)
        shutil.rmtree(work, ignore_errors=True)
        raise
    return time.perf_counter() - start, peak_mb


def update_timings(envs: dict, exports: dict, peaks: dict, total: float, jobs: int) -> None:
    path = cases_mod.cache_root() / "timings.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    old.setdefault("envs", {}).update({k: round(v, 1) for k, v in envs.items()})
    old.setdefault("exports", {}).update({k: round(v, 1) for k, v in exports.items()})
    old.setdefault("export_peak_rss_mb", {}).update(peaks)
    if envs or exports:
        old.setdefault("runs", []).append({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "jobs": jobs,
                                           "cpus": os.cpu_count(), "seconds": round(total, 1),
                                           "venvs_built": sorted(envs), "cases_built": sorted(exports)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old, indent=1) + "\n")


def prune() -> None:
    """Removes what no current recipe uses: case folders of removed cases, venvs of old requirement
    lists (their hash changed) and half-made case folders left by a crash over two hours ago."""
    root = cases_mod.cache_root()
    if not root.is_dir():
        return
    current = {venv_dir(env).name for env in ENVS if ENVS[env]["requirements"] is not None}
    for path in root.glob("venv-*"):
        if path.name not in current and not path.name.endswith(".log"):
            Log.say(f"removing the old venv {path.name}")
            shutil.rmtree(path, ignore_errors=True)
            path.with_name(path.name + ".log").unlink(missing_ok=True)
    cases_root = cases_mod.cases_root()
    for path in cases_root.glob("*") if cases_root.is_dir() else ():
        stale = path.name.startswith(".partial-") and time.time() - path.stat().st_mtime > 7200
        if path.is_dir() and (stale or (not path.name.startswith(".") and path.name not in cases_mod.CASES)):
            shutil.rmtree(path, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="environments or cases to build")
    parser.add_argument("--jobs", type=int, default=2, help="exports run at once (default 2)")
    for subset, what in cases_mod.SUBSETS.items():
        parser.add_argument(f"--{subset}", action="store_true",
                            help=f"also {what} (FRAMEWORKS_{subset.upper()}=1 does the same)")
    parser.add_argument("--force", action="store_true", help="export the selected cases again")
    args = parser.parse_args(argv)

    names = cases_mod.selected({s for s in cases_mod.SUBSETS if getattr(args, s)} | cases_mod.enabled_subsets())
    if args.only:
        unknown = [n for n in args.only if n not in ENVS and n not in cases_mod.CASES]
        if unknown:
            parser.error(f"unknown names {unknown}; environments: {sorted(ENVS)}, "
                         f"cases: {sorted(cases_mod.CASES)}")
        names = [n for n in cases_mod.CASES
                 if n in args.only or (n in names and cases_mod.CASES[n]["env"] in args.only)]
    prune()
    todo = [n for n in names if args.force or not is_built(n)]
    envs = sorted({cases_mod.CASES[n]["env"] for n in todo} - {"main"})
    Log.say(f"{len(names) - len(todo)} of {len(names)} cases cached in {cases_mod.cases_root()}; "
            f"to export: {len(todo)}; venvs needed: {envs or 'none'}")
    start = time.perf_counter()
    env_seconds: dict[str, float] = {}
    export_seconds: dict[str, float] = {}
    export_peaks: dict[str, int] = {}
    failures: dict[str, str] = {}
    work: queue.Queue = queue.Queue()
    lock = threading.Lock()
    # the main venv's cases first (their venv is ready), the optional ones (published sizes: slowest) first
    for name in sorted([n for n in todo if cases_mod.CASES[n]["env"] == "main"],
                       key=lambda n: cases_mod.CASES[n]["optional"] is None):
        work.put(name)

    def env_builder(env: str) -> None:
        try:
            seconds = build_env(env)
            with lock:
                if seconds:
                    env_seconds[env] = seconds
            for name in todo:
                if cases_mod.CASES[name]["env"] == env:
                    work.put(name)
        except Exception as exc:
            with lock:
                for name in todo:
                    if cases_mod.CASES[name]["env"] == env:
                        failures[name] = f"venv {env}: {exc}"
            Log.say(f"venv {env}: FAILED: {exc}")

    builders = [threading.Thread(target=env_builder, args=(env,), daemon=True) for env in envs]
    for thread in builders:
        thread.start()
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))

    def worker() -> None:
        while True:
            try:
                name = work.get(timeout=0.5)
            except queue.Empty:
                with lock:
                    finished = len(export_seconds) + len(failures) >= len(todo)
                if finished or (not any(t.is_alive() for t in builders) and work.empty()):
                    return
                continue
            Log.say(f"export {name} ...")
            try:
                seconds, peak = export_case(name, threads)
                with lock:
                    export_seconds[name], export_peaks[name] = seconds, peak
                Log.say(f"export {name}: {seconds:.0f} s, {peak} MB")
            except Exception as exc:
                with lock:
                    failures[name] = str(exc)
                Log.say(f"export {name}: FAILED: {exc}")

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, args.jobs))]
    for thread in workers:
        thread.start()
    for thread in builders + workers:
        thread.join()
    total = time.perf_counter() - start
    update_timings(env_seconds, export_seconds, export_peaks, total, args.jobs)
    Log.say(f"done in {total:.0f} s: {len(export_seconds)} exported, {len(failures)} failed"
            + "".join(f"\n  {name}: {why.splitlines()[0]}" for name, why in failures.items()))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
