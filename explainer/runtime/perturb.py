"""The one batching loop of every perturbation method (occlusion, LIME, deletion/insertion curves).

A method describes its perturbed images as ``make_batch(start, stop)`` returning a batch in the
graph's input form, usually written through a ``Canvas``; ``make_batch`` must depend on nothing but
(start, stop), because on onnxruntime's CPU provider batches are made and forwarded in parallel
streams (see ``OrtEngine.parallel_streams``), as many as the run budget holds at once
(``limits.MAX_RUN_BYTES`` is the budget of every run in flight together, not of each). At most two
batches per stream are made ahead, so memory does not grow with the number of masks or samples;
probabilities are yielded in order, and callers may stop early (batches not started yet are cancelled).
"""
from __future__ import annotations

import itertools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from .. import progress

if TYPE_CHECKING:
    from .classifier import Classifier

BACKENDS = ("onnxruntime", "torch")


def forward_fn(net: Classifier, backend: str, single_thread: bool = False, logits: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """Model-input batch → (N, K) float32 probabilities on ``backend`` (``logits``: the pre-softmax
    scores; for a graph that outputs only probabilities, their logarithm); ``single_thread``: on a
    one-core onnxruntime session, for parallel streams."""
    if backend == "onnxruntime":
        # the logits before a trailing Softmax are an output of the graph too (exposed at load)
        pre_softmax = logits and (net.output.softmax_input or not net.output.is_probability)
        session_outputs = [net.output.softmax_input or net.output.name] if pre_softmax else [net.output.name]
        session = net.ort.session(session_outputs, single_thread=single_thread)

        def run(x):
            out = session.run(session_outputs, {net.input.name: x})
            if pre_softmax:
                raw = out[0].reshape(len(out[0]), -1)
                if not np.all(np.isfinite(raw)):
                    net.scores_from_outputs([raw])  # raises the library's NonFiniteOutputError
                return raw.astype(np.float32)
            probs = net.scores_from_outputs(out)
            if logits:  # a graph that outputs only probabilities: their logarithm
                return np.log(np.maximum(probs, np.finfo(np.float32).tiny))
            return probs

        return run
    import torch

    from .classifier import softmax
    from .torch_engine import torch_engine

    engine = torch_engine(net)

    already_probabilities = net.output.is_probability and not net.output.softmax_input

    def run_torch(x):
        with engine.exclusive(), torch.no_grad():
            out = engine.logits_from_model_input(engine.tensor(x)).cpu().numpy()
        if not np.all(np.isfinite(out)):
            return net.scores_from_outputs([out])  # raises the library's NonFiniteOutputError
        if logits:
            return np.log(np.maximum(out, np.finfo(np.float32).tiny)) if already_probabilities else out.astype(np.float32)
        return out.astype(np.float32) if already_probabilities else softmax(out)

    return run_torch


class Canvas:
    """The image and what replaces occluded pixels, converted to the graph's input form once, so that
    perturbations are written straight into model input instead of normalising every batch."""

    def __init__(self, net, pixels: np.ndarray, fill: np.ndarray):
        self.base = net.to_model_input(pixels[None])
        self.fill = net.to_model_input(np.broadcast_to(fill, pixels.shape).astype(np.float32)[None])
        self.channels_first = net.input.layout == "NCHW"

    def copies(self, n: int) -> np.ndarray:
        return np.repeat(self.base, n, axis=0)

    def occlude_rectangle(self, out: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]) -> None:
        """Occlude one rectangle of one image ``out`` (a view of a batch row)."""
        (r0, r1), (c0, c1) = rows, cols
        if self.channels_first:
            out[:, r0:r1, c0:c1] = self.fill[0, :, r0:r1, c0:c1]
        else:
            out[r0:r1, c0:c1] = self.fill[0, r0:r1, c0:c1]

    def occlude_masks(self, masks: np.ndarray) -> np.ndarray:
        """A batch with the pixels where ``masks`` (N x H x W, True = occluded) replaced by the fill."""
        m = masks[:, None] if self.channels_first else masks[..., None]
        return np.where(m, self.fill, self.base)


def stream_probabilities(net: Classifier, make_batch: Callable[[int, int], np.ndarray], total: int, *,
                         batch_size: int, backend: str = "onnxruntime", verbose: bool = True,
                         desc: str = "", logits: bool = False,
                         forward: Callable[[bool], Callable] | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (start, stop, probabilities) for perturbed images ``0 .. total-1`` in batches, in order
    (``logits``: pre-softmax scores instead, see ``forward_fn``). ``forward(single_thread)``, when
    given, replaces ``forward_fn``: it returns the function that maps what ``make_batch`` returns to
    probabilities (occlusion's incremental path feeds mask positions through it)."""
    if forward is None:
        forward = lambda single_thread: forward_fn(net, backend, single_thread=single_thread, logits=logits)  # noqa: E731
    spans = [(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]
    streams = min(net.ort.parallel_streams() if backend == "onnxruntime" else 1, len(spans))
    guard = net.ort.guard if backend == "onnxruntime" else None
    if streams > 1 and guard is not None:  # the runs in flight at once share the run budget
        streams = max(1, min(streams, guard.max_batch(net.per_image_shape) // batch_size))

    def held(run, span):  # a batch's run counted among the process's runs in flight (budget.IN_FLIGHT)
        batch = make_batch(*span)
        if guard is None:
            return run(batch)
        with guard.hold((span[1] - span[0], *net.per_image_shape), refuse=False):  # sized at resolve
            return run(batch)

    with progress.bar(total=total, desc=desc, unit="img", verbose=verbose) as bar:
        if streams <= 1:
            run = forward(False)
            for start, stop in spans:
                probs = held(run, (start, stop))
                bar.update(stop - start)
                yield start, stop, probs
            return
        run = forward(True)
        work = lambda span: held(run, span)  # noqa: E731
        pool = ThreadPoolExecutor(streams, thread_name_prefix="explainer-stream")
        try:
            pending = deque()
            todo = iter(spans)
            for span in itertools.islice(todo, 2 * streams):
                pending.append((span, pool.submit(work, span)))
            while pending:
                (start, stop), future = pending.popleft()
                probs = future.result()
                span = next(todo, None)
                if span is not None:
                    pending.append((span, pool.submit(work, span)))
                bar.update(stop - start)
                yield start, stop, probs
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
