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
def test_walkthrough_writes_every_figure(tmp_path, capfd):
    import re
    import warnings

    import explainer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["walkthrough", "--out", str(tmp_path), "--quiet", "--quick"]) == 0  # the README runs it whole
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "/explainer/" in w.filename.replace("\\", "/")]
    assert not ours, ours  # no warning from the library's own code paths
    assert capfd.readouterr().err == ""  # --quiet: no bars
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["01_top3.png", "02_early_activations.png", "03_strongest_deep_channel.png",
                     "04_gradcam_deep_vs_shallow.png", "05_occlusion.png", "06_lime_top2.png",
                     "07_gradients.png", "08_deepdream.png"]
    for name in names:
        with Image.open(tmp_path / name) as im:
            assert round(im.info["dpi"][0]) >= 150, name
    page = (tmp_path / "index.html").read_text()
    # the score table holds what the network says, each figure has its caption
    for p in explainer.load().top_k("sample:chelsea", 5):
        assert re.search(rf"<td>{re.escape(p.label)}</td><td class='num'>{p.score:.4f}</td>", page), p
    assert page.count("<figcaption>") == len(names) and "<style>" in page
def test_unknown_method_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "explainer", "explain", "sample:chelsea", "--methods", "shap",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown method 'shap'" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


HEAVY = ("torch", "onnxruntime", "onnx2torch", "matplotlib", "fastapi")
ANSWER_WITHOUT_HEAVY_IMPORTS = """
import sys
from explainer.cli import main
try:
    rc = main({argv!r})
except SystemExit as exc:
    rc = exc.code
print("RC", rc, sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [
    ["--help"], ["explain", "--help"], ["serve", "--help"],
    ["explain", "sample:chelsea", "--methods", "gradcam,nope"],        # an unknown method
    ["explain", "sample:chelsea", "--set", "occlusion.strid=3"],       # an unknown option
    ["classify", "--top-k", "x", "sample:chelsea"],                    # argparse's own error
])
def test_help_and_argument_errors_import_nothing_heavy(argv):
    """--help and argument errors answer before torch, onnxruntime or matplotlib are imported (each
    costs seconds; measured times in benchmarks/results/contention.md)."""
    code = ANSWER_WITHOUT_HEAVY_IMPORTS.format(argv=argv, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("RC") and last.split(" ", 2)[1] in ("0", "2"), out.stdout[-500:] + out.stderr[-500:]
    assert last.endswith("[]"), last


def test_the_package_loads_what_is_used_on_first_use():
    """``import explainer`` is light; public names and subpackages load when first touched."""
    code = ("import sys, explainer; light = 'torch' not in sys.modules; "
            "print(light, callable(explainer.gradcam), callable(explainer.dataset.map_of), "
            "callable(explainer.model.preprocess.resize), hasattr(explainer, 'no_such_name'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "True", "True", "True", "False"], out.stderr[-800:]
