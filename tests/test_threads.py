"""The CPU thread policy (explainer/threads.py): OpenMP threads sleep instead of spinning, unless the
user chose otherwise or torch came first."""
import os
import subprocess
import sys

import pytest

PRINT_POLICY = "import os; {first}; print(os.environ.get('OMP_WAIT_POLICY'))"


def _policy(first: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", PRINT_POLICY.format(first=first)], env=environ,
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("first, env, expected", [
    ("import explainer, torch", {}, "PASSIVE"),
    ("import explainer.methods.gradcam", {}, "PASSIVE"),        # any submodule runs the package first
    ("import explainer", {"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),  # the user's choice wins
    ("import torch, explainer", {}, "None"),                     # too late: libgomp has read it
])
def test_openmp_wait_policy(first, env, expected):
    assert _policy(first, **env) == expected
