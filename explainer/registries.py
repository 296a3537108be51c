"""How the library's registries find and keep their entries: one rule for the three of them (the
explanation methods, ``explainer.methods.registry``; the graph passes, ``explainer.convert.passes``;
the op converters, ``explainer.convert.converters``).

* discovery: the modules of the registry's package are found by one ``pkgutil`` scan (``modules``) and
  imported in name order (``import_modules``) before the registry is first read; modules whose names
  start with "_" are helpers, imported by the modules that need them, and subpackages are not scanned;
* registration: the registry's decorator registers an entry as its module is imported;
* duplicates: a second entry under a name already registered raises ``ValueError`` naming both places
  (``duplicate``); nothing is overwritten.

Also here, on the ground floor so that the Classifier (the runtime floor) can reach what the floors above
it keep: the per-classifier caches of the methods and exports (``register_classifier_cache``), tables
weakly keyed by the Classifier that each module registers once as it is imported, under the same rule
for duplicates; ``release_classifier_caches(net)`` drops one classifier's entries from all of them
(``Classifier.release_caches``).
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path
from typing import Iterable, MutableMapping, NamedTuple


def modules(folder) -> list[str]:
    """The names of the modules of a package's folder, private ones ("_...") and subpackages excluded."""
    return sorted(m.name for m in pkgutil.iter_modules([str(folder)]) if not m.name.startswith("_") and not m.ispkg)


def import_modules(package: str, names: Iterable[str]) -> None:
    """Imports ``package.name`` for each name, in order (each registers its entries as it is imported)."""
    for name in names:
        importlib.import_module(f"{package}.{name}")


def place(fn) -> str:
    """Where a function was defined, as ``path:line`` (the path from the repository's root when inside it)."""
    import inspect

    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        return getattr(fn, "__module__", None) or repr(fn)
    return _where(code.co_filename, code.co_firstlineno)


def _where(filename: str, line: int) -> str:
    """``path:line``, the path from the repository's root when inside it."""
    path = Path(filename)
    root = Path(__file__).resolve().parents[1]
    try:
        path = path.resolve().relative_to(root)
    except ValueError:
        pass
    return f"{path}:{line}"


def duplicate(what: str, first: str, second: str) -> ValueError:
    """The error for a second entry under a registered name: ``what`` ("a pass named 'x'") is already
    registered at ``first``; ``second`` is the refused one's place."""
    return ValueError(f"{what} is already registered ({first}); refused a second one ({second})")


# per-classifier caches ----------------------------------------------------------------------------------
class ClassifierCache(NamedTuple):
    """A registered per-classifier cache: its ``tables`` (mappings keyed by the Classifier, usually
    ``weakref.WeakKeyDictionary``), the ``lock`` its module holds while writing them (None: none), and
    ``place``, where it was registered (``path:line``)."""
    tables: tuple
    lock: object
    place: str


_CLASSIFIER_CACHES: "dict[str, ClassifierCache]" = {}


def register_classifier_cache(name: str, *tables: MutableMapping, lock=None) -> None:
    """Registers ``tables``, each keyed by the Classifier whose entries it keeps (made again on that
    classifier's next use when dropped), under ``name``; called once by the module that owns them, as it
    is imported. ``lock``: the lock its module holds while writing them, held while an entry is dropped.
    A second cache under a registered name is refused (``duplicate``)."""
    caller = sys._getframe(1)
    here = _where(caller.f_code.co_filename, caller.f_lineno)
    if not tables or not all(isinstance(t, MutableMapping) for t in tables):
        raise TypeError(f"register_classifier_cache({name!r}): give one or more mappings keyed by the "
                        f"classifier; got {[type(t).__name__ for t in tables]}")
    if name in _CLASSIFIER_CACHES:
        raise duplicate(f"a classifier cache named {name!r}", _CLASSIFIER_CACHES[name].place, here)
    _CLASSIFIER_CACHES[name] = ClassifierCache(tuple(tables), lock, here)


def classifier_caches() -> "dict[str, ClassifierCache]":
    """The registered per-classifier caches by name (a copy): those of the modules imported so far."""
    return dict(_CLASSIFIER_CACHES)


def release_classifier_caches(net) -> None:
    """Drops ``net``'s entries from every registered per-classifier cache (each under its lock)."""
    for cache in list(_CLASSIFIER_CACHES.values()):
        if cache.lock is not None:
            with cache.lock:
                for table in cache.tables:
                    table.pop(net, None)
        else:
            for table in cache.tables:
                table.pop(net, None)
