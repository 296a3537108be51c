"""How the service follows a running job and stops it.

Every long loop of the library reports its steps through ``explainer.progress`` (perturbation batches,
LIME's samples, the passes of integrated gradients and SmoothGrad), to the observers of the thread that
runs it, whether its bar is shown or not. A job observes its own thread (``running``): each step
updates what ``GET /v1/progress/{id}`` shows, and once the job is cancelled (its time limit passed, or
the service is stopping) the next step raises ``Cancelled``, so the library's loop ends there, through
its ``finally`` clauses (stream pools shut, hooks removed).

A job that never reaches a step (one forward pass) cannot be stopped this way: it ends on its own, and
until then its worker stays taken (the pool counts it), so the service stays bounded.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from .. import progress


class Cancelled(BaseException):
    """Raised inside a cancelled job at its next progress step. A BaseException, so that no
    ``except Exception`` of the library mistakes it for a failure it can recover from."""


class JobState:
    """What one job has done so far, readable from any thread, and its cancellation flag."""

    def __init__(self, label: str = ""):
        self.label = label
        self.created = time.monotonic()
        self.started: float | None = None
        self.stage, self.step, self.done, self.total = "", "", 0, None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raise ``Cancelled`` if the job was cancelled."""
        if self._cancelled.is_set():
            raise Cancelled(self.label)

    def set_stage(self, stage: str) -> None:
        """The job moves on (decode, a method's name, encode): checked for cancellation first."""
        self.check()
        self.stage, self.step, self.done, self.total = stage, "", 0, None

    def observe(self, step: "progress.Step") -> None:
        """The library's progress callback: records the step, stops the loop if cancelled (not while a
        bar closes: that runs during the loop's own unwinding)."""
        if not step.closed:
            self.step, self.done, self.total = step.desc, step.done, step.total
            self.check()

    def as_dict(self) -> dict:
        return {"stage": self.stage, "step": self.step, "done": self.done, "total": self.total,
                "elapsed_s": round(time.monotonic() - self.created, 3), "started": self.started is not None,
                "cancelled": self.cancelled}


@contextmanager
def running(job: JobState):
    """Runs the block as ``job``: its progress observed, its cancellation honoured."""
    job.started = time.monotonic()
    job.check()
    with progress.observe(job.observe):
        yield job
