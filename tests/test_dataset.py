"""Dataset jobs (explainer/dataset): rows equal to the library's direct calls, sources, typed error
rows, resume after an interruption with every image exactly once, bounded memory, and the Ray engine
on a real two-node cluster on 127.0.0.1 (one actor killed mid-run)."""
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import explainer
from explainer import progress
from explainer.dataset import explain_dataset, map_of, read_errors, read_rows
from explainer.errors import ExplainerError, InvalidParameterError
from explainer.model.preprocess import resize

from graphs import linear_classifier
from test_io import _png_header_only

KW = dict(methods=["gradcam", "occlusion"], steps=8, options={"occlusion": {"mask_size": 8, "stride": 8}},
          verbose=False)


@pytest.fixture(scope="module")
def tiny():
    model, _ = linear_classifier(k=3, size=(16, 16))
    return explainer.load(model, preprocessing="none")


def _images(folder, n, size=16, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / f"d{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(sub / f"img{i:05d}.png")
    return folder


@pytest.fixture
def folder(tmp_path):
    f = _images(tmp_path / "images", 5)
    (f / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (f / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    (f / "notes.txt").write_text("not an image, not listed")
    return f


def test_rows_equal_the_librarys_direct_calls(tiny, folder, tmp_path):
    out = tmp_path / "out"
    summary = explain_dataset(folder, tiny, labels="top2", out=out, **KW)
    rows = read_rows(out)
    assert len(rows) == 5 * 2 * 2 and summary["rows"] == 20  # 5 images x 2 labels x 2 methods
    for _, row in rows.sample(6, random_state=0).iterrows():
        image = np.asarray(Image.open(row.path), np.float32) / 255.0
        probs = tiny.predict(image)
        assert row.label in list(np.argsort(-probs)[:2]) and row.score == pytest.approx(probs[row.label], rel=1e-6)
        options = KW["options"].get(row.method, {})
        direct = explainer.get_method(row.method)(tiny, image, int(row.label), **options)
        expected = resize(direct[:, :, None], tiny.input.size, clip=False)[:, :, 0].astype(np.float16)
        np.testing.assert_array_equal(map_of(row), expected)
        auc = explainer.evaluate.deletion(tiny, image, direct, int(row.label), steps=8, verbose=False).auc
        assert row.deletion_auc == pytest.approx(auc, rel=1e-6)
        assert list(row.top_k_indices) == list(np.argsort(-probs, kind="stable")[:3])
    errors = read_errors(out).set_index("image_id")
    assert errors.loc["corrupt.png", "error_type"] == "InvalidImageError"
    assert errors.loc["bomb.png", "error_type"] == "ResourceLimitError" and "MAX_IMAGE_PIXELS" in errors.loc["bomb.png", "message"]
    assert summary["failed_images"] == 2 and summary["methods"]["gradcam"]["images"] == 5
    assert (out / "summary.md").read_text().startswith("7 images, 20 rows, 2 images failed")


def test_sources_list_csv_and_parquet_tables(tiny, folder, tmp_path):
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("img*.png"))[:3]
    (tmp_path / "list.txt").write_text("\n".join(str(folder / n) for n in names))
    pd.DataFrame({"id": range(3), "image_path": [str(folder / n) for n in names]}).to_csv(tmp_path / "t.csv", index=False)
    pd.DataFrame({"file": [str(folder / n) for n in names]}).to_parquet(tmp_path / "t.parquet")
    for source in ("list.txt", "t.csv", "t.parquet"):
        explain_dataset(tmp_path / source, tiny, out=tmp_path / f"out-{source}", metrics=(), **KW)
        assert sorted(read_rows(tmp_path / f"out-{source}").path.unique()) == sorted(str(folder / n) for n in names)
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(InvalidParameterError, match="no image-path column"):
        explain_dataset(tmp_path / "bad.csv", tiny, out=tmp_path / "o", **KW)


def test_everything_is_validated_before_any_work(tiny, folder, tmp_path):
    for bad, match in ((dict(methods=["gradcam", "nope"]), "unknown method"),
                       (dict(options={"occlusion": {"strid": 3}}), "unknown option"),
                       (dict(labels="cat,dog"), "class"), (dict(metrics=("auc",)), "metrics"),
                       (dict(engine="spark"), "engine"), (dict(workers=0), "workers")):
        with pytest.raises(ExplainerError, match=match):
            explain_dataset(folder, tiny, out=tmp_path / "never", **{**KW, **bad})
    assert not (tmp_path / "never").exists()


class Interrupt(KeyboardInterrupt):
    pass


def test_an_interrupted_run_is_readable_and_a_resume_adds_each_image_once(tiny, folder, tmp_path):
    out = tmp_path / "out"

    def stop_after_three(step):
        if step.desc == "images" and step.done == 3:
            raise Interrupt

    with pytest.raises(Interrupt), progress.observe(stop_after_three):
        explain_dataset(folder, tiny, out=out, **KW)
    first = read_rows(out)
    assert first.image_id.nunique() + read_errors(out).image_id.nunique() == 3  # what finished is there
    explain_dataset(folder, tiny, out=out, **KW)
    rows, errors = read_rows(out), read_errors(out)
    assert len(rows) == 5 * 2 and not rows.duplicated(["image_id", "label", "method"]).any()
    assert sorted(errors.image_id) == ["bomb.png", "corrupt.png"]
    with pytest.raises(InvalidParameterError, match="resume=True"):
        explain_dataset(folder, tiny, out=out, resume=False, **KW)
    # a method added later runs alone on what is there; the rows written stay as they were
    explain_dataset(folder, tiny, out=out, **{**KW, "methods": ["gradcam", "occlusion", "random"]})
    again = read_rows(out)
    assert len(again) == 5 * 3 and not again.duplicated(["image_id", "label", "method"]).any()
    kept = again[again.method != "random"].sort_values(["image_id", "method"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(kept.drop(columns="map"), rows.sort_values(["image_id", "method"])
                                  .reset_index(drop=True).drop(columns="map"))
    # readers leave a job's folder as they find it (a running job may be writing a part beside)
    writing = out / "rows" / ".part-being-written.tmp"
    writing.write_bytes(b"half")
    assert len(read_rows(out)) == 5 * 3 and writing.exists()
    with pytest.raises(InvalidParameterError, match="not a dataset job's folder"):
        read_errors(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.slow
def test_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """Peak traced memory over 2,000 images stays that of 400 (streaming, parts of bounded size). The
    network takes 64 x 64 images, so each row's map is 8 KB: rows kept for the whole run would add 13 MB
    over the 1,600 more images, against about 2 MB held at most (a part of 256 rows)."""
    model, _ = linear_classifier(k=3, size=(64, 64))
    tiny = explainer.load(model, preprocessing="none")
    _images(tmp_path / "many", 2000, size=8)
    peaks = {}
    for n in (400, 2000):
        source = tmp_path / f"list{n}.txt"
        source.write_text("\n".join(str(p) for p in sorted((tmp_path / "many").rglob("*.png"))[:n]))
        tracemalloc.start()
        explain_dataset(source, tiny, out=tmp_path / f"out{n}", methods=["occlusion"], metrics=(), verbose=False,
                        options={"occlusion": {"mask_size": 8, "stride": 8}})
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(read_rows(tmp_path / f"out{n}", columns=["image_id"])) == n
    assert peaks[2000] < 1.5 * peaks[400], peaks


# Ray ---------------------------------------------------------------------------------------------
def _ray_cli():
    return shutil.which("ray", path=os.path.dirname(sys.executable))


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head and a second node on 127.0.0.1 (one CPU each), stopped at the end."""
    ray_bin = _ray_cli()
    if ray_bin is None:
        pytest.skip("Ray is not installed (pip install -e '.[ray]'; the test extras include it)")
    temp = tmp_path_factory.mktemp("ray")
    port = 6390 + os.getpid() % 500
    # token authentication, with the token in the environment of the nodes and of this driver only
    auth = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)  # before ray is imported here: it reads them once
    env = dict(os.environ)
    common = ["--num-cpus=1", "--disable-usage-stats"]
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=false", f"--temp-dir={temp}", *common], check=True, env=env,
                   capture_output=True, timeout=180)
    try:
        subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", *common],
                       check=True, env=env, capture_output=True, timeout=180)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=180)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.slow
def test_ray_across_two_nodes_equals_local_and_survives_a_killed_actor(tiny, tmp_path, ray_cluster):
    import ray

    folder = _images(tmp_path / "images", 40, size=48)
    local = tmp_path / "local"
    explain_dataset(folder, tiny, out=local, **KW)
    killed = []

    def actor_pids():
        """The processes of Ray Data's actors running ExplainActor (their titles say so)."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if b"MapBatches(ExplainActor)" in f.read():
                            pids.append(int(entry))
                except OSError:
                    pass
        return pids

    def kill_one_actor():
        deadline = time.time() + 120
        while time.time() < deadline:
            pids = actor_pids()
            if len(pids) == 2:
                time.sleep(2.0)  # both actors loaded and working
                os.kill(pids[0], 9)
                killed.append(pids[0])
                return
            time.sleep(0.1)

    ray.init(address=ray_cluster, include_dashboard=False, log_to_driver=False)
    try:
        killer = threading.Thread(target=kill_one_actor, daemon=True)
        killer.start()
        out = tmp_path / "ray"
        explain_dataset(folder, tiny, out=out, engine="ray", workers=2, **KW)
        killer.join(timeout=5)
    finally:
        ray.shutdown()
    assert killed, "no actor was killed"
    a = read_rows(local).sort_values(["image_id", "method"]).reset_index(drop=True)
    b = read_rows(out).sort_values(["image_id", "method"]).reset_index(drop=True)
    assert len(b) == len(a) == 40 * 2 and not b.duplicated(["image_id", "label", "method"]).any()
    for col in ("image_id", "label", "method", "deletion_auc", "insertion_auc"):
        assert list(a[col]) == list(b[col]), col
    for ma, mb in zip(a["map"], b["map"]):
        np.testing.assert_array_equal(ma, mb)
    assert b.worker.str.split(":").str[1].nunique() == 2  # actors on both nodes
