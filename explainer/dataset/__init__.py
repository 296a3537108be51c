"""Dataset scale: explain and audit whole image folders, in one process or on a Ray cluster.

``explain_dataset`` validates everything up front (``Plan``), lists the images (``sources``), skips
those a previous run finished (``store``), and hands the rest to an engine — ``local`` (this process,
streaming) or ``ray`` (Ray Data actors) — which both run the same per-image function
(``plan.explain_image``) and write through the same store. The output is a Parquet dataset and a
summary; see ``store`` for its layout.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import InvalidParameterError
from .plan import METRICS, Plan
from .sources import Source
from .store import ALL, Store, map_of, read_parts

ENGINES = ("local", "ray")


def explain_dataset(source, net_or_model=None, *, methods=("gradcam",), labels="top1", metrics=METRICS, out,
                    engine="local", ray_address=None, workers="auto", gpus_per_worker=0, batch_size="auto",
                    resume=True, options=None, steps=50, deletion_baseline="zero", path_column=None,
                    verbose=True, model_explained=None) -> dict:
    """Explain every image of ``source`` with each method and score each map; returns the summary.

    source: a folder (recursive), a .txt/.csv list of paths, or a .parquet/.csv table with an image-path
    column (``path_column``). net_or_model: a loaded classifier, or what ``explainer.load`` takes
    (None: the embedded default). labels: "top1" (any k) or class names/indices. metrics: deletion,
    insertion (AUC per map; () for none). out: the output folder (Parquet rows and errors, summary).
    engine: "local" (no Ray needed) or "ray" (``ray_address``, else a local Ray; ``workers`` actors,
    "auto": one per node, or one per ``gpus_per_worker`` GPUs). resume: skip images already in ``out``. options: {method: {option:
    value}}. batch_size: the classifier's forward batch size when a model is loaded here.
    model_explained: a file written by ``explainer export`` from the model (a path or an
    ``ExplainedModel``): the rows of its method at its layer come from one onnxruntime run of it per
    image (prediction and maps); automatic when ``net_or_model`` is itself such a file (or a classifier
    loaded from one).
    """
    from ..validation import check_choice

    check_choice("explain_dataset", "engine", engine, ENGINES)
    if not (workers == "auto" or (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1)):
        raise InvalidParameterError(f"explain_dataset: workers must be 'auto' or an integer >= 1; got {workers!r}.")
    if not (isinstance(gpus_per_worker, (int, float)) and not isinstance(gpus_per_worker, bool) and gpus_per_worker >= 0):
        raise InvalidParameterError(f"explain_dataset: gpus_per_worker must be a number >= 0; got {gpus_per_worker!r}.")
    if engine == "local" and (ray_address is not None or gpus_per_worker):
        raise InvalidParameterError("explain_dataset: ray_address and gpus_per_worker apply to engine='ray'; "
                                    f"got engine={engine!r}.")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise InvalidParameterError("explain_dataset writes Parquet: pip install 'onnx-explainer[dataset]' "
                                    "(pyarrow, pandas), or '[ray]' for the Ray engine too.") from None
    images = Source(source, path_column)
    from ..export.explained import as_explained

    net, inside = _classifier(net_or_model, batch_size)
    explained = as_explained(model_explained, net, "explain_dataset: model_explained") or inside
    plan = Plan.validated(net, methods, labels, metrics, options, steps, deletion_baseline)
    store = Store(out, resume=resume)
    done = store.done()

    def missing(ref):
        have = done.get(ref.id, ())
        return () if ALL in have else tuple(m for m in plan.methods if m not in have)

    total = sum(1 for ref in images if missing(ref))  # a pass over the names only: the bar's total
    todo = ((ref, lacking) for ref in images if (lacking := missing(ref)))  # streamed, with what each lacks
    if engine == "local":
        from .local import run_local

        run_local(net, todo, total, plan, store, verbose, explained=explained)
    else:
        from .ray_engine import run_ray

        run_ray(net, todo, total, plan, store, address=ray_address, workers=workers,
                gpus_per_worker=gpus_per_worker, verbose=verbose, explained=explained)
    from .summary import write

    return write(store)


def _classifier(net_or_model, batch_size):
    """(classifier, ExplainedModel or None): the exported file's fast path where the model is one."""
    from ..export.explained import load_explained, split
    from ..runtime import Classifier

    where = "explain_dataset"
    if isinstance(net_or_model, Classifier):
        return split(net_or_model, where)
    if net_or_model is None or isinstance(net_or_model, (str, bytes, Path)) or hasattr(net_or_model, "graph"):
        return load_explained(net_or_model, batch_size=batch_size, where=where)
    raise InvalidParameterError(f"explain_dataset: net_or_model must be a loaded classifier, a path, bytes, a "
                                f"registry name or None; got {type(net_or_model).__name__}.")


def read_rows(out, columns=None):
    """The rows of a dataset job as a pandas DataFrame (``map_of(row)`` gives a row's map)."""
    return read_parts(out, "rows", columns).to_pandas()


def read_errors(out):
    return read_parts(out, "errors").to_pandas()


__all__ = ["explain_dataset", "read_rows", "read_errors", "map_of", "Plan", "Source", "Store"]
