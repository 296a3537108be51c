"""#28 point 6: the transformer methods reach every way in through the registry alone: the service, the
HTML report, the dataset job and the CLI give the maps the library gives, on a ViT export."""
import base64
import io
import json

import numpy as np
import pytest

pytest.importorskip("fastapi")  # the service's extra (installed by the dev extras; a skip fails CI)
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import explainer  # noqa: E402
from explainer.methods.registry import get_method  # noqa: E402
from explainer.serve import Settings, create_app  # noqa: E402

import exports  # noqa: E402

METHODS = ("attention_rollout", "transformer_attribution", "attn_lrp")
LABELS = [285, 281]


@pytest.fixture(scope="module")
def vit():
    return explainer.load(exports.export("vit_tiny"))


@pytest.fixture(scope="module")
def image(chelsea):
    return np.ascontiguousarray(chelsea[::4, ::4])  # 75 x 113: the maps come back at the image's size


@pytest.fixture(scope="module")
def truth(vit, image):
    return {name: get_method(name)(vit, image / 255.0, LABELS) for name in METHODS}


def _png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def test_the_service_serves_them(vit, image, truth):
    with TestClient(create_app(vit, Settings(time_limit=120), warmup=False)) as client:
        listed = [m["name"] for m in client.get("/v1/methods").json()["methods"]]
        assert set(METHODS) <= set(listed)
        response = client.post("/v1/explain", files={"image": ("i.png", _png(image), "image/png")},
                               data={"methods": ",".join(METHODS), "labels": ",".join(map(str, LABELS)),
                                     "outputs": "maps"})
    assert response.status_code == 200, response.text
    served = response.json()["maps"]
    assert [(m["method"], m["label"]["index"]) for m in served] == [(n, i) for n in METHODS for i in LABELS]
    for entry in served:
        got = np.frombuffer(base64.b64decode(entry["data"]), "<f2").reshape(entry["shape"])
        expected = truth[entry["method"]][LABELS.index(entry["label"]["index"])]
        np.testing.assert_array_equal(got, expected.astype(np.float16), err_msg=entry["method"])


def test_the_report_shows_them(vit, image, truth, tmp_path):
    from explainer.report import explain

    page = explain(vit, image, methods=list(METHODS), labels=LABELS, out_dir=tmp_path, evaluate=False,
                   verbose=False)
    html = page.read_text()
    for name in METHODS:
        for label in LABELS:
            assert (tmp_path / f"{name}_{label}.png").is_file() and f"{name}_{label}.png" in html
        assert name in html


def test_the_dataset_job_and_the_cli_run_them(vit, image, truth, tmp_path):
    from explainer.dataset import explain_dataset, read_parts
    from explainer.dataset.store import map_of
    from explainer.model.preprocess import resize

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "cat.png").write_bytes(_png(image))
    explain_dataset(folder, vit, methods=METHODS, labels=",".join(map(str, LABELS)), metrics=(),
                    out=tmp_path / "out", verbose=False)
    rows = read_parts(tmp_path / "out", "rows").to_pylist()
    assert sorted((r["method"], r["label"]) for r in rows) == sorted((n, i) for n in METHODS for i in LABELS)
    h, w = vit.input.size
    for row in rows:
        expected = resize(truth[row["method"]][LABELS.index(row["label"])][:, :, None], (h, w), clip=False)[:, :, 0]
        np.testing.assert_allclose(map_of(row).astype(np.float32), expected, rtol=2 ** -10,
                                   atol=2e-3 * float(np.abs(expected).max()), err_msg=row["method"])

    from explainer.cli import main

    assert main(["methods"]) == 0
    for name in METHODS:
        assert main(["explain", str(folder / "cat.png"), "--model", str(exports.export("vit_tiny")),
                     "--methods", name, "--labels", "285", "--out", str(tmp_path / f"cli-{name}"),
                     "--no-evaluate", "--quiet"]) == 0, name
