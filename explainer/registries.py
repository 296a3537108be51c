"""How the library's registries find and keep their entries: one rule for the three of them (the
explanation methods, ``explainer.methods.registry``; the graph passes, ``explainer.convert.passes``;
the op converters, ``explainer.convert.converters``).

* discovery: the modules of the registry's package are found by one ``pkgutil`` scan (``modules``) and
  imported in name order (``import_modules``) before the registry is first read; modules whose names
  start with "_" are helpers, imported by the modules that need them, and subpackages are not scanned;
* registration: the registry's decorator registers an entry as its module is imported;
* duplicates: a second entry under a name already registered raises ``ValueError`` naming both places
  (``duplicate``); nothing is overwritten.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Iterable


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
    path = Path(code.co_filename)
    root = Path(__file__).resolve().parents[1]
    try:
        path = path.resolve().relative_to(root)
    except ValueError:
        pass
    return f"{path}:{code.co_firstlineno}"


def duplicate(what: str, first: str, second: str) -> ValueError:
    """The error for a second entry under a registered name: ``what`` ("a pass named 'x'") is already
    registered at ``first``; ``second`` is the refused one's place."""
    return ValueError(f"{what} is already registered ({first}); refused a second one ({second})")
