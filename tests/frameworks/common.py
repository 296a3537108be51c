"""What every export script shares (numpy and the standard library only: it runs in each framework's
venv). An export script is called as ``python export_<framework>.py FOLDER``: build.py has written
``FOLDER/job.json`` (the case, from cases.py) and ``FOLDER/pixels.npy`` (uint8 N x H x W x C, the two
photographs at the network's input size); the script writes ``model.onnx`` (and any external data),
``reference.npz`` and ``case.json`` there, through ``finish``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

SEED = 0
#: the spread of the logits on the two photographs after the head is rescaled
TARGET_STD = 3.0


def job() -> tuple[Path, dict, np.ndarray]:
    """(folder, case, pixels) of the job this script was called for."""
    folder = Path(sys.argv[1])
    case = json.loads((folder / "job.json").read_text())
    pixels = np.load(folder / "pixels.npy", allow_pickle=False)
    return folder, case, pixels


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def head_scale(logits: np.ndarray) -> float:
    """The factor that brings the logits' standard deviation on the photographs to TARGET_STD."""
    spread = float(np.std(np.asarray(logits, dtype=np.float64)))
    return TARGET_STD / max(spread, 1e-12)


def random_images(n: int, size, channels: int, seed: int = 1) -> np.ndarray:
    """Smooth random pictures (uint8 N x H x W x C): coarse noise upsampled by repetition plus fine
    noise, so that BatchNorm statistics come from something image-like."""
    rng = np.random.default_rng(seed)
    h, w = size
    coarse = rng.uniform(0, 255, (n, (h + 7) // 8, (w + 7) // 8, channels))
    big = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :h, :w]
    return np.clip(big + rng.normal(0, 20, big.shape), 0, 255).astype(np.uint8)


def calibration_pixels(pixels: np.ndarray, n_random: int = 3, n_noise: int = 3) -> np.ndarray:
    """The batch BatchNorm statistics are set from (uint8): the photographs, their mirror images, smooth
    random pictures and uniform noise. The noise matters: the library checks its converted module
    against onnxruntime on uniform noise, and a network whose statistics never saw noise can blow up
    there (a seeded LeViT reached logits of 3000, where float32 rounding alone moves them by 40%)."""
    smooth = random_images(n_random, pixels.shape[1:3], pixels.shape[3])
    noise = np.random.default_rng(2).integers(0, 256, (n_noise, *pixels.shape[1:]), dtype=np.uint8)
    return np.concatenate([pixels, pixels[:, :, ::-1], smooth, noise])


def normalise(pixels: np.ndarray, preprocessing) -> np.ndarray:
    """The library's preprocessing presets and dicts (explainer/model/preprocess.py), written again
    here for the venvs that do not have the library: used to check that a framework's own
    preprocessing is the one the case declares."""
    presets = {
        "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 1 / 255, "RGB"),
        "caffe": ([103.939, 116.779, 123.68], [1.0], 1.0, "BGR"),
        "tf": ([1.0], [1.0], 1 / 127.5, "RGB"),
        "none": ([0.0], [1.0], 1.0, "RGB"),
        "unit": ([0.0], [1.0], 1 / 255, "RGB"),
    }
    if isinstance(preprocessing, str):
        mean, std, scale, order = presets[preprocessing]
    else:
        mean, std = preprocessing.get("mean", [0.0]), preprocessing.get("std", [1.0])
        scale, order = preprocessing.get("scale", 1.0), preprocessing.get("channel_order", "RGB")
    x = pixels.astype(np.float32)
    if order == "BGR" and x.shape[-1] == 3:
        x = x[..., ::-1]
    c = x.shape[-1]
    mean = np.asarray(mean[:c] if len(mean) == 3 else mean * c, np.float32)
    std = np.asarray(std[:c] if len(std) == 3 else std * c, np.float32)
    return (x * np.float32(scale) - mean) / std


def check_preprocessing(framework_input: np.ndarray, pixels: np.ndarray, preprocessing, layout: str) -> float:
    """The largest difference between the framework's own preprocessing of ``pixels`` and the one the
    case declares (as the library computes it); raises when they are not the same."""
    ours = normalise(pixels, preprocessing)
    if layout == "NCHW":
        ours = ours.transpose(0, 3, 1, 2)
    theirs = np.asarray(framework_input, dtype=np.float32)
    error = float(np.abs(ours - theirs).max())
    scale = max(float(np.abs(theirs).max()), 1.0)
    if error > 1e-4 * scale:
        raise AssertionError(f"the declared preprocessing {preprocessing!r} differs from the framework's "
                             f"own by {error:.3g}")
    return error


def opset_of(path: Path) -> int | None:
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)


def finish(folder: Path, case: dict, pixels: np.ndarray, probs: np.ndarray, *, framework_version: str,
           exporter_version: str, outputs: str, notes: str = "", started: float | None = None,
           **extra) -> None:
    """Writes reference.npz and case.json beside model.onnx (which the script has written)."""
    probs = np.asarray(probs, dtype=np.float32)
    assert probs.ndim == 2 and probs.shape[0] == len(pixels), probs.shape
    assert np.all(np.isfinite(probs)) and np.allclose(probs.sum(axis=1), 1, atol=1e-4), "not probabilities"
    assert (folder / "model.onnx").is_file(), "the export wrote no model.onnx"
    np.savez(folder / "reference.npz", pixels=pixels.astype(np.uint8), probs=probs)
    info = {
        "case": case["name"], "framework": case["framework"], "framework_version": framework_version,
        "exporter": case["exporter"], "exporter_version": exporter_version,
        "opset": opset_of(folder / "model.onnx") or case.get("opset"),
        "layout": case["layout"], "preprocessing": case["preprocessing"], "outputs": outputs,
        "input_size": case["input_size"], "channels": case["channels"], "num_classes": int(probs.shape[1]),
        "model": case["model"], "optional": case["optional"], "recipe": case["recipe"], "notes": notes,
        "top1": [int(i) for i in probs.argmax(axis=1)],
        "max_prob": [round(float(p), 4) for p in probs.max(axis=1)],
        "export_seconds": round(time.time() - started, 1) if started else None,
        **extra,
    }
    (folder / "case.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({"case": case["name"], "top1": info["top1"], "max_prob": info["max_prob"]}), flush=True)
