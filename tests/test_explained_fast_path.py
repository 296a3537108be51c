"""#27 point 6b: the service and the dataset job answer with an exported model (``explainer export``) as a
fast path: one onnxruntime run of the file per request gives the prediction and the maps.

Truth is the library's own maps computed the normal way (``get_method(name)(net, image, labels)``) on
the same image, never the file's output read another way; a file that is not an exported model, or
was exported from another model, is one typed error naming the fix."""
import base64
import io
import json
import logging

import numpy as np
import onnx
import pytest

pytest.importorskip("fastapi", reason="the service's extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("pyarrow", reason="the dataset extra is not installed: pip install -e '.[dataset]'")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import explainer  # noqa: E402
from explainer.dataset import explain_dataset, map_of, read_rows  # noqa: E402
from explainer.errors import InvalidParameterError  # noqa: E402
from explainer.export.explained import ExplainedModel, source_of  # noqa: E402
from explainer.methods.registry import get_method  # noqa: E402
from explainer.model.labels import LabelSpec  # noqa: E402
from explainer.model.preprocess import resize  # noqa: E402
from explainer.serve import Settings, create_app  # noqa: E402

TOLERANCE = 1e-4  # of the library map's range
LABELS = [285, 282]  # Egyptian cat, tiger cat: the top two of chelsea (halved) on the default model


def _png(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _served(entry) -> np.ndarray:
    return np.frombuffer(base64.b64decode(entry["data"]), "<f2").reshape(entry["shape"]).astype(np.float32)


def _error(ours, reference) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - reference).max()) / (float(reference.max() - reference.min()) or 1.0)


def _assert_served_equal(served, reference):
    """Served maps are float16: within the tolerance plus the rounding of one float16 step."""
    allowed = TOLERANCE * float(reference.max() - reference.min()) + np.abs(reference) * 2.0 ** -11 + 1e-7
    assert np.all(np.abs(served - reference) <= allowed), _error(served, reference)


class Counted:
    """A session that counts its runs."""

    def __init__(self, session):
        self.session, self.runs = session, 0

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)


@pytest.fixture(scope="module")
def image(chelsea):
    return np.ascontiguousarray(chelsea[::2, ::2])  # 150 x 226: maps come back at the image's size


@pytest.fixture(scope="module")
def files(default_net, tmp_path_factory):
    folder = tmp_path_factory.mktemp("explained")
    net = default_net
    return {"gradcam": explainer.export_explained(net, folder / "gradcam.onnx", top_k=2),
            "gradcam_plus_plus": explainer.export_explained(net, folder / "gpp.onnx", method="gradcam_plus_plus",
                                                            top_k=0),
            "recipro_cam": explainer.export_explained(net, folder / "recipro.onnx", method="recipro_cam", top_k=3),
            "input": explainer.export_explained(net, folder / "input.onnx", top_k=1, map_size="input")}


@pytest.fixture(scope="module")
def truth(default_net, image):
    return {name: get_method(name)(default_net, image, LABELS) for name in ("gradcam", "gradcam_plus_plus", "recipro_cam")}


# the fast path's maps are the library's -----------------------------------------------------------------
@pytest.mark.parametrize("method", ["gradcam", "gradcam_plus_plus", "recipro_cam"])
def test_fast_path_maps_equal_the_librarys(default_net, files, truth, image, method):
    """Top-K files (gradcam: top 2, recipro_cam: top 3) and a ``target`` file (Grad-CAM++): float32 maps
    at the image's size within 1e-4 of the library map's range."""
    fast = ExplainedModel.open(files[method], default_net)
    run = fast.run(default_net, image, LabelSpec.parse(",".join(map(str, LABELS))))
    assert run.indices == LABELS and run.has_maps
    np.testing.assert_allclose(run.probabilities, default_net.predict(image), rtol=1e-5, atol=1e-7)
    maps = run.maps()
    assert maps.shape == (2, *image.shape[:2]) and maps.dtype == np.float32
    assert _error(maps, truth[method]) <= TOLERANCE


@pytest.mark.parametrize("method", ["gradcam", "gradcam_plus_plus", "recipro_cam"])
def test_service_answers_with_one_run_of_the_exported_model(default_net, files, truth, image, method, monkeypatch):
    """``create_app(net, explained=FILE)``: an explain request for the file's method runs the exported
    model once (prediction and maps: no other forward pass, no torch) and serves the library's maps."""
    app = create_app(default_net, Settings(time_limit=120), warmup=False, explained=files[method])
    fast = app.state.explained
    fast.session = counted = Counted(fast.session)
    forwards = []
    monkeypatch.setattr(default_net, "predict_model_input", lambda *a, **k: forwards.append(1) / 0)
    labels = "top2" if method != "gradcam_plus_plus" else ",".join(map(str, LABELS))  # a target file: given labels
    with TestClient(app) as client:
        for request in range(2):
            response = client.post("/v1/explain", files={"image": ("i.png", _png(image), "image/png")},
                                   data={"methods": method, "labels": labels, "outputs": "maps"})
            assert response.status_code == 200, response.text
            assert counted.runs == request + 1  # one run of the exported model per request
        described = client.get("/v1/model").json()["explained"]
    assert forwards == []
    body = response.json()
    assert [l["index"] for l in body["labels"]] == LABELS and body["timings"]["explained"] == [method]
    assert described["method"] == method and described["layer"] == explainer.gradcam_layers(default_net).feature
    for entry, reference in zip(body["maps"], truth[method]):
        assert entry["shape"] == list(image.shape[:2])
        assert abs(entry["max"] - float(reference.max())) <= TOLERANCE * float(reference.max() - reference.min())
        _assert_served_equal(_served(entry), reference)


def test_service_other_requests_take_the_librarys_path(default_net, files, truth, image):
    """Other methods, another layer, and a label outside a top-K file's classes: the normal path, with
    the library's maps (the exported model is not run for them)."""
    app = create_app(default_net, Settings(time_limit=120), warmup=False, explained=files["gradcam"])
    fast = app.state.explained
    fast.session = counted = Counted(fast.session)
    layer = [l.name for l in default_net.layers() if default_net.layout(l) is not None][-3]
    with TestClient(app) as client:
        other = client.post("/v1/explain", files={"image": ("i.png", _png(image), "image/png")},
                            data={"methods": "gradcam", "labels": "285", "outputs": "maps",
                                  "options": json.dumps({"gradcam": {"feature_layer": layer}})})
        assert other.status_code == 200, other.text
        assert counted.runs == 0
        expected = explainer.gradcam(default_net, image, 285, feature_layer=layer)
        _assert_served_equal(_served(other.json()["maps"][0]), expected)
        outside = client.post("/v1/explain", files={"image": ("i.png", _png(image), "image/png")},
                              data={"methods": "gradcam,saliency", "labels": "285,3", "outputs": "maps"})
        assert outside.status_code == 200, outside.text
    assert counted.runs == 1 and outside.json()["timings"]["explained"] == []  # class 3 is not in its top 2
    expected = explainer.gradcam(default_net, image, [285, 3])
    for entry, reference in zip(outside.json()["maps"][:2], expected):
        _assert_served_equal(_served(entry), reference)


def test_service_loads_an_exported_model_as_its_own_fast_path(default_net, files, truth, image):
    """A classifier loaded from an exported file: the service serves the source graph inside it, with the
    file as its fast path, automatically."""
    net = explainer.load(str(files["recipro_cam"]))
    app = create_app(net, Settings(time_limit=120), warmup=False)
    assert app.state.explained is not None and app.state.explained.method == "recipro_cam"
    assert [o.name for o in app.state.net.source_model.graph.output] == \
        [o.name for o in default_net.source_model.graph.output]
    with TestClient(app) as client:
        response = client.post("/v1/explain", files={"image": ("i.png", _png(image), "image/png")},
                               data={"methods": "recipro_cam", "labels": "top2", "outputs": "maps"})
    assert response.status_code == 200, response.text
    assert response.json()["timings"]["explained"] == ["recipro_cam"]
    for entry, reference in zip(response.json()["maps"], truth["recipro_cam"]):
        _assert_served_equal(_served(entry), reference)


# the dataset job -------------------------------------------------------------------------------------
def _folder(tmp_path, chelsea, coffee):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.ascontiguousarray(chelsea[::2, ::2])).save(folder / "cat.png")
    Image.fromarray(np.ascontiguousarray(coffee[::3, ::3])).save(folder / "coffee.png")
    return folder


def _library_row_map(net, path, method, label):
    """The library's map of ``label``, stored as the dataset job stores maps (at the input size, float16)."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    m = get_method(method)(net, pixels / 255.0, [label])[0]
    return resize(m[:, :, None], net.input.size, clip=False)[:, :, 0], m


@pytest.mark.parametrize("how", ["option", "automatic"])
def test_dataset_rows_from_the_exported_model_equal_the_librarys(default_net, files, tmp_path, chelsea, coffee,
                                                                  how, monkeypatch):
    """``explain_dataset(..., model_explained=FILE)``, or the exported file itself as the model (a ``target``
    file, which ``explainer.load`` alone refuses for its second input): one run per image, rows equal to
    the library's maps."""
    folder = _folder(tmp_path, chelsea, coffee)
    if how == "option":  # a top-2 file beside the classifier
        method, model, kwargs = "gradcam", default_net, {"model_explained": files["gradcam"]}
    else:  # the target file as the model
        method, model, kwargs = "gradcam_plus_plus", str(files["gradcam_plus_plus"]), {}
    counted = []
    original = ExplainedModel.run

    def run(self, *args, **kw):
        counted.append(self)
        self.session = self.session if isinstance(self.session, Counted) else Counted(self.session)
        return original(self, *args, **kw)

    monkeypatch.setattr(ExplainedModel, "run", run)
    out = tmp_path / "out"
    explain_dataset(folder, model, methods=[method], labels="top2", metrics=(), out=out, verbose=False, **kwargs)
    rows = read_rows(out)
    assert len(rows) == 4 and len(counted) == 2  # 2 images x 2 labels, one fast run per image
    # one run of the file per image: a top-K file's, or a target file's batch of the two labels (the
    # labels of a target file asked for its top classes come from the classifier's forward pass first)
    assert [f.session.runs for f in {id(f): f for f in counted}.values()] == [2]
    for _, row in rows.iterrows():
        expected, full = _library_row_map(default_net, row["path"], method, int(row["label"]))
        got = map_of(row).astype(np.float32)
        allowed = TOLERANCE * float(full.max() - full.min()) + np.abs(expected) * 2.0 ** -11 + 1e-7
        assert np.all(np.abs(got - expected) <= allowed), row["image_id"]


# a file that does not fit: one typed error naming the fix ----------------------------------------------------
def test_a_file_that_is_no_exported_model_or_of_another_model_is_refused(default_net, files, tmp_path, chelsea):
    plain = tmp_path / "plain.onnx"
    onnx.save(default_net.source_model, str(plain))
    with pytest.raises(InvalidParameterError, match="not a model written by explainer export.*explainer export MODEL"):
        create_app(default_net, warmup=False, explained=plain)
    with pytest.raises(InvalidParameterError, match="map-size feature"):
        ExplainedModel.open(files["input"], default_net)
    # the same graph exported from another model (the default model with one weight changed)
    other = onnx.load(str(files["gradcam"]))
    weight = other.graph.initializer[0]
    array = onnx.numpy_helper.to_array(weight).copy()
    array.flat[0] += 1.0
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    changed = tmp_path / "other.onnx"
    onnx.save(other, str(changed))
    with pytest.raises(InvalidParameterError, match="exported from another model.*export it from this model"):
        create_app(default_net, warmup=False, explained=changed)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(chelsea).save(folder / "cat.png")
    with pytest.raises(InvalidParameterError, match="exported from another model"):
        explain_dataset(folder, default_net, methods=["gradcam"], metrics=(), out=tmp_path / "out", verbose=False,
                        model_explained=changed)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))
    # the file read back gives exactly the source graph
    assert source_of(onnx.load(str(files["gradcam"]))).graph == default_net.source_model.graph


def test_cli_batch_and_serve_take_the_option(default_net, files, tmp_path, chelsea, capsys):
    from explainer.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--model-explained", str(files["gradcam"])])
    assert args.model_explained == str(files["gradcam"])
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.ascontiguousarray(chelsea[::2, ::2])).save(folder / "cat.png")
    plain = tmp_path / "plain.onnx"
    onnx.save(default_net.source_model, str(plain))
    assert main(["batch", str(folder), "--out", str(tmp_path / "bad"), "--metrics", "", "--quiet",
                 "--model-explained", str(plain)]) == 2
    assert "explainer export" in capsys.readouterr().err
    logger = logging.getLogger("explainer")  # the service's CLI sets its JSON handler there: restored after
    state = (list(logger.handlers), logger.level, logger.propagate)
    try:
        assert main(["serve", "--model-explained", str(plain), "--port", "0"]) == 2  # refused before it listens
    finally:
        logger.handlers[:], logger.propagate = state[0], state[2]
        logger.setLevel(state[1])
    assert "not a model written by explainer export" in capsys.readouterr().err
    assert main(["batch", str(folder), "--out", str(tmp_path / "out"), "--metrics", "", "--quiet",
                 "--model-explained", str(files["gradcam"])]) == 0
    row = read_rows(tmp_path / "out").iloc[0]
    expected, full = _library_row_map(default_net, row["path"], "gradcam", int(row["label"]))
    assert _error(map_of(row), expected) <= TOLERANCE + 2.0 ** -10
