"""The Ray engine: Ray Data's ``map_batches`` over an actor pool, each actor loading the model once
from bytes shared through the object store (``ray.put`` once, never re-read per task), running the
same ``explain_image`` as the local engine. The driver streams the actors' output into the same
store, so resume, errors and the summary are one code path. Ray retries a task whose actor died
(its rows are produced again, and the driver writes each image's rows once, when they arrive whole).
Ray stays an optional import (``pip install 'onnx-explainer[ray]'``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .. import progress
from ..errors import InvalidParameterError

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InvalidParameterError("explain_dataset: engine='ray' needs Ray: pip install 'onnx-explainer[ray]' "
                                    "(or ray[data]); engine='local' needs nothing.") from None
    return ray


class ExplainActor:
    """One model per actor, loaded in its constructor; called with batches of image refs."""

    def __init__(self, model, load_options: dict, plan, worker_name: str = "ray", explained=None):
        import os

        import ray

        import explainer

        if isinstance(model, ray.ObjectRef):  # constructor arguments reach the actor unresolved
            model = ray.get(model)
        self.net = explainer.load(model, **load_options)
        self.explained = None
        if explained is not None:  # the exported file's bytes: the fast path, checked against the model again
            from ..export.explained import ExplainedModel

            name, data = explained
            self.explained = ExplainedModel.open(ray.get(data) if isinstance(data, ray.ObjectRef) else data,
                                                 self.net, "explain_dataset: model_explained", name)
        self.plan = plan
        node = ray.get_runtime_context().get_node_id()
        self.worker = f"{worker_name}:{node[:12]}:{os.getpid()}"  # which node, which process

    def __call__(self, batch):
        import pyarrow as pa

        from .plan import explain_image
        from .sources import ImageRef
        from .store import error_schema, rows_table

        kinds, payloads = [], []
        for image_id, path, methods in zip(batch["id"].to_pylist(), batch["path"].to_pylist(),
                                           batch["methods"].to_pylist()):
            result = explain_image(self.net, ImageRef(image_id, path), self.plan, worker=self.worker,
                                   methods=methods, explained=self.explained)
            for kind, table in (("rows", rows_table(result.rows) if result.rows else None),
                                ("errors", pa.Table.from_pylist(result.errors, schema=error_schema())
                                 if result.errors else None)):
                if table is not None:
                    sink = pa.BufferOutputStream()
                    with pa.ipc.new_stream(sink, table.schema) as writer:
                        writer.write_table(table)
                    kinds.append(kind)
                    payloads.append(sink.getvalue().to_pybytes())
            kinds.append("done")  # one marker per image: the driver counts images by it
            payloads.append(image_id.encode())
        return pa.table({"kind": pa.array(kinds, pa.string()), "payload": pa.array(payloads, pa.binary())})


def _load_options(net: Classifier) -> dict:
    """What rebuilds the same classifier from the model's bytes on another process or node."""
    p = net.preprocessing
    return dict(preprocessing=dict(mean=tuple(p.mean), std=tuple(p.std), scale=p.scale, channel_order=p.channel_order),
                labels=list(net.class_names), input_layout=net.input.layout, device=net.device,
                engine=net.engine, precision=net.precision)


def run_ray(net: Classifier, refs, total: int, plan, store, *, address=None, workers="auto", gpus_per_worker=0,
            verbose: bool = True, explained=None) -> None:
    import pyarrow as pa

    import logging

    ray = _ray()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts images; Ray Data's would count blocks
    quiet = logging.getLogger("ray.data")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its per-second execution reports and notes, restored when done
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                 configure_logging=False)
    try:
        if workers == "auto":  # an actor keeps its node's cores busy (one onnxruntime stream per core)
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            gpus = ray.cluster_resources().get("GPU", 0)
            workers = max(1, int(gpus / gpus_per_worker) if gpus_per_worker else nodes)
        model = ray.put(net.source_model.SerializeToString())
        ds = ray.data.from_items([{"id": r.id, "path": r.path, "methods": list(m)} for r, m in refs])
        fast = (explained.name, ray.put(explained.data)) if explained is not None else None
        out = ds.map_batches(ExplainActor, fn_constructor_kwargs=dict(model=model, load_options=_load_options(net),
                                                                       plan=plan, explained=fast),
                             batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers),
                             num_gpus=gpus_per_worker or None, num_cpus=1)
        seen: set[str] = set()
        pending: dict[str, list] = {"rows": [], "errors": []}
        with progress.bar(total=total, desc="images", unit="img", verbose=verbose, leave=True) as bar:
            for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
                for kind, payload in zip(batch["kind"].to_pylist(), batch["payload"].to_pylist()):
                    if kind == "done":
                        image_id = payload.decode()
                        if image_id not in seen:  # a retried task may deliver an image again: write it once
                            seen.add(image_id)
                            for kind, tables in pending.items():
                                for table in tables:
                                    store.add_table(table if kind == "rows" else None,
                                                    table if kind == "errors" else None)
                            bar.update()
                        pending = {"rows": [], "errors": []}
                    else:
                        pending[kind].append(pa.ipc.open_stream(payload).read_all())
    finally:
        store.flush()
        quiet.setLevel(level)
        if started_here:
            ray.shutdown()
