"""A test of the suite that skips for a missing package or browser fails the run (tests/conftest.py's
ALLOWED_SKIPS lists the reasons that depend on the machine instead); EXPLAINER_ALLOW_SKIPS=1 accepts them."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CASES = '''
import pytest

def test_runs():
    assert True

@pytest.mark.skipif(True, reason="{reason}")
def test_skips():
    pass
'''


def _run(tmp_path, reason, allow=None):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_case.py").write_text(CASES.format(reason=reason))
    env = {k: v for k, v in os.environ.items() if k != "EXPLAINER_ALLOW_SKIPS"}
    if allow:
        env["EXPLAINER_ALLOW_SKIPS"] = allow
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-c", os.devnull,
                           "--rootdir", str(tmp_path), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("reason", ["Debian's chromium is not installed (.ci/run installs it)",
                                    "the service's extra is not installed: pip install -e '.[serve]'"])
def test_a_skip_for_something_missing_fails_the_run(tmp_path, reason):
    run = _run(tmp_path, reason)
    assert run.returncode == 1, run.stdout[-2000:]
    assert "skips that fail the run" in run.stdout and reason.split("(")[0].strip() in run.stdout
    assert "1 passed, 1 skipped" in run.stdout


def test_an_allowed_reason_or_the_local_switch_passes(tmp_path):
    assert _run(tmp_path, "needs CUDA (TF32 is a GPU setting)").returncode == 0
    run = _run(tmp_path, "Debian's chromium is not installed", allow="1")
    assert run.returncode == 0 and "SKIPPED" in run.stdout and "skips that fail the run" not in run.stdout
