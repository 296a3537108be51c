"""The bounded pool every classification and explanation runs in.

Requests never run model work on the event loop: each becomes a job for one of ``workers`` threads (the
library releases the GIL in onnxruntime and torch, and its perturbation methods spread their batches
over the cores themselves). At most ``workers + queue`` jobs are held at once, running or waiting; one
more is refused at once with ``Overloaded`` (503 and Retry-After), so a crowd gets a quick answer, never
a hang. Each job has a deadline: when it passes, the request is answered (``TimeLimitExceeded``) and the
job is cancelled, removed from the queue if it had not started, stopped at its next progress step if it
had (``progress``). A job counts against the bound until its thread is really free.

Threads, not worker processes (issue #29): the one model is loaded at start, where the library's checks
refuse a graph that could crash onnxruntime natively (zero extents, found by shape inference before any
session) or exhaust memory (the run budget, ``limits.MAX_RUN_BYTES``), and the runs of all requests in
flight share that budget (``runtime.budget.IN_FLIGHT``); allocation failures are typed errors,
answered like the others. A native crash these
checks do not foresee ends the process: run the service under a supervisor that restarts it.
"""
from __future__ import annotations

import asyncio
import math
import statistics
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from .progress import Cancelled, JobState, running


class Overloaded(Exception):
    """No room for one more job: the queue is full, or the service is shutting down."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class TimeLimitExceeded(Exception):
    """A job ran past its request's time limit; it was cancelled."""

    def __init__(self, message: str, started: bool):
        super().__init__(message)
        self.started = started


class WorkPool:
    def __init__(self, workers: int, queue: int):
        self.workers, self.capacity = workers, workers + queue
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="explainer-serve")
        self._lock = threading.Lock()
        self._held = 0
        self._jobs: dict[str, JobState] = {}
        self._durations: deque[float] = deque(maxlen=64)
        self.closing = False
        self.counts = {"done": 0, "refused": 0, "timed_out": 0, "cancelled": 0}

    # state ----------------------------------------------------------------------------------------
    @property
    def held(self) -> int:
        return self._held

    def job(self, job_id: str) -> JobState | None:
        return self._jobs.get(job_id)

    def retry_after(self) -> int:
        """Seconds after which a refused request may find room: the typical job's time, times the
        jobs ahead of it per worker."""
        typical = statistics.median(self._durations) if self._durations else 1.0
        return max(1, min(3600, math.ceil(typical * max(1, self._held) / self.workers)))

    def status(self) -> dict:
        return {"workers": self.workers, "capacity": self.capacity, "held": self._held,
                "closing": self.closing, **self.counts}

    # running --------------------------------------------------------------------------------------
    async def run(self, fn: Callable[[JobState], object], *, timeout: float, job_id: str, label: str = ""):
        """``fn(job)`` on a worker; its result, or ``Overloaded`` / ``TimeLimitExceeded``. ``fn`` calls
        ``job.set_stage`` between steps and the library reports progress inside them."""
        with self._lock:
            if self.closing or self._held >= self.capacity:
                self.counts["refused"] += 1
                raise Overloaded("the service is shutting down" if self.closing else
                                 f"the service is busy ({self._held} requests running or waiting, at most "
                                 f"{self.capacity}); retry later", self.retry_after())
            self._held += 1
        job = JobState(label)
        self._jobs[job_id] = job
        try:
            future = self._executor.submit(self._call, job, fn)
        except RuntimeError:  # the executor shut down between the check and here
            self._release(job_id, job)
            raise Overloaded("the service is shutting down", self.retry_after()) from None
        future.add_done_callback(lambda _: self._release(job_id, job))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            job.cancel()
            future.cancel()  # removes it from the queue when it has not started
            self.counts["timed_out"] += 1
            started = job.started is not None
            raise TimeLimitExceeded(
                f"the request took longer than its time limit of {timeout:g} s "
                + ("and was cancelled" if started else "waiting for a worker; retry later")
                + (f" (it reached {job.stage}" + (f", {job.done}/{job.total}" if job.total else "") + ")"
                   if started and job.stage else ""), started=started) from None
        except asyncio.CancelledError:  # the server is cancelling the request: so is its job
            job.cancel()
            future.cancel()
            raise
        except Cancelled:  # cancelled by the server's shutdown
            raise TimeLimitExceeded("the service stopped before the request finished", started=True) from None

    def _call(self, job: JobState, fn):
        start = time.monotonic()
        with running(job):
            try:
                return fn(job)
            finally:
                self._durations.append(time.monotonic() - start)

    def _release(self, job_id: str, job: JobState) -> None:
        with self._lock:
            self._held -= 1
            if self._jobs.get(job_id) is job:
                del self._jobs[job_id]
            if not job.cancelled:
                self.counts["done"] += 1
            else:
                self.counts["cancelled"] += 1

    # shutdown -------------------------------------------------------------------------------------
    async def close(self, grace: float) -> None:
        """Refuse new jobs, let held ones finish for up to ``grace`` seconds, cancel the rest, and wait
        for the workers to be free."""
        self.closing = True
        deadline = time.monotonic() + grace
        while self._held and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for job in list(self._jobs.values()):
            job.cancel()
        await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)
