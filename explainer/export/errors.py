"""The way out the export's errors name (the classes are in explainer/errors.py)."""
from __future__ import annotations

RECIPRO_HINT = ("method='recipro_cam' exports for any head (it runs the head forward only); or pick a "
                "feature_layer after that node")
