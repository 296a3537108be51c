import subprocess
import sys

import pytest
from PIL import Image

from explainer.cli import main


@pytest.fixture(scope="module")
def chelsea_png(tmp_path_factory, chelsea):
    path = tmp_path_factory.mktemp("img") / "chelsea.png"
    Image.fromarray(chelsea).save(path)
    return path


def test_classify_top3(chelsea_png, capsys):
    assert main(["classify", str(chelsea_png), "--top-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [l.split(".", 1)[1].split()[0] for l in out[1:]] == ["Egyptian", "tiger", "tabby"]


def test_layers_lists_ops(capsys):
    assert main(["layers", "--model", "seeded-squeezenet"]) == 0
    out = capsys.readouterr().out
    assert "Concat" in out and "GlobalAveragePool" in out


def test_user_error_is_one_line_and_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "explainer", "classify", str(tmp_path / "missing.png")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_walkthrough_writes_every_figure(tmp_path):
    import time

    start = time.perf_counter()
    assert main(["walkthrough", "--out", str(tmp_path), "--quiet", "--quick"]) == 0  # the README runs it whole
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["01_top3.png", "02_early_activations.png", "03_strongest_deep_channel.png",
                     "04_gradcam_deep_vs_shallow.png", "05_occlusion.png", "06_lime_top2.png",
                     "07_gradients.png", "08_deepdream.png"]
    assert time.perf_counter() - start < 600


def test_unknown_method_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "explainer", "explain", "sample:chelsea", "--methods", "shap",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown method 'shap'" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
