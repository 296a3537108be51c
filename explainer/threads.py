"""CPU threads that stay fast on a busy machine.

torch's CPU kernels run on OpenMP (libgomp), whose threads by default spin at every barrier for up
to 300,000 rounds waiting for each other. On an idle machine that saves microseconds; when other
processes hold the cores, a spinning thread burns the time slice its partner needs, and every one of
the thousands of small kernels of a backward pass waits for the scheduler. ``OMP_WAIT_POLICY=PASSIVE``
makes waiting threads sleep at once. Measured on 2 cores, idle / beside two busy processes
(benchmarks/contention.py, one run each): the walkthrough 66 / 115 s with PASSIVE, 57 / 130 s with a
short spin of ``GOMP_SPINCOUNT=3000`` rounds; deep dream alone (3 classes, 4 levels x 10 iterations,
medians of 3) 4.1 / 6.7 s with PASSIVE, 3.0 / 5.8 s with the short spin (in another run 3.0 / 7.9),
2.4 / 12.3 s with libgomp's default (38x in a first probe). The short spin wins on an idle machine;
under load PASSIVE won the walkthrough by 15 s and deep dream's two runs were within their noise, so
PASSIVE, the steadier of the two when the cores are shared, is the default.

libgomp reads these once, when torch is first imported, so the choice is made at ``import explainer``:
PASSIVE unless the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` (their choice wins) or torch was
imported before explainer (then it is too late). onnxruntime keeps its own thread pool, whose threads
by default spin within a run and for a while after it: the library's multi-threaded sessions do not
spin, for the same reason (``OrtEngine.spinning``; benchmarks/spinning.py), and the batch methods
run one single-threaded session per core, which has no pool at all.
"""
from __future__ import annotations

import ctypes
import os
import sys
import weakref


def prefer_passive_openmp() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for this process unless the user chose a wait policy or spin
    count or torch's OpenMP runtime is already loaded; True when it was set here."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


# --- fork ----------------------------------------------------------------------------------------
# A forked child inherits the parent's onnxruntime sessions but not their thread pools' threads: it
# may run them, but destroying one joins threads that are not there and waits forever (a script that
# forks workers after explaining with a classifier, and drops it in a worker, hung; so did the fuzz
# campaign's children, collecting a session the parent had left as garbage). So every long-lived
# session is registered here, and in a forked child each one inherited is kept alive for the child's
# whole life: never destroyed there (its memory is the parent's, shared copy-on-write), still usable.
# (OpenVINO's compiled models are destroyed in a child without waiting: not registered.)
_SESSIONS: weakref.WeakSet = weakref.WeakSet()


def keep_in_forks(session):
    """``session`` (an onnxruntime session) registered so that a forked child never destroys it;
    returned."""
    _SESSIONS.add(session)
    return session


def _keep_inherited() -> None:
    """In a forked child: one more reference to each inherited session, never released (a reference
    from Python would be dropped at interpreter exit, when the destructor would hang)."""
    for session in list(_SESSIONS):
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(session))
    _SESSIONS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_keep_inherited)
