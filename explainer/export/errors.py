"""The export's own errors, in the library's hierarchy (explainer/errors.py)."""
from __future__ import annotations

from ..errors import ExplainerError, UnsupportedModelError

RECIPRO_HINT = ("method='recipro_cam' exports for any head (it runs the head forward only); or pick a "
                "feature_layer after that node")


class UnsupportedHeadOpError(UnsupportedModelError):
    """The head (feature layer → scores) holds an op that no gradient rule covers, or covers only in
    part; the message names the op, the node and the way out."""


class ExportWriteError(ExplainerError, OSError):
    """The exported model cannot be written where asked (a folder, a missing or read-only folder, a
    full disk); nothing is left half-written."""
