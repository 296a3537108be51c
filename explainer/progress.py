"""Progress of long work: one kind of bar for every loop of the library.

Every loop that can take seconds (perturbation batches, LIME's samples, gradient passes, deep dream's
iterations, deletion/insertion curves, the phases of a report) reports through ``bar()``: a tqdm bar
on stderr, silent with ``verbose=False``. A bar also tells the observers of the thread that made it
(``observe``), whether it is shown or not: the service shows a job's progress that way, and stops a
job whose time ran out by raising from its observer (the loop then ends at its next step, through its
``finally`` clauses). A loop that ends early on purpose says why on its bar, whose line then stays on
screen (``stopped_early``).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, NamedTuple

_local = threading.local()


class Step(NamedTuple):
    """What an observer hears: which bar, how far it got, and its note (e.g. an early stop's reason)."""

    desc: str
    done: int
    total: int | None
    note: str = ""
    closed: bool = False


Observer = Callable[[Step], None]


def _observers() -> tuple[Observer, ...]:
    return tuple(getattr(_local, "observers", ()))


@contextmanager
def observe(callback: Observer) -> Iterator[None]:
    """Call ``callback(step)`` for every progress step of the bars made in this block, on this thread.
    An exception raised by the callback stops the loop that made the step."""
    previous = _observers()
    _local.observers = previous + (callback,)
    try:
        yield
    finally:
        _local.observers = previous


_BAR_CLASS = None


def _bar_class():
    """A tqdm subclass that counts even when disabled and tells its observers; made on first use so
    that importing the library does not import tqdm."""
    global _BAR_CLASS
    if _BAR_CLASS is None:
        from tqdm.auto import tqdm

        class Bar(tqdm):
            def __init__(self, iterable=None, *, observers: tuple = (), **kwargs):
                self._observers, self._done, self._note, self._closed_told = observers, 0, "", False
                self._desc, self._total = kwargs.get("desc") or "", kwargs.get("total")
                if self._total is None and hasattr(iterable, "__len__"):
                    self._total = len(iterable)
                super().__init__(iterable, **kwargs)
                self._tell()

            def _tell(self, closed: bool = False) -> None:
                for callback in self._observers:
                    callback(Step(self._desc, self._done, self._total, self._note, closed))

            def update(self, n=1):
                out = super().update(n)
                self._done += n or 0
                self._tell()
                return out

            def __iter__(self):
                for item in super().__iter__():
                    yield item
                    self._done += 1
                    self._tell()

            def stopped_early(self, reason: str) -> None:
                """End the bar short of its total, leaving its line on screen with the reason."""
                self._note = reason
                self.set_postfix_str(self._note, refresh=False)
                self.leave = True
                self.refresh()
                self._tell()

            def close(self):
                if not getattr(self, "_closed_told", True):  # once, and not for a half-made bar
                    self._closed_told = True
                    self._tell(closed=True)
                super().close()

        _BAR_CLASS = Bar
    return _BAR_CLASS


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        verbose: bool = True, leave: bool = False):
    """A progress bar (a ``tqdm`` instance, also usable as a context manager or an iterator) that is
    hidden with ``verbose=False`` but always heard by the thread's observers."""
    return _bar_class()(iterable, total=total, desc=desc, unit=unit, disable=not verbose, leave=leave,
            observers=_observers(), dynamic_ncols=True)
