"""Parameter checks used at every public entry point, with one message format:
``<function>: <parameter> must be <allowed>; got <given>.``"""
from __future__ import annotations

import argparse
import difflib
import numbers
from typing import Iterable, Sequence

from .errors import InvalidParameterError, InvalidParameterTypeError


def refuse(where: str, name: str, allowed: str, value, type_error: bool = False):
    """Raise the one message format for a refused parameter."""
    cls = InvalidParameterTypeError if type_error else InvalidParameterError
    raise cls(f"{where}: {name} must be {allowed}; got {value!r}.")


def check_choice(where: str, name: str, value, allowed: Sequence):
    if not isinstance(value, str) or value not in allowed:
        refuse(where, name, "one of " + ", ".join(repr(a) for a in allowed), value,
              type_error=not isinstance(value, str))
    return value


def check_int(where: str, name: str, value, *, minimum=None, maximum=None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        refuse(where, name, "an integer", value, type_error=True)
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        refuse(where, name, f"an integer in [{minimum if minimum is not None else '-inf'}, "
                           f"{maximum if maximum is not None else 'inf'}]", value)
    return value


def check_float(where: str, name: str, value, *, minimum=None, maximum=None,
                min_inclusive=True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        refuse(where, name, "a number", value, type_error=True)
    value = float(value)
    low_ok = minimum is None or (value >= minimum if min_inclusive else value > minimum)
    if value != value or not low_ok or (maximum is not None and value > maximum):
        lo = "[" if min_inclusive else "("
        refuse(where, name, f"a number in {lo}{minimum if minimum is not None else '-inf'}, "
                           f"{maximum if maximum is not None else 'inf'}]", value)
    return value


def check_batch_size(where: str, value) -> "int | str":
    if value == "auto":
        return value
    if isinstance(value, str):
        refuse(where, "batch_size", "'auto' or a positive integer", value)
    return check_int(where, "batch_size", value, minimum=1, maximum=65536)


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates most similar to ``name`` (for 'did you mean' messages)."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.4)
    if len(found) < n:
        lowered = name.lower()
        found += [c for c in candidates if lowered and lowered in c.lower() and c not in found]
    return found[:n]


def auto_or_int(text: str):
    """An argparse type: 'auto' or an integer (worker and queue counts)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'auto' or an integer is needed; got {text!r}") from None
