"""Timing in a fresh interpreter, for comparisons between onnxruntime and torch.

In one process the two libraries' thread pools compete for the cores: onnxruntime timed right after a
busy torch pool ran up to 2x slower on the 2-core machine, and OMP_WAIT_POLICY=PASSIVE, which stops
torch's threads spinning, makes torch itself 1.6x slower. Each side of such a comparison therefore runs
in its own spawned process, as each library's users run it; the two still alternate, so a slow spell
of a shared machine hits both.
"""
from __future__ import annotations

import importlib
import multiprocessing
import statistics
import time


def call(target: str, *args):
    """``module:function(*args)`` run in a fresh interpreter; its (picklable) result."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_call, (target, args))


def _call(target: str, args):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(*args)


def _time_once(factory: str, args) -> float:
    """Build the callable (untimed), run it once to warm up, then time one run."""
    fn = _call(factory, args)
    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(ours: tuple, other: tuple, repeats: int) -> tuple[float, float, float]:
    """Like ``run.paired``, with each timing in a fresh process: ``ours`` and ``other`` are
    ``("module:factory", args)`` where ``factory(*args)`` returns the callable to time."""
    a, b = [], []
    for _ in range(repeats):
        a.append(call("benchmarks.isolated:_time_once", *ours))
        b.append(call("benchmarks.isolated:_time_once", *other))
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b))
