"""A classifier that goes out of scope takes what running it made with it: its onnxruntime sessions, the
converted torch module, the in-graph Grad-CAM and Recipro-CAM sessions and heads. The library's caches
are kept by the classifier or weakly keyed by it; one that held on (a strong reference in a module-level
table, or a table value pointing back at its weak key) would keep every model a long process (a server,
the test suite) ever loaded."""
import gc
import weakref

import numpy as np

import explainer
from explainer.methods.gradients import pixel_attributions
from explainer.runtime.torch_engine import torch_engine

from graphs import linear_classifier


def _used_and_dropped():
    """Weak references to a classifier and everything running it made, the classifier itself gone."""
    model, _ = linear_classifier(k=4, size=(16, 16))
    net = explainer.load(model, preprocessing="none", batch_size=2)
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    net.predict(image)
    pixel_attributions(net, image, 1)
    explainer.gradcam(net, image, 1, feature_layer="conv1")
    explainer.recipro_cam(net, image, 1, feature_layer="conv1", verbose=False)
    made = {"classifier": net, "engine": net.ort, "torch engine": torch_engine(net),
            "torch module": torch_engine(net).pixel_model}
    made.update({f"onnxruntime session {i}": s for i, s in enumerate(net.ort._sessions.values())})
    from explainer.export import engine as in_graph
    from explainer.methods import recipro_cam

    made.update({f"in-graph session {key}": s for key, (_, s) in in_graph._SESSIONS.get(net, {}).items()
                 if s is not None and s is not in_graph.CLOSED})
    made.update({f"Recipro-CAM head {key}": h for key, h in recipro_cam._HEADS.get(net, {}).items()})
    made.update({f"Recipro-CAM session {key}": s for key, (_, s) in recipro_cam._GRAPHS.get(net, {}).items() if s})
    assert any(k.startswith("in-graph session") for k in made) and any(k.startswith("Recipro-CAM head") for k in made)
    return {what: weakref.ref(obj) for what, obj in made.items()}


def test_a_dropped_classifier_releases_its_sessions_and_modules():
    refs = _used_and_dropped()
    gc.collect()
    alive = sorted(what for what, ref in refs.items() if ref() is not None)
    assert not alive, f"still alive after the classifier was dropped: {alive}"


def test_returning_arena_memory_keeps_the_sessions_and_their_results():
    model, _ = linear_classifier(k=4, size=(16, 16))
    net = explainer.load(model, preprocessing="none", batch_size=2)
    x = net.to_model_input(np.random.default_rng(1).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32))
    session = net.ort.session([net.output.name])
    before = net.ort.run(x, [net.output.name])[0]
    net.ort.return_memory(x[:1])  # every cached session
    net.ort.return_memory(x[:1], [net.output.name], single_thread=True)  # none cached: nothing
    assert net.ort.session([net.output.name]) is session
    np.testing.assert_array_equal(net.ort.run(x, [net.output.name])[0], before)


def test_measuring_the_batch_size_returns_the_arena_of_the_largest_candidate(monkeypatch, tmp_path):
    """'auto' tries batches up to 64 on the session it keeps: its arena, grown to the largest, is given
    back once the size is chosen (the session stays cached)."""
    from explainer.runtime import ort_engine

    monkeypatch.setenv("ONNX_EXPLAINER_CACHE", str(tmp_path))
    monkeypatch.setattr(ort_engine.OrtEngine, "parallel_streams", lambda self: 2)
    model, _ = linear_classifier(size=(16, 16))
    net = explainer.load(model, preprocessing="none")
    returned = []
    real = ort_engine.OrtEngine.return_memory
    monkeypatch.setattr(ort_engine.OrtEngine, "return_memory",
                        lambda self, example, outputs=None, single_thread=False:
                        returned.append((example.shape[0], tuple(outputs), single_thread))
                        or real(self, example, outputs, single_thread))
    net.batch_size
    net.stream_batch_size
    assert returned == [(1, (net.output.name,), False), (1, (net.output.name,), True)]
    assert len(net.ort._sessions) == 2  # both kept


def test_recipro_cams_check_sessions_close_once_the_in_graph_path_is_chosen(chelsea):
    """The in-graph Recipro-CAM path is chosen after comparing its maps with the two-stage path's, which
    opens the head's sessions and the classifier's session with the feature layer as an output: those
    are closed once the in-graph path wins (they hold their own copies of the weights), and a two-stage
    call asked for later opens them again and gives the same maps."""
    from explainer.methods import recipro_cam
    from explainer.methods.gradcam import default_feature_layer

    net = explainer.load()
    layer = net.layer(default_feature_layer(net)[0])
    assert explainer.recipro_cam_engine(net) == "in-graph"
    head = recipro_cam.head_of(net, layer)
    engines = [e for e in (head.engine, head.full_engine, head.pooled[1] if head.pooled else None) if e is not None]
    assert engines and not any(e._sessions for e in engines)
    assert all(key[0] == () for key in net.ort._sessions)  # no session with the feature layer as an output
    small = net.fit_pixels(chelsea)
    one = recipro_cam.low_resolution(net, small, layer, [285])
    two = recipro_cam.low_resolution(net, small, layer, [285], path="two-stage")
    assert any(e._sessions for e in engines)
    np.testing.assert_allclose(one, two, atol=1e-5)


def test_in_graph_gradcam_keeps_a_bounded_number_of_sessions_open(chelsea):
    """Each layer's in-graph Grad-CAM session holds a copy of the weights: a classifier keeps at most
    ``MAX_OPEN`` of them open (the least recently used closed, its decision kept); a closed layer's map
    is computed again, equal to the first."""
    from explainer.export import engine as in_graph

    net = explainer.load()
    layers = [l.name for l in net.layers() if l.op_type == "Clip" and l.shape and len(l.shape) == 3][-(in_graph.MAX_OPEN + 2):]
    x, targets = net.to_model_input(net.fit_pixels(chelsea)[None]), np.asarray([[285]])
    first = in_graph.cam_maps(net, x, targets, feature_layer=layers[0])
    for layer in layers[1:]:
        in_graph.cam_maps(net, x, targets, feature_layer=layer)
    entries = in_graph._SESSIONS[net]
    assert all((("gradcam", layer) in entries) for layer in layers)
    assert sum(s is not None and s is not in_graph.CLOSED for _, s in entries.values()) == in_graph.MAX_OPEN
    assert entries[("gradcam", layers[0])][1] is in_graph.CLOSED
    assert all(choice == "onnxruntime" for choice, _ in entries.values())
    again = in_graph.cam_maps(net, x, targets, feature_layer=layers[0])
    assert entries[("gradcam", layers[0])][1] is not in_graph.CLOSED
    np.testing.assert_array_equal(again, first)
