"""CPU threads that stay fast on a busy machine.

torch's CPU kernels run on OpenMP (libgomp), whose threads by default spin at every barrier waiting
for each other. On an idle machine that saves microseconds; when other processes hold the cores, a
spinning thread burns the time slice its partner needs, and every one of the thousands of small
kernels of a backward pass waits for the scheduler. Measured on 2 cores with 2 busy processes
(benchmarks/contention.py): deep dream 5.3x (in another run 38x) slower than idle with libgomp's
default, 2.3x with ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep instead of spinning); two
busy processes alone make 2x the floor. The price: on an idle machine, torch-heavy work is about 1.5x
slower (deep dream 4.0 s against 2.6 s), since sleeping threads must be woken for every kernel.

libgomp reads the policy once, when torch is first imported, so it is chosen at ``import explainer``:
PASSIVE unless the user set ``OMP_WAIT_POLICY`` (their choice wins) or torch was imported before
explainer (then it is too late). onnxruntime keeps its own thread
pool: its spinning is bounded, and the batch methods run one single-threaded session per core, which
has no barriers at all.
"""
from __future__ import annotations

import os
import sys


def prefer_passive_openmp() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for this process unless the user chose a policy or torch's
    OpenMP runtime is already loaded; True when it was set here."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
