"""Figures, overlays, the HTML report (rendered in headless Chromium when it is installed)."""
import shutil
import subprocess

import numpy as np
import pytest

import explainer
from explainer.cli import main
from explainer.errors import InvalidParameterError


def test_mat2gray_and_imtile():
    np.testing.assert_allclose(explainer.mat2gray([[2, 4], [6, 10]]), [[0, 0.25], [0.5, 1]])
    assert np.all(explainer.mat2gray(np.ones((3, 3))) == 0)
    acts = np.stack([np.full((4, 5), i, np.float32) + np.arange(5) for i in range(6)])
    tiled = explainer.imtile(acts, channels=[0, 1, 2, 3], grid=(2, 2))
    assert tiled.shape == (2 * 4 + 1, 2 * 5 + 1)
    np.testing.assert_allclose(tiled[:4, :5], np.tile(np.linspace(0, 1, 5), (4, 1)))
    with pytest.raises(InvalidParameterError, match=r"\[0, 5\]"):
        explainer.imtile(acts, channels=[9])


def test_overlay_and_plot_maps(chelsea):
    m = np.zeros((30, 45), np.float32)
    m[:15] = 1.0
    out = explainer.overlay(chelsea, m, alpha=0.5)
    assert out.shape == chelsea.shape and out.dtype == np.uint8
    jet_top, jet_bottom = out[10, 200].astype(int), out[290, 200].astype(int)
    assert jet_top[0] > jet_top[2] and jet_bottom[2] > jet_bottom[0]  # red for 1, blue for 0
    fig = explainer.plot_maps(chelsea, m, 1 - m, "a", "b")  # MATLAB's plotMaps: the image, then the maps
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.get_title()]
    bars = [ax for ax in fig.axes if not ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["image", "a", "b"] and len(bars) == 2
    for panel, bar in zip(panels[1:], bars):  # each colour bar beside its map, no taller than the image
        assert bar.get_position().height <= panel.get_position().height * 1.001
        assert abs(bar.get_position().y0 - panel.get_position().y0) < 1e-3
    fig = explainer.plot_maps(chelsea, m, 1 - m, "a", "b", show_image=False)
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["a", "b"]


@pytest.fixture(scope="module")
def report(tmp_path_factory, chelsea):
    out = tmp_path_factory.mktemp("report")
    code = main(["explain", "sample:chelsea", "--methods", "gradcam,occlusion,gradient", "--labels", "top2",
                 "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_report_files(report):
    names = {p.name for p in report.iterdir()}
    assert {"index.html", "image.png", "gradcam_285.png", "occlusion_282.png", "gradient_285.png",
            "gradcam_285_curves.png"} <= names
    page = (report / "index.html").read_text()
    assert "Egyptian cat" in page and "deletion (zero) AUC" in page and "Parameters and timings" in page


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(report):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={report / 'chrome-profile'}", "--allow-file-access-from-files"]
    page = f"file://{report / 'index.html'}"
    shot = subprocess.run([_chromium(), *flags, f"--screenshot={report / 'screenshot.png'}",
                           "--window-size=1280,2000", page], capture_output=True, text=True, timeout=120)
    assert (report / "screenshot.png").stat().st_size > 10_000, shot.stderr[-2000:]
    dom = subprocess.run([_chromium(), *flags, "--virtual-time-budget=5000", "--dump-dom", page],
                         capture_output=True, text=True, timeout=120)
    assert "Egyptian cat" in dom.stdout
    # the page's own load handler counts the images whose naturalWidth > 0
    import re

    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
    assert loaded, dom.stdout[-1000:]
    assert int(loaded.group(1)) == int(loaded.group(2)) >= 7
