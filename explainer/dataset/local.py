"""The local engine: one process streams the images through ``explain_image`` and the store, one
image in memory at a time."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .. import progress
from .plan import explain_image

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier


def run_local(net: Classifier, refs, total: int, plan, store, verbose: bool = True, explained=None) -> None:
    """Explain ``refs`` ((image ref, methods to run) pairs) in order; finished images are written whatever stops the loop (an interrupt
    leaves a readable, resumable folder)."""
    try:
        with progress.bar(total=total, desc="images", unit="img", verbose=verbose, leave=True) as bar:
            for ref, methods in refs:
                result = explain_image(net, ref, plan, methods=methods, explained=explained)
                store.add(result.rows, result.errors)
                bar.update()
    finally:
        store.flush()
