"""A vision transformer that learned something: a small timm ViT (class token) trained on scikit-learn's
``load_digits``, exported to ONNX and cached, for tests and for ``benchmarks/transformers.py``.

The data installs with scikit-learn (1797 handwritten digits, 8 x 8, values 0..16, no download).
Each digit is scaled to pixels 0..255, upsampled bilinearly to ``IMG_SIZE`` x ``IMG_SIZE`` and
replicated to three channels: the images ``digits()`` returns are what the library is given (already
at the network's size, so ``fit_pixels`` leaves them alone). The network takes them normalised as the
file's metadata (``onnx_explainer.preprocessing``) says: ``x / 255``, minus 0.5, over 0.5.

Training is deterministic: seeded (``torch.manual_seed``), single-threaded, a fixed stratified split
(75 % train, 25 % held out), batch order from a seeded generator, AdamW with a one-cycle schedule,
no augmentation (20 epochs: about 94 % held-out accuracy, half a minute of one core). The file is made once per recipe
(``RECIPE``'s hash, beside the torch and timm versions in ``exports.cache_root()``) and reused; its
folder also holds ``state_dict.pt`` (the trained weights, for comparisons on the torch side and for
randomisation tests) and ``training.json`` (held-out accuracy, training seconds).

    python tests/trained_vit.py      # make (or find) the file and print what training reached
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

IMG_SIZE = 24
#: the model and its training; any change is a new file
RECIPE = dict(img_size=IMG_SIZE, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
              num_classes=10, class_token=True, global_pool="token", epochs=20, batch_size=64, lr=2e-3,
              weight_decay=0.05, seed=0, split_seed=0, test_fraction=0.25, version=1)
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
PREPROCESSING = dict(mean=list(MEAN), std=list(STD), scale=1 / 255, channel_order="RGB", name="digits")
CLASS_NAMES = [f"digit {i}" for i in range(10)]


def digits():
    """(train pixels, train labels, held-out pixels, held-out labels): pixels (N, IMG_SIZE, IMG_SIZE, 3)
    uint8, labels int64; the same split every call."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    small = torch.from_numpy(data.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    big = torch.nn.functional.interpolate(small, size=(IMG_SIZE, IMG_SIZE), mode="bilinear", align_corners=False)
    pixels = big.clamp(0, 255).round().repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy().astype(np.uint8)
    labels = data.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(labels)), test_size=RECIPE["test_fraction"],
                              random_state=RECIPE["split_seed"], stratify=labels)
    return pixels[tr], labels[tr], pixels[te], labels[te]


def normalise(pixels):
    """(N, H, W, 3) pixels 0..255 -> the network's (N, 3, H, W) float32 torch input."""
    import torch

    x = torch.as_tensor(np.asarray(pixels, np.float32)).permute(0, 3, 1, 2) / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def architecture():
    """The untrained timm VisionTransformer of the recipe (seeded init)."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(RECIPE["seed"])
    keys = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "num_classes",
            "class_token", "global_pool")
    return VisionTransformer(**{k: RECIPE[k] for k in keys})


def train():
    """(the trained model in eval mode, {held-out accuracy, training seconds, ...})."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same sums in the same order on every machine
    try:
        start = time.perf_counter()
        xtr, ytr, xte, yte = digits()
        model = architecture()
        x, y = normalise(xtr), torch.from_numpy(ytr)
        generator = torch.Generator().manual_seed(RECIPE["seed"])
        steps_per_epoch = -(-len(y) // RECIPE["batch_size"])
        optimiser = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=RECIPE["lr"], pct_start=0.1,
                                                       total_steps=RECIPE["epochs"] * steps_per_epoch)
        model.train()
        for _ in range(RECIPE["epochs"]):
            order = torch.randperm(len(y), generator=generator)
            for i in range(steps_per_epoch):
                batch = order[i * RECIPE["batch_size"]:(i + 1) * RECIPE["batch_size"]]
                loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
        model.eval()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            predicted = model(normalise(xte)).argmax(1).numpy()
        info = dict(test_accuracy=float((predicted == yte).mean()), train_seconds=round(seconds, 1),
                    train_images=int(len(ytr)), test_images=int(len(yte)), final_loss=float(loss.detach()))
        return model, info
    finally:
        torch.set_num_threads(threads)


def recipe_key() -> str:
    return f"{zlib.crc32(repr(sorted(RECIPE.items())).encode()):08x}"


def folder() -> Path:
    """The cache folder of this recipe's files (exports.cache_root() is per torch and timm version)."""
    from exports import cache_root

    return cache_root() / f"digits_vit-{recipe_key()}"


def export_onnx(model, path: Path) -> None:
    """``model`` to ONNX as the tests' legacy exports are made (opset 17, dynamic batch), with the
    preprocessing and class names in ``metadata_props``."""
    import onnx
    import torch

    from explainer.model.labels import METADATA_KEYS
    from explainer.model.preprocess import METADATA_KEY

    x = torch.zeros(1, 3, IMG_SIZE, IMG_SIZE)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["scores"], dynamic_axes={"input": {0: "N"}, "scores": {0: "N"}})
    proto = onnx.load(str(path))
    for key, value in ((METADATA_KEY, json.dumps(PREPROCESSING)), (METADATA_KEYS[0], json.dumps(CLASS_NAMES))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def export() -> Path:
    """The path of the cached ONNX file (trained and exported on first use, in well under a minute)."""
    import torch

    path = folder() / "model.onnx"
    if path.is_file():
        return path
    path.parent.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=path.parent.parent, prefix=".partial-"))
    model, info = train()
    torch.save(model.state_dict(), partial / "state_dict.pt")
    (partial / "training.json").write_text(json.dumps(dict(info, recipe=RECIPE), indent=1) + "\n")
    export_onnx(model, partial / "model.onnx")
    shutil.rmtree(path.parent, ignore_errors=True)
    partial.rename(path.parent)
    return path


def trained_model():
    """The trained torch module (eval mode), from the cache."""
    import torch

    export()
    model = architecture()
    model.load_state_dict(torch.load(folder() / "state_dict.pt", weights_only=True))
    return model.eval()


def training_info() -> dict:
    export()
    return json.loads((folder() / "training.json").read_text())


@pytest.fixture(scope="session")
def digits_vit():
    """The trained digits ViT loaded by the library (``explainer.load`` of the cached file); tests
    import this fixture (``from trained_vit import digits_vit``)."""
    import explainer

    return explainer.load(export())


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    print(export())
    print(training_info())
