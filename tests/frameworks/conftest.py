"""tests/frameworks runs under tests/conftest.py (its per-run library cache and memory trimming). Here:
the markers of the optional subsets (cases.SUBSETS: ``published``, ``extra``), whose cases run only
when asked for (``-m published``, ``-m extra``, or FRAMEWORKS_PUBLISHED=1 / FRAMEWORKS_EXTRA=1 with
build.py --published / --extra), whatever setup.cfg's addopts say."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402


def pytest_configure(config):
    for subset, what in cases.SUBSETS.items():
        config.addinivalue_line("markers", f"{subset}: {what} (built with tests/frameworks/build.py "
                                           f"--{subset}; run with -m {subset})")


def pytest_collection_modifyitems(config, items):
    asked = cases.enabled_subsets() | {s for s in cases.SUBSETS if s in (config.option.markexpr or "")}
    dropped = [item for item in items
               if any(item.get_closest_marker(s) for s in cases.SUBSETS if s not in asked)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]
