"""A registry of graph-normalisation passes, one small function per problem, in the spirit of
onnx2torch's converter registry.

A pass takes a ``ModelProto`` (modified in place) and a ``PassContext`` and returns how many places it
changed. ``normalise(model, target)`` copies the model and runs, in order, every pass registered for the
target: ``"runtime"`` passes make a graph run in onnxruntime at any batch size (and fold what it would
keep as slow nodes of their own: ``fold-zero-pads``); ``"torch"`` passes make it convertible by onnx2torch
(the batch passes among them).

Discovery and duplicates follow the rule of the library's three registries (``explainer.registries``):
the modules of ``explainer.convert`` (those whose names start with "_" and the ``converters`` subpackage
excepted) are found by one ``pkgutil`` scan and imported, in name order, before the first ``normalise``;
each registers its passes with ``@register`` as it is imported; a second pass of a name raises
``ValueError`` naming both places. Adding a pass is adding its function to a module of the package.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx

from ..registries import duplicate, import_modules, modules, place


@dataclass
class PassContext:
    image_input: str
    log: list[str] = field(default_factory=list)
    renamed: dict = field(default_factory=dict)  # original → safe names, filled by 'safe-names'
    #: the image input's full shape (its layout, a batch of 1) where passes need it and the graph declares
    #: some of its dims symbolic; None: the declared shape
    image_shape: list | None = None


@dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable[[onnx.ModelProto, PassContext], int]
    targets: tuple[str, ...]
    order: int


PASSES: dict[str, Pass] = {}
TARGETS = ("runtime", "torch")


def register(name: str, *, targets=("torch",), order: int = 100):
    """Decorator adding a pass to the registry (a second pass of the same name is refused); lower
    ``order`` runs first."""
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown pass targets {sorted(unknown)}; allowed: {TARGETS}")

    def wrap(fn):
        if name in PASSES:
            raise duplicate(f"a pass named {name!r}", place(PASSES[name].fn), place(fn))
        PASSES[name] = Pass(name, fn, tuple(targets), order)
        return fn

    return wrap


def _load_all() -> None:
    """Imports every module of the package once, so that each registers its passes."""
    global _LOADED
    if not _LOADED:
        import_modules(__package__, modules(Path(__file__).parent))
        _LOADED = True


_LOADED = False


# Passes that let a batch-1 export run larger batches; left out when a model falls back to batch 1.
BATCH_PASSES = ("free-batch", "dynamic-batch")


def normalise(model: onnx.ModelProto, target: str, image_input: str,
              ctx: PassContext | None = None, skip: tuple[str, ...] = ()) -> tuple[onnx.ModelProto, list[str]]:
    """A normalised copy of ``model`` and a log line per pass that changed something; passes named in
    ``skip`` are not run."""
    _load_all()
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}; got {target!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    ctx = ctx or PassContext(image_input)
    for p in sorted(PASSES.values(), key=lambda p: p.order):
        if target in p.targets and p.name not in skip:
            changed = p.fn(out, ctx)
            if changed:
                ctx.log.append(f"{p.name}: {changed} change(s)")
    return out, ctx.log
