"""The CPU thread policy (explainer/threads.py): OpenMP threads sleep instead of spinning, unless the
user chose otherwise or torch came first; onnxruntime sessions survive a fork."""
import os
import subprocess
import sys

import pytest

import explainer

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


def test_a_forked_child_may_drop_an_inherited_classifier():
    """A process forked after explaining with a classifier drops it (and collects its sessions) and
    exits: onnxruntime sessions made in the parent are kept alive in the child, whose destroying them
    waited forever for their thread pools' threads (not in the child); the child may run them too."""
    import gc
    import signal
    import time

    import numpy as np
    from graphs import linear_classifier

    model, _ = linear_classifier(size=(16, 16))
    holder = [explainer.load(model, preprocessing="none")]
    image = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    expected = holder[0].predict(image)
    explainer.occlusion_sensitivity(holder[0], image, 0, mask_size=4, stride=4, verbose=False)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            same = np.array_equal(holder[0].predict(image), expected)  # an inherited session runs
            holder.clear()
            gc.collect()  # the classifier and its sessions, inherited, are dropped
            code = 0 if same else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not finish dropping the classifier in 60 s")
        time.sleep(0.05)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
