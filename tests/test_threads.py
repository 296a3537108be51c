"""The CPU thread policy (explainer/threads.py): OpenMP threads sleep instead of spinning, unless the
user chose otherwise or torch came first."""
import os
import subprocess
import sys

import pytest

PRINT_POLICY = ("import os; {first}; "
                "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")


def _policy(first: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", PRINT_POLICY.format(first=first)], env=environ,
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("first, env, expected", [
    ("import explainer, torch", {}, "PASSIVE None"),
    ("import explainer.methods.gradcam", {}, "PASSIVE None"),       # any submodule runs the package first
    ("import explainer", {"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE None"),  # the user's choice wins
    ("import explainer", {"GOMP_SPINCOUNT": "3000"}, "None 3000"),
    ("import torch, explainer", {}, "None None"),                     # too late: libgomp has read it
])
def test_openmp_wait_policy(first, env, expected):
    assert _policy(first, **env) == expected
