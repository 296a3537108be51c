"""The explanation methods, one file each (``registry.py`` says how a method declares itself).

``public_names`` tells ``explainer/__init__.py`` what the methods' files export without importing them
(``import explainer`` stays free of torch and numpy): it reads each method file's text for the functions
decorated ``@method(...)``, ``@twin_of(...)`` or ``@public``. tests/test_methods.py checks that it finds
exactly what importing the files registers.
"""
from __future__ import annotations

import re
from pathlib import Path

_MARK = re.compile(r"^@(method|twin_of|public)\b")
_DEF = re.compile(r"^def (\w+)")
_PUBLIC: dict[str, str] | None = None


def public_names() -> dict[str, str]:
    """{public name: its module under ``explainer``, e.g. "methods.lime"}, in file order (files by name),
    read once from the files' text."""
    global _PUBLIC
    if _PUBLIC is None:  # the files registry.method_modules() finds, without pkgutil's imports (inspect)
        found: dict[str, str] = {}
        for path in sorted(Path(__file__).parent.glob("[!_]*.py")):
            marked = False
            for line in path.read_text(encoding="utf-8").splitlines():
                if _MARK.match(line):
                    marked = True
                elif marked and _DEF.match(line):
                    found[_DEF.match(line).group(1)] = f"methods.{path.stem}"
                    marked = False
        _PUBLIC = found
    return _PUBLIC
