"""The models onnx-explainer knows by name: the embedded default
EfficientNet-Lite0 built from real ImageNet weights, the ONNX Model Zoo GoogLeNet (downloaded with a
checksum), and the nine zoo architectures shipped in the onnx wheel with seeded weights."""
from __future__ import annotations

from pathlib import Path

from ..model.load import LoadedModel, from_built, from_file, load_model


def load_source(source=None, *, allow_external_data: bool = True) -> LoadedModel:
    """What ``explainer.load`` accepts → a ``LoadedModel``: None (the embedded default) or a registry
    name resolved here, a path, bytes or a ModelProto by ``explainer.model.load``."""
    from . import registry

    if source is None:
        source = registry.DEFAULT
    if isinstance(source, str) and source in registry.REGISTRY and not Path(source).exists():
        entry = registry.REGISTRY[source]
        loaded = from_built(entry.make(), source) if entry.make is not None else from_file(entry.fetch(), source)
        loaded.registry_entry = entry
        return loaded
    return load_model(source, allow_external_data=allow_external_data, names=tuple(registry.REGISTRY))
